//! `jitsu-e2e`: cold starts through both daemons, end to end, in network namespaces it
//! creates and removes.
//!
//! - `jitsu-e2e demo [--boot-ms N]`: the README's main job. One cold start per masking mode
//!   (none, fixed delay, wait for announce, synjitsu) with real `dig` and `curl`, a table of
//!   what the client saw, then the VMs stopped after 2 x TTL idle and the state history.
//! - `jitsu-e2e bench [--runs N] [--boot-ms A,B] [--modes ...] [--arp] [--backend B]`:
//!   `bench/cold-start`. N cold starts per mode and boot time, with the median and p95 of
//!   (first byte - guest listening), SYNs per connection, retransmits and failures. With
//!   `--backend libvirt` the VMs are QEMU guests under libvirtd, which boot as fast as TCG
//!   lets them (`--boot-ms` does not apply).
//!
//! Run as root, from a build that has `synjitsu`, `jitsu-dns` and `jitsu-test-guest` beside
//! it (`cargo build --release --workspace --bins`).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use jitsu_tests::e2e::{Backend, ColdStart, DNS_ADDR, Mask, Options, Stack, Vm, table};

fn usage() -> ! {
    eprintln!(
        "usage: jitsu-e2e demo [--boot-ms N]\n       \
         jitsu-e2e bench [--runs N] [--boot-ms A,B,...] [--modes none,delay,announce,synjitsu] [--arp] [--backend process|libvirt]"
    );
    std::process::exit(2)
}

struct Args {
    runs: usize,
    boots: Vec<u64>,
    modes: Vec<Mask>,
    /// The client starts without the VMs' MACs and must ARP for them.
    arp: bool,
    /// What runs the VMs.
    backend: Backend,
}

fn parse(args: &[String], default_boots: &[u64], default_runs: usize) -> Result<Args> {
    let mut a = Args {
        runs: default_runs,
        boots: default_boots.to_vec(),
        modes: Mask::ALL.to_vec(),
        arp: false,
        backend: Backend::Process,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--runs" => a.runs = value()?.parse().context("--runs")?,
            "--boot-ms" => {
                a.boots = value()?
                    .split(',')
                    .map(|v| v.trim().parse().context("--boot-ms"))
                    .collect::<Result<_>>()?;
            }
            "--modes" => {
                a.modes = value()?
                    .split(',')
                    .map(|m| match m.trim() {
                        "none" => Ok(Mask::None),
                        "delay" => Ok(Mask::Delay(100)),
                        "announce" => Ok(Mask::Announce),
                        "synjitsu" => Ok(Mask::Synjitsu),
                        other => bail!("unknown mode {other:?}"),
                    })
                    .collect::<Result<_>>()?;
            }
            "--arp" => a.arp = true,
            "--backend" => {
                a.backend = match value()?.as_str() {
                    "process" => Backend::Process,
                    "libvirt" => Backend::Libvirt,
                    other => bail!("unknown backend {other:?}: process or libvirt"),
                }
            }
            "-h" | "--help" => usage(),
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    if a.runs == 0 || a.boots.is_empty() || a.modes.is_empty() {
        bail!("nothing to run");
    }
    Ok(a)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("demo") => demo(parse(&args[1..], &[500], 1)?),
        Some("bench") => bench(parse(&args[1..], &[300, 1500], 20)?),
        _ => usage(),
    }
}

fn demo(a: Args) -> Result<()> {
    let boot = Duration::from_millis(a.boots[0]);
    let vms: Vec<Vm> = a
        .modes
        .iter()
        .enumerate()
        .map(|(n, m)| Vm::new(n, *m, boot))
        .collect();
    let opts = Options {
        ttl_secs: 2,
        ..Options::default()
    };
    println!(
        "jitsu: cold starts through both daemons, end to end.\n\n\
         In network namespaces: a host with bridge br0 (as a Xen dom0), synjitsu and jitsu-dns on\n\
         it ({DNS_ADDR}), a client, and one VM per masking mode: the project's test guest, run by\n\
         the process backend, which boots for {} ms, announces itself with a gratuitous ARP and\n\
         serves HTTP. The client has each VM's MAC in its ARP cache, as a client that used it\n\
         before, resolves its name through jitsu-dns (this boots it) and fetches its page with\n\
         curl. TTL {} s: a VM idle for {} s is stopped.\n",
        boot.as_millis(),
        opts.ttl_secs,
        2 * opts.ttl_secs
    );
    let stack = Stack::start("demo", vms.clone(), opts)?;
    let first = &vms[0];
    let d = stack.dig("nosuchvm.example.org")?;
    println!(
        "dig nosuchvm.example.org: {} (jitsu-dns answers for its zone; nothing boots)\n",
        d.status
    );
    let mut rows: Vec<(String, ColdStart)> = Vec::new();
    for vm in &vms {
        let c = stack.cold_start(vm)?;
        rows.push((vm.mask.label(), c));
    }
    println!("{}", table(&rows));
    println!(
        "DNS: name resolution as curl saw it. connect / 1st byte: from curl's start. after listen:\n\
         the page's first byte at the client minus the moment the guest started listening (both\n\
         from one clock: the client's capture and the guest's report). SYNs: how many the client\n\
         sent (1: it never waited for a retransmit timer). SYN rtx: TcpExtTCPSynRetrans.\n"
    );
    let took = stack.wait_all_off(Duration::from_secs(120))?;
    println!(
        "All {} VMs are off, the last one {:.1} s after the last page arrived (idle stop at 2 x TTL = {} s).\n",
        vms.len(),
        took.as_secs_f64(),
        2 * stack.options().ttl_secs
    );
    println!("State history (`jitsu-dns state log`):");
    println!("{}", stack.state_cli("log")?);
    println!(
        "State of {} (`jitsu-dns state tree`, abridged):",
        first.name
    );
    let tree = stack.state_cli("tree")?;
    for line in tree
        .lines()
        .filter(|l| l.contains(&format!("/{}/", first.name)))
    {
        println!("{line}");
    }
    drop(stack);
    println!("\nEverything the demo created (namespaces, VMs, files) is removed.");
    Ok(())
}

fn sorted(values: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    v
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    // Nearest rank.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    Some(sorted[rank.min(sorted.len()) - 1])
}

fn bench(mut a: Args) -> Result<()> {
    if a.backend == Backend::Libvirt {
        // The QEMU guest boots as fast as TCG lets it; one column, labelled 0.
        a.boots = vec![0];
    }
    let mut vms = Vec::new();
    let mut plan: Vec<(usize, u64, Mask)> = Vec::new();
    for _ in 0..a.runs {
        for b in &a.boots {
            for m in &a.modes {
                let n = vms.len();
                vms.push(Vm::new(n, *m, Duration::from_millis(*b)));
                plan.push((n, *b, *m));
            }
        }
    }
    println!(
        "bench/cold-start: {} cold starts per mode and boot time ({} in all), {}, both daemons \
         on one bridge; each cold start on a VM of its own. {}",
        a.runs,
        plan.len(),
        match a.backend {
            Backend::Process => "process backend running the test guest",
            Backend::Libvirt => {
                "libvirt backend: QEMU (TCG) guests of guest/build-image under libvirtd, booting \
                 as fast as they can (boot ms: qemu); listening = the guest's console line, \
                 which trails its listen by about 10-20 ms under TCG"
            }
        },
        if a.arp {
            "The client starts without the VMs' MACs: it ARPs for each, and sends its SYN \
             when the guest's gratuitous ARP answers."
        } else {
            "The client has each VM's MAC in its neighbour cache, as a client that used it \
             before: its SYN leaves at once."
        }
    );
    let opts = Options {
        client_knows_macs: !a.arp,
        backend: a.backend,
        // The idle clock starts when the backend's start returns; a TCG guest sends its first
        // packet seconds later, so a 1 s TTL would stop it as idle before it is up.
        ttl_secs: if a.backend == Backend::Libvirt { 5 } else { 1 },
        ..Options::default()
    };
    let stack = Stack::start("bench", vms.clone(), opts)?;
    // `None`: a warm fetch, right after a synjitsu cold start, from the guest that now
    // listens: what a connection costs at all (SYN to first byte), the floor the cold rows'
    // (first byte - listening) is measured against.
    let mut results: Vec<(u64, Option<Mask>, ColdStart)> = Vec::new();
    let started = Instant::now();
    for (i, (n, b, m)) in plan.iter().enumerate() {
        let c = stack.cold_start(&vms[*n])?;
        if let Some(e) = &c.error {
            eprintln!("  {} ({} ms, {}): {e}", vms[*n].name, b, m.label());
        }
        let warm = *m == Mask::Synjitsu && c.ok();
        results.push((*b, Some(*m), c));
        if warm {
            // Within the VM's idle time (2 x TTL), so it still runs.
            let w = stack.cached_start(&vms[*n])?;
            if let Some(e) = &w.error {
                eprintln!("  {} ({} ms, warm): {e}", vms[*n].name, b);
            }
            results.push((*b, None, w));
        }
        if (i + 1) % 20 == 0 {
            eprintln!(
                "  {} of {} cold starts done ({:.0} s)",
                i + 1,
                plan.len(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    println!(
        "\n{:>8} {:<12} {:>4} {:>6} {:>9} {:>10} {:>8} {:>10} {:>8} {:>8} {:>8}",
        "boot ms",
        "mode",
        "n",
        "fails",
        "1 SYN",
        "median ms",
        "p95 ms",
        "p50-warm",
        "SYN rtx",
        "DNS p50",
        "conn p50"
    );
    println!(
        "{:>8} {:<12} {:>4} {:>6} {:>9} {:>10} {:>8} {:>10} {:>8} {:>8} {:>8}",
        "", "", "", "", "", "(1st byte -", "listen)", "ms", "", "ms", "ms"
    );
    let f = |v: Option<f64>| v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into());
    for b in &a.boots {
        let rows_of = |mode: Option<Mask>| -> Vec<&ColdStart> {
            results
                .iter()
                .filter(|(rb, rm, _)| rb == b && *rm == mode)
                .map(|(_, _, c)| c)
                .collect()
        };
        let warm = rows_of(None);
        let warm_p50 = percentile(
            &sorted(
                warm.iter()
                    .filter_map(|c| c.after_syn_us)
                    .map(|us| us as f64 / 1000.0),
            ),
            50.0,
        );
        let mut lines: Vec<(String, Vec<&ColdStart>, bool)> = a
            .modes
            .iter()
            .map(|m| (m.label(), rows_of(Some(*m)), false))
            .collect();
        if !warm.is_empty() {
            lines.push(("warm (floor)".into(), warm, true));
        }
        for (label, rows, is_warm) in lines {
            let fails = rows.iter().filter(|c| !c.ok()).count();
            let one_syn = rows.iter().filter(|c| c.ok() && c.syns == 1).count();
            let rtx: u64 = rows.iter().map(|c| c.syn_retransmits).sum();
            // The warm row: SYN to first byte (the guest listened long before).
            let after = sorted(
                rows.iter()
                    .filter_map(|c| {
                        if is_warm {
                            c.after_syn_us
                        } else {
                            c.after_listening_us
                        }
                    })
                    .map(|us| us as f64 / 1000.0),
            );
            let ok_ms = |d: fn(&ColdStart) -> Duration| {
                sorted(
                    rows.iter()
                        .filter(|c| c.ok())
                        .map(|c| d(c).as_secs_f64() * 1000.0),
                )
            };
            let (dns, conn) = (ok_ms(|c| c.dns), ok_ms(|c| c.connect));
            let p50 = percentile(&after, 50.0);
            println!(
                "{:>8} {:<12} {:>4} {:>6} {:>9} {:>10} {:>8} {:>10} {:>8} {:>8} {:>8}",
                if a.backend == Backend::Libvirt {
                    "qemu".to_string()
                } else {
                    b.to_string()
                },
                label,
                rows.len(),
                fails,
                format!("{one_syn}/{}", rows.len()),
                f(p50),
                f(percentile(&after, 95.0)),
                f(p50.zip(warm_p50).map(|(c, w)| c - w)),
                rtx,
                f(percentile(&dns, 50.0)),
                f(percentile(&conn, 50.0)),
            );
        }
    }
    println!(
        "\nfails: connections that got no page (refused, timed out). 1 SYN: connections the client\n\
         completed with its first SYN. SYN rtx: the client's SYN retransmissions in all. warm: a\n\
         second fetch right after each synjitsu cold start, from the guest that now listens; its\n\
         median is SYN to first byte, the floor of (1st byte - listen); p50-warm: a row's median\n\
         minus the warm one's. none: no masking, what the client's 1 s SYN retransmit costs.\n\
         Total time {:.0} s.",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
