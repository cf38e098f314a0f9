//! `jitsu-dns`: flags, logging, the runtime and signals; everything else is the library's.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use jitsu_dns::check;
use jitsu_dns::config::{self, Flags};
use jitsu_dns::daemon::{self, Control};
use jitsu_dns::state;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Authoritative DNS server that boots a VM when one of its names is resolved, masks the
/// boot, and stops the VM when it is idle for twice the TTL.
///
/// VMs are positional specs, e.g.
/// `name=www,dns=www.example.org,ip=10.0.0.1,command='busybox httpd -f -p 80'`
/// (keys: name, dns (repeatable), ip, ip6, mac, response_delay, wait_for_key, wait_for,
/// wait_for_timeout, boot_timeout, use_synjitsu, stop_mode, handover, announce
/// (boot|listening: the guest announces itself only once it listens, so synjitsu hands its
/// held SYNs over at the announcement without a probe), zone, nic (repeatable),
/// idle_timeout, pin, drained (servfail|nxdomain), max_boot_attempts, boot_backoff;
/// process backend: command, ifup, gateway; libvirt: uuid, kernel, initrd, cmdline, memory,
/// disk (repeatable), script (repeatable), console_log, domain_type, rumprun_config), or
/// `[[vm]]` tables in the --config file, whose top-level keys are the long flags with `_`.
///
/// As in Jitsu: memory is KiB (memory=64000; or 64M, 1G, 65536K), disk is
/// <file-or-/dev/-device>@<xvdX>, a relative kernel, initrd, disk or rumprun_config path is
/// read from the working directory (in a --config file: from the file's directory), and
/// wait_for_key waits at most 2 s (wait_for_timeout), then response_delay.
#[derive(Debug, Parser)]
// Long flags may be cut to any unambiguous prefix, as Jitsu's cmdliner allowed (`--pers`).
#[command(
    version,
    about,
    args_conflicts_with_subcommands = true,
    infer_long_args = true
)]
struct Cli {
    #[command(flatten)]
    flags: Flags,
    /// Read and validate the configuration, print what every setting and VM key resolved to
    /// (with the domain XML a libvirt VM without a domain would be defined with), and exit:
    /// 0 if it is valid, 2 if not. Connects to nothing.
    #[arg(long)]
    check: bool,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Read the state store.
    State {
        #[command(subcommand)]
        what: StateCmd,
    },
    /// Act on the running jitsu-dns through its control socket (root, or the uid it allows).
    ///
    /// Exit codes: 0 done; 1 refused or failed; 2 bad arguments; 3 no such VM; 4 jitsu-dns
    /// not reachable (not running, or no answer in time); 5 permission denied.
    Ctl(CtlArgs),
}

#[derive(Debug, clap::Args)]
struct CtlArgs {
    /// The daemon's control socket (its --control).
    #[arg(
        long = "control",
        id = "ctl_control",
        value_name = "SOCKET",
        default_value = config::DEFAULT_CONTROL,
        global = true
    )]
    control: PathBuf,
    /// Print JSON (errors too, on stdout) for scripts.
    #[arg(long, global = true)]
    json: bool,
    /// Seconds to wait for the answer (start and restart wait for the boot, stop for the
    /// stop).
    #[arg(long, value_name = "SECONDS", default_value_t = 120, global = true)]
    timeout: u64,
    #[command(subcommand)]
    what: CtlCmd,
}

#[derive(Debug, Subcommand)]
enum CtlCmd {
    /// Every VM: state, addresses, masking, uptime, idle time, boots, queries, last cold
    /// start, flags (pinned, drained, back-off).
    List,
    /// Everything known of one VM, with its last transitions.
    Show { name: String },
    /// Boot it now (pre-warm), masked as for a query; returns once it is answered.
    Start { name: String },
    /// Stop it (a query boots it again, unless it is drained).
    Stop {
        name: String,
        /// How [default: its stop_mode].
        #[arg(long, value_parser = ["destroy", "suspend", "shutdown"])]
        mode: Option<String>,
    },
    /// Stop it and boot it again.
    Restart { name: String },
    /// Never stop it for idleness; kept across restarts.
    Pin { name: String },
    /// Stop it for idleness again (outranks a pin = true key); kept across restarts.
    Unpin { name: String },
    /// Queries no longer boot it (they get its drained answer, SERVFAIL or NXDOMAIN); it
    /// is stopped when idle; kept across restarts.
    Drain { name: String },
    /// Undo drain.
    Undrain { name: String },
    /// Re-read the configuration, as SIGHUP, and say what changed or why it was refused.
    Reload,
    /// The daemon: uptime, backend, synjitsu link, store health, limits in force.
    Status,
}

fn ctl_command(args: CtlArgs) -> ExitCode {
    use jitsu_dns::ctl::{client, proto::Request};
    let request = match args.what {
        CtlCmd::List => Request::List,
        CtlCmd::Show { name } => Request::Show { vm: name },
        CtlCmd::Start { name } => Request::Start { vm: name },
        CtlCmd::Stop { name, mode } => Request::Stop { vm: name, mode },
        CtlCmd::Restart { name } => Request::Restart { vm: name },
        CtlCmd::Pin { name } => Request::Pin { vm: name },
        CtlCmd::Unpin { name } => Request::Unpin { vm: name },
        CtlCmd::Drain { name } => Request::Drain { vm: name },
        CtlCmd::Undrain { name } => Request::Undrain { vm: name },
        CtlCmd::Reload => Request::Reload,
        CtlCmd::Status => Request::Status,
    };
    let timeout = std::time::Duration::from_secs(args.timeout.max(1));
    let response = client::call(&args.control, &request, timeout);
    ExitCode::from(client::print(&response, args.json))
}

#[derive(Debug, Subcommand)]
enum StateCmd {
    /// Every path and value, like the original `irmin tree`.
    Tree {
        /// The store (as given to the daemon).
        #[arg(long, value_name = "DIR")]
        persistdb: PathBuf,
    },
    /// The history: one line per change, newest first.
    Log {
        /// The store (as given to the daemon).
        #[arg(long, value_name = "DIR")]
        persistdb: PathBuf,
    },
}

fn init_logging(level: &str) {
    // hickory-server logs every request at info: that is our debug.
    let quiet = if level.contains("hickory") {
        String::new()
    } else {
        ",hickory_server=warn,hickory_net=warn,hickory_proto=warn".to_string()
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{level}{quiet}")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

fn state_command(what: StateCmd) -> ExitCode {
    let (StateCmd::Tree { persistdb } | StateCmd::Log { persistdb }) = &what;
    if !persistdb.join(".git").exists() {
        eprintln!(
            "jitsu-dns: no state store at {} (give the --persistdb jitsu-dns runs with)",
            persistdb.display()
        );
        return ExitCode::FAILURE;
    }
    let result = match what {
        StateCmd::Tree { persistdb } => {
            state::read_head(&persistdb).map(|t| state::render_tree(&t))
        }
        StateCmd::Log { persistdb } => state::render_log(&persistdb),
    };
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("jitsu-dns: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Cmd::State { what }) => return state_command(what),
        Some(Cmd::Ctl(args)) => return ctl_command(args),
        None => {}
    }
    let flags = cli.flags;
    let cfg = match config::load(&flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("jitsu-dns: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check {
        print!("{}", check::render(&cfg));
        return ExitCode::SUCCESS;
    }
    init_logging(&cfg.log_level);
    // One thread: measured faster than the multi-threaded runtime for this load on small
    // hosts; blocking backend calls go to tokio's blocking pool.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("jitsu-dns: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(4);
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => break,
                    _ = int.recv() => break,
                    _ = hup.recv() => {
                        tracing::info!("SIGHUP: reloading the configuration");
                        let _ = reload_tx.try_send(());
                    }
                }
            }
            stop.cancel();
        });
        daemon::run(
            flags,
            cfg,
            Control {
                shutdown,
                reload: reload_rx,
            },
        )
        .await
        .map_err(anyhow::Error::from)
    });
    // A backend call in flight (a boot) is let finish, within reason.
    runtime.shutdown_timeout(std::time::Duration::from_secs(15));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "jitsu-dns failed");
            eprintln!("jitsu-dns: {e:#}");
            ExitCode::FAILURE
        }
    }
}
