//! `synjitsu`: flags, logging, the runtime and signals; everything else is the library's.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use synjitsu::daemon::{self, Options, XenstoreMode};
use tokio_util::sync::CancellationToken;

/// Holds the TCP SYNs of booting guests on the bridge and hands them over once the guest can
/// answer, so that no client waits for a SYN retransmit while its VM boots.
///
/// synjitsu creates its own port on the bridge (a veth pair, `syj-<bridge>` and
/// `syj-<bridge>-p`, removed on exit), stands in for each VM jitsu-dns declares booting or
/// stopped (gratuitous ARP, ARP and neighbour answers with the VM's MAC), holds its clients'
/// SYNs, and hands them over: written to Xenstore for guests that replay them themselves, or
/// re-sent on the bridge once the guest listens. Run as root.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// The bridge the guests are on; synjitsu adds its own port to it.
    #[arg(long, default_value = "br0")]
    bridge: String,

    /// The control socket jitsu-dns connects to (created with mode 0600; a stale one is
    /// replaced, a live one is an error). Beside it, synjitsu-<bridge>.fdb records the
    /// forwarding entries synjitsu made, so that its next start removes them even after a
    /// kill -9 (removed on a clean exit).
    #[arg(long, default_value = "/run/jitsu/synjitsu.sock")]
    control: PathBuf,

    /// Xenstore for the Xenstore hand-over: `auto` uses $XENSTORED_PATH, else
    /// /run/xenstored/socket if it exists, else none; a socket path uses that one; `off`
    /// disables it (VMs that ask for it are refused with an error).
    #[arg(long, default_value = "auto", value_name = "auto|SOCKET|off")]
    xenstore: String,

    /// synjitsu's own address for probing whether a guest listens (wire hand-over): it sends
    /// a SYN from here to each held port and re-sends the held SYNs once the guest answers
    /// with a SYN-ACK. Give at most one IPv4 and one IPv6 address, unused on the bridge's
    /// subnets. Without any, the wire hand-over waits for jitsu-dns's `ready`.
    #[arg(long = "probe-ip", value_name = "ADDR")]
    probe_ip: Vec<IpAddr>,

    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9477).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,

    /// Log level or filter (error, warn, info, debug, trace, or an EnvFilter directive);
    /// RUST_LOG is used when this is not given.
    #[arg(long, value_name = "L")]
    log_level: Option<String>,

    /// A non-root uid allowed on the control socket (root always is); the socket is then
    /// owned by that uid, still mode 0600.
    #[arg(long, value_name = "N")]
    allow_uid: Option<u32>,

    /// Answer a SYN held longer than this with a RST, so its client fails fast
    /// (e.g. 10s, 1500ms).
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DUR")]
    hold_timeout: Duration,

    /// Compare the bridge's forwarding table with what synjitsu wants this often (besides
    /// after every sync and a failed change) and put right what changed behind its back.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DUR")]
    fdb_reconcile_interval: Duration,

    /// Memory the SYNs held for one VM may take (e.g. 16MiB, 512KiB, 1000000: about 280
    /// bytes a SYN); a new SYN that does not fit evicts one of that VM's never retransmitted
    /// (counted as evicted): of a source prefix holding more than a sixteenth, else the
    /// oldest, so under a flood the newest are held.
    #[arg(long, default_value = "16MiB", value_parser = parse_bytes, value_name = "BYTES")]
    max_held_bytes_per_vm: usize,

    /// Memory the SYNs held for every VM together may take; a new SYN that does not fit
    /// evicts from the VM that holds the most, once its own holds its share.
    #[arg(long, default_value = "64MiB", value_parser = parse_bytes, value_name = "BYTES")]
    max_held_bytes: usize,

    /// Benchmark baseline only: refuse a SYN that does not fit (vm_full, table_full) instead
    /// of evicting the oldest, as synjitsu did before the byte budget.
    #[arg(long, hide = true)]
    refuse_when_full: bool,

    /// Benchmark baseline only: SYNs held per VM at most, besides the bytes (the old bound
    /// was 1024).
    #[arg(long, hide = true, value_name = "N")]
    max_held_per_vm: Option<usize>,

    /// Benchmark baseline only: SYNs held in total at most, besides the bytes (was 16384).
    #[arg(long, hide = true, value_name = "N")]
    max_held: Option<usize>,

    /// Benchmark baseline only: attach no kernel filter, so every frame on the bridge is
    /// copied to synjitsu.
    #[arg(long, hide = true)]
    no_bpf_filter: bool,

    /// Benchmark baseline only: open no announcement watcher, and take a guest's
    /// announcement from any port again (as without a port named).
    #[arg(long, hide = true)]
    no_announcement_watcher: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 10s or 500ms"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" | "" => v,
        "m" => v * 60.0,
        _ => return Err(format!("{s:?}: unit must be ms, s or m")),
    };
    if !(secs > 0.0 && secs < 86_400.0) {
        return Err(format!("{s:?}: must be between 0 and a day"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A size in bytes: a number, optionally with a unit (KiB, MiB, GiB; K, M, G mean the same).
fn parse_bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .unwrap_or((s, ""));
    let n: usize = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 16MiB or 1048576"))?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        _ => return Err(format!("{s:?}: unit must be KiB, MiB or GiB")),
    };
    n.checked_mul(1 << shift)
        .filter(|b| *b > 0)
        .ok_or_else(|| format!("{s:?}: must be more than 0 and fit in memory"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = match &cli.log_level {
        Some(l) => tracing_subscriber::EnvFilter::try_new(l),
        None => tracing_subscriber::EnvFilter::try_from_default_env()
            .or_else(|_| tracing_subscriber::EnvFilter::try_new("info")),
    };
    let filter = match filter {
        Ok(f) => f,
        Err(e) => {
            eprintln!("synjitsu: bad --log-level: {e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let (probe_v4, probe_v6) = match daemon::probe_addrs(&cli.probe_ip) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("synjitsu: {e}");
            return ExitCode::from(2);
        }
    };
    let xenstore = match cli.xenstore.as_str() {
        "auto" => XenstoreMode::Auto,
        "off" => XenstoreMode::Off,
        path => XenstoreMode::Socket(PathBuf::from(path)),
    };
    if cli.max_held_per_vm == Some(0) || cli.max_held == Some(0) {
        eprintln!("synjitsu: --max-held and --max-held-per-vm must be at least 1");
        return ExitCode::from(2);
    }
    let opts = Options {
        bridge: cli.bridge,
        control: cli.control,
        xenstore,
        probe_v4,
        probe_v6,
        metrics: cli.metrics,
        allow_uid: cli.allow_uid,
        hold_timeout: cli.hold_timeout,
        fdb_reconcile_interval: cli.fdb_reconcile_interval,
        held_bytes_per_vm: cli.max_held_bytes_per_vm,
        held_bytes: cli.max_held_bytes,
        refuse_when_full: cli.refuse_when_full,
        max_held_per_vm: cli.max_held_per_vm,
        max_held: cli.max_held,
        no_bpf_filter: cli.no_bpf_filter,
        no_announcement_watcher: cli.no_announcement_watcher,
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("synjitsu: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        let cancel = CancellationToken::new();
        let signals = {
            let cancel = cancel.clone();
            tokio::spawn(async move {
                use tokio::signal::unix::{SignalKind, signal};
                let (Ok(mut term), Ok(mut int)) = (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ) else {
                    tracing::error!("cannot install signal handlers");
                    return;
                };
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM: stopping"),
                    _ = int.recv() => tracing::info!("SIGINT: stopping"),
                }
                cancel.cancel();
            })
        };
        let r = daemon::run(opts, cancel).await;
        signals.abort();
        r
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("synjitsu: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units_and_refuse_zero_or_garbage() {
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert_eq!(parse_bytes("512KiB"), Ok(512 << 10));
        assert_eq!(parse_bytes("16MiB"), Ok(16 << 20));
        assert_eq!(parse_bytes("2G"), Ok(2 << 30));
        for bad in [
            "0",
            "0MiB",
            "",
            "MiB",
            "1.5MiB",
            "3TB",
            "-1",
            "99999999999999999999",
        ] {
            assert!(parse_bytes(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(
            parse_duration("1500ms").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        for bad in ["", "x", "0s", "-1s", "10h", "1e9s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
