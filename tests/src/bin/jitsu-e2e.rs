//! `jitsu-e2e`: cold starts through both daemons, end to end, in network namespaces it
//! creates and removes.
//!
//! - `jitsu-e2e demo [--boot-ms N]`: the README's main job. One cold start per masking mode
//!   (none, fixed delay, wait for announce, synjitsu) with real `dig` and `curl`, a table of
//!   what the client saw, then the VMs stopped after 2 x TTL idle and the state history; then
//!   the same for the Rust unikernel under QEMU microvm, started by jitsu-dns's QEMU backend
//!   (no masking, announce, synjitsu).
//! - `jitsu-e2e bench [--runs N] [--boot-ms A,B] [--modes ...] [--arp] [--backend B]`:
//!   `bench/cold-start`. N cold starts per mode and boot time, with the median and p95 of
//!   (first byte - guest listening), SYNs per connection, retransmits and failures. The
//!   synjitsu rows use `announce=listening` where the guest keeps that promise; a
//!   `synjitsu+probe` row beside them runs without it (synjitsu probes the port first). With
//!   `--backend libvirt` the VMs are QEMU guests under libvirtd, which boot as fast as TCG
//!   lets them (`--boot-ms` does not apply). `--backend qemu [--guest unikernel]`: the
//!   unikernel under jitsu-dns's QEMU backend, then, in the same run, the Linux guest under
//!   libvirt and the test guest under the process backend (`--baseline-runs N` each, `0` for
//!   none), with where the unikernel's time goes; `--series` runs some of these only.
//!
//! Run as root, from a build that has `synjitsu`, `jitsu-dns` and `jitsu-test-guest` beside
//! it (`cargo build --release --workspace --bins`).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use jitsu_tests::e2e::{Backend, ColdStart, DNS_ADDR, Mask, Options, Stack, Vm, table};

fn usage() -> ! {
    eprintln!(
        "usage: jitsu-e2e demo [--boot-ms N]\n       \
         jitsu-e2e bench [--runs N] [--boot-ms A,B,...] [--modes none,delay,announce,synjitsu,synjitsu+probe,tcp] [--arp] [--backend process|libvirt|qemu] [--guest unikernel] [--baseline-runs N]\n                [--series qemu,qemu-crowd,standby,libvirt-unikernel,libvirt-linux,process]"
    );
    std::process::exit(2)
}

struct Args {
    runs: usize,
    boots: Vec<u64>,
    /// `--boot-ms` was given (else `boots` is the command's default).
    boots_given: bool,
    modes: Vec<Mask>,
    /// The client starts without the VMs' MACs and must ARP for them.
    arp: bool,
    /// What runs the VMs.
    backend: Backend,
    /// With `--backend qemu`: cold starts per mode of each baseline (libvirt, process).
    baseline_runs: Option<usize>,
    /// With `--backend qemu`: the series to run (all by default).
    series: Vec<SeriesName>,
}

/// One backend and guest that `bench --backend qemu` runs cold starts of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SeriesName {
    /// The unikernel under jitsu-dns's QEMU backend.
    Qemu,
    /// The same, each VM left running until its idle stop: the guests started in the last
    /// seconds run during each cold start.
    QemuCrowd,
    /// The same with `standby=on`.
    Standby,
    /// The unikernel under libvirt (a baseline).
    LibvirtUnikernel,
    /// The Linux guest under libvirt (a baseline).
    LibvirtLinux,
    /// The test guest under the process backend (a baseline).
    Process,
}

impl SeriesName {
    const ALL: [SeriesName; 6] = [
        SeriesName::Qemu,
        SeriesName::QemuCrowd,
        SeriesName::Standby,
        SeriesName::LibvirtUnikernel,
        SeriesName::LibvirtLinux,
        SeriesName::Process,
    ];

    fn parse(s: &str) -> Result<SeriesName> {
        Ok(match s {
            "qemu" => SeriesName::Qemu,
            "qemu-crowd" => SeriesName::QemuCrowd,
            "standby" => SeriesName::Standby,
            "libvirt-unikernel" => SeriesName::LibvirtUnikernel,
            "libvirt-linux" => SeriesName::LibvirtLinux,
            "process" => SeriesName::Process,
            other => bail!(
                "unknown series {other:?}: qemu, qemu-crowd, standby, libvirt-unikernel, libvirt-linux, process"
            ),
        })
    }

    fn baseline(self) -> bool {
        !matches!(
            self,
            SeriesName::Qemu | SeriesName::QemuCrowd | SeriesName::Standby
        )
    }
}

fn parse(args: &[String], default_boots: &[u64], default_runs: usize) -> Result<Args> {
    let mut a = Args {
        runs: default_runs,
        boots: default_boots.to_vec(),
        boots_given: false,
        modes: Mask::ALL.to_vec(),
        arp: false,
        backend: Backend::Process,
        baseline_runs: None,
        series: SeriesName::ALL.to_vec(),
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
                a.boots_given = true;
            }
            "--modes" => {
                a.modes = value()?
                    .split(',')
                    .map(|m| match m.trim() {
                        "none" => Ok(Mask::None),
                        "delay" => Ok(Mask::Delay(100)),
                        "announce" => Ok(Mask::Announce),
                        "synjitsu" => Ok(Mask::Synjitsu),
                        "synjitsu+probe" | "probe" => Ok(Mask::SynjitsuProbe),
                        "tcp" => Ok(Mask::Tcp),
                        other => bail!("unknown mode {other:?}"),
                    })
                    .collect::<Result<_>>()?;
            }
            "--arp" => a.arp = true,
            "--backend" => {
                a.backend = match value()?.as_str() {
                    "process" => Backend::Process,
                    "libvirt" => Backend::Libvirt,
                    "qemu" => Backend::Qemu,
                    other => bail!("unknown backend {other:?}: process, libvirt or qemu"),
                }
            }
            "--guest" => {
                let g = value()?;
                if g != "unikernel" {
                    bail!("unknown guest {g:?}: the QEMU backend's guest is unikernel");
                }
            }
            "--baseline-runs" => {
                a.baseline_runs = Some(value()?.parse().context("--baseline-runs")?);
            }
            "--series" => {
                a.series = value()?
                    .split(',')
                    .map(|v| SeriesName::parse(v.trim()))
                    .collect::<Result<_>>()?;
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

/// The bench's modes: beside synjitsu with the guest's promise to announce itself only once
/// it listens, the same without it (synjitsu probes the port first), so that the gain shows
/// in the same run.
fn with_probe_row(mut modes: Vec<Mask>) -> Vec<Mask> {
    if !modes.contains(&Mask::SynjitsuProbe)
        && let Some(i) = modes.iter().position(|m| *m == Mask::Synjitsu)
    {
        modes.insert(i + 1, Mask::SynjitsuProbe);
    }
    modes
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("demo") => demo(parse(&args[1..], &[500], 1)?),
        Some("bench") => {
            let mut a = parse(&args[1..], &[300, 1500], 20)?;
            a.modes = with_probe_row(a.modes);
            bench(a)
        }
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
    demo_unikernel()?;
    println!("\nEverything the demo created (namespaces, VMs, files) is removed.");
    Ok(())
}

/// The demo's second part: the Rust unikernel under QEMU microvm, started by jitsu-dns
/// itself, with no masking, waiting for its announcement, and synjitsu.
fn demo_unikernel() -> Result<()> {
    let modes = [Mask::None, Mask::Announce, Mask::Synjitsu];
    let vms: Vec<Vm> = modes
        .iter()
        .enumerate()
        .map(|(n, m)| Vm::new(n, *m, Duration::ZERO))
        .collect();
    let opts = Options {
        backend: Backend::Qemu,
        ttl_secs: 2,
        ..Options::default()
    };
    println!(
        "\nThe same with a real VM: the project's Rust unikernel (guest/unikernel) under QEMU microvm\n\
         with TCG, started by jitsu-dns itself (-x qemu: a tap on br0, QEMU, QMP; no libvirt),\n\
         one per mode. It listens a few milliseconds after its entry point and announces itself.\n"
    );
    let stack = Stack::start("demoq", vms.clone(), opts)?;
    let mut rows: Vec<(String, ColdStart)> = Vec::new();
    for vm in &vms {
        let c = stack.cold_start(vm)?;
        rows.push((vm.mask.label(), c));
    }
    println!("{}", table(&rows));
    for (label, c) in &rows {
        if let (Some(exec), Some(listen), Some(g)) =
            (c.query_to_spawn_us, c.spawn_to_listening_us, &c.guest)
        {
            println!(
                "{label:<9} DNS query -> QEMU started {:.1} ms -> guest listening {:.1} ms (of which \
                 firmware {:.1} ms and the guest's own boot {:.1} ms)",
                exec as f64 / 1000.0,
                listen as f64 / 1000.0,
                g.firmware_ms.unwrap_or(f64::NAN),
                g.after_ms
            );
        }
    }
    let took = stack.wait_all_off(Duration::from_secs(120))?;
    let taps = jitsu_tests::unikernel::taps(stack.host.ns())?;
    let qemus = jitsu_tests::unikernel::qemus(stack.host.ns())?;
    println!(
        "\nAll {} unikernels are off {:.1} s after the last page (idle stop at 2 x TTL = {} s): {} QEMU \
         processes and {} tap devices left.",
        vms.len(),
        took.as_secs_f64(),
        2 * stack.options().ttl_secs,
        qemus.len(),
        taps.len()
    );
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
    if a.backend == Backend::Qemu {
        return bench_unikernel(a);
    }
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
            Backend::Qemu | Backend::LibvirtUnikernel => {
                unreachable!("bench_unikernel runs the unikernel")
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
        let warm = warm_fetch(&stack, &vms[*n], &c, &format!("{b} ms"))?;
        results.push((*b, Some(*m), c));
        if let Some(w) = warm {
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
        "\n{:>8} {:<14} {:>4} {:>6} {:>9} {:>10} {:>8} {:>10} {:>8} {:>8} {:>8}",
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
        "{:>8} {:<14} {:>4} {:>6} {:>9} {:>10} {:>8} {:>10} {:>8} {:>8} {:>8}",
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
            let after = sorted(rows.iter().filter_map(|c| after_ms(c, is_warm)));
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
                "{:>8} {:<14} {:>4} {:>6} {:>9} {:>10} {:>8} {:>10} {:>8} {:>8} {:>8}",
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
         synjitsu: held SYNs re-sent at the guest's announcement (announce=listening, kept by the\n\
         guest); synjitsu+probe: without that promise, synjitsu probes the port first.\n\
         Total time {:.0} s.",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// After a synjitsu cold start that got its page, a second fetch by address from the guest
/// that now listens (within its idle time, 2 x TTL, so it still runs): what a connection
/// costs at all, the floor of the cold rows' figure. `what` names the cell in a failure.
fn warm_fetch(stack: &Stack, vm: &Vm, cold: &ColdStart, what: &str) -> Result<Option<ColdStart>> {
    if vm.mask != Mask::Synjitsu || !cold.ok() {
        return Ok(None);
    }
    let w = stack.cached_start(vm)?;
    if let Some(e) = &w.error {
        eprintln!("  {} ({what}, warm): {e}", vm.name);
    }
    Ok(Some(w))
}

/// A row's figure, ms: first byte - listening; for a warm fetch SYN to first byte (the guest
/// listened long before).
fn after_ms(c: &ColdStart, warm: bool) -> Option<f64> {
    let us = if warm {
        c.after_syn_us
    } else {
        c.after_listening_us
    };
    us.map(|us| us as f64 / 1000.0)
}

/// The cold starts of one backend and guest, per mode (`None`: a warm fetch right after a
/// synjitsu cold start, from the guest that now listens).
struct Series {
    label: String,
    backend: Backend,
    results: Vec<(Option<Mask>, ColdStart)>,
}

/// `runs` cold starts per mode of `modes` on `backend` (its guest booting for `boot`, with
/// the process backend), each on a VM of its own, in one stack. Each VM is stopped once
/// measured, so that no other guest of the bench runs during a cold start; with `crowd`, each
/// is left to its idle stop (2 x TTL), and the guests started in the last seconds still run,
/// each woken by every broadcast on the bridge.
#[allow(clippy::too_many_arguments)]
fn run_series(
    label: &str,
    backend: Backend,
    boot: Duration,
    runs: usize,
    modes: &[Mask],
    arp: bool,
    qemu_standby: bool,
    crowd: bool,
) -> Result<Series> {
    let mut vms = Vec::new();
    for _ in 0..runs {
        for m in modes {
            vms.push(Vm::new(vms.len(), *m, boot));
        }
    }
    eprintln!("  {label}: {} cold starts", vms.len());
    let opts = Options {
        client_knows_macs: !arp,
        backend,
        // The idle clock starts when the backend's start returns; a TCG Linux guest sends its
        // first packet seconds later, so a 1 s TTL would stop it as idle before it is up.
        ttl_secs: match backend {
            Backend::Libvirt => 5,
            // libvirt's start returns 0.4 s or more before the guest runs.
            Backend::LibvirtUnikernel => 2,
            _ => 1,
        },
        qemu_standby,
        ..Options::default()
    };
    let stack = Stack::start("bench", vms.clone(), opts)?;
    if qemu_standby {
        // Every VM's standby QEMU is started when jitsu-dns looks it up, and then initializes
        // in the background: let them finish, as they would long before a query on a real
        // host.
        wait_standby(&stack, &vms)?;
        std::thread::sleep(Duration::from_secs(1));
    }
    let mut results = Vec::new();
    let started = Instant::now();
    for (i, vm) in vms.iter().enumerate() {
        let c = stack.cold_start(vm)?;
        if let Some(e) = &c.error {
            eprintln!("  {} ({label}, {}): {e}", vm.name, vm.mask.label());
        }
        let warm = warm_fetch(&stack, vm, &c, label)?;
        results.push((Some(vm.mask), c));
        if let Some(w) = warm {
            results.push((None, w));
        }
        if !crowd {
            // The next cold start on a host where no other guest of the bench runs. A VM
            // that cannot be stopped (still booting after a failed fetch, or failed) is said
            // and left to its idle stop: one failure is a row's `fails`, not the run's end.
            match stack.stop_vm(&vm.name, Duration::from_secs(30)) {
                Ok(()) if qemu_standby => {
                    // Its standby QEMU is started again after the stop, and its record written
                    // at once: let it initialize, as at the start.
                    wait_standby(&stack, std::slice::from_ref(vm))?;
                    std::thread::sleep(Duration::from_secs(1));
                }
                Ok(()) => {}
                Err(e) => eprintln!("  {} ({label}): not stopped: {e}", vm.name),
            }
        }
        if (i + 1) % 20 == 0 {
            eprintln!(
                "  {} of {} done ({:.0} s)",
                i + 1,
                vms.len(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(Series {
        label: label.to_string(),
        backend,
        results,
    })
}

/// Waits until each of `vms` has its standby QEMU (`standby=on`).
fn wait_standby(stack: &Stack, vms: &[Vm]) -> Result<()> {
    let dir = stack.qemu_dir();
    jitsu_tests::wait_until("every VM's standby QEMU", Duration::from_secs(120), || {
        vms.iter()
            .all(|vm| {
                std::fs::read_to_string(dir.join(format!("{}.state", vm.name)))
                    .is_ok_and(|t| t.contains("\nstandby=1\n"))
            })
            .then_some(())
    })
}

/// `bench/cold-start --backend qemu --guest unikernel`: the unikernel under jitsu-dns's QEMU
/// backend, against the Linux guest under libvirt and the test guest under the process
/// backend in the same run, and where the unikernel's time goes.
fn bench_unikernel(a: Args) -> Result<()> {
    let baseline = a.baseline_runs.unwrap_or(a.runs);
    // The process backend's test guest booting about as long as the unikernel's QEMU takes.
    let process_boot = Duration::from_millis(if a.boots_given { a.boots[0] } else { 30 });
    println!(
        "bench/cold-start --backend qemu: {} cold starts per mode of the Rust unikernel under QEMU\n\
         microvm (TCG), started by jitsu-dns itself (-x qemu), as is and with standby=on (a QEMU\n\
         started paused ahead, woken by the query), and {} per mode of the same unikernel and\n\
         of the Linux guest under libvirt (TCG) and of the test guest under the process backend\n\
         (booting {} ms), in this run; both daemons on one bridge, each cold start on a VM of its own,\n\
         stopped once measured (qemu/uk crowd: left to its idle stop, so the guests of the last\n\
         seconds still run); the client {}.\n\
         Times are from the client's capture: its DNS query leaving, the page's first byte\n\
         arriving, the guest's listening (the unikernel's own gratuitous ARP; the Linux guest's\n\
         console line, which trails by 10-20 ms; the test guest's report).",
        a.runs,
        baseline,
        process_boot.as_millis(),
        if a.arp {
            "ARPs for each VM"
        } else {
            "has each VM's MAC cached"
        }
    );
    let process = format!("process/{}ms", process_boot.as_millis());
    let mut all = Vec::new();
    for which in &a.series {
        let crowd = *which == SeriesName::QemuCrowd;
        let (label, backend, boot, standby) = match which {
            SeriesName::Qemu => ("qemu/unikernel", Backend::Qemu, Duration::ZERO, false),
            SeriesName::QemuCrowd => ("qemu/uk crowd", Backend::Qemu, Duration::ZERO, false),
            SeriesName::Standby => ("qemu+standby/uk", Backend::Qemu, Duration::ZERO, true),
            SeriesName::LibvirtUnikernel => (
                "libvirt/unikernel",
                Backend::LibvirtUnikernel,
                Duration::ZERO,
                false,
            ),
            SeriesName::LibvirtLinux => ("libvirt/linux", Backend::Libvirt, Duration::ZERO, false),
            SeriesName::Process => (process.as_str(), Backend::Process, process_boot, false),
        };
        let runs = if which.baseline() { baseline } else { a.runs };
        if runs > 0 {
            all.push(run_series(
                label, backend, boot, runs, &a.modes, a.arp, standby, crowd,
            )?);
        }
    }
    let f = |v: Option<f64>| v.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into());
    println!(
        "\n{:<16} {:<14} {:>4} {:>5} {:>6} {:>4} {:>17} {:>19}",
        "", "", "", "", "", "SYN", "query->1st byte", "1st byte-listening"
    );
    println!(
        "{:<16} {:<14} {:>4} {:>5} {:>6} {:>4} {:>8} {:>8} {:>9} {:>9}",
        "backend/guest",
        "mode",
        "n",
        "fails",
        "1 SYN",
        "rtx",
        "p50 ms",
        "p95 ms",
        "p50 ms",
        "p95 ms"
    );
    for series in &all {
        let warm = series.results.iter().any(|(m, _)| m.is_none());
        let lines = a.modes.iter().map(|m| Some(*m)).chain(warm.then_some(None));
        for m in lines {
            let rows: Vec<&ColdStart> = series
                .results
                .iter()
                .filter(|(rm, _)| *rm == m)
                .map(|(_, c)| c)
                .collect();
            let fails = rows.iter().filter(|c| !c.ok()).count();
            let one_syn = rows.iter().filter(|c| c.ok() && c.syns == 1).count();
            let rtx: u64 = rows.iter().map(|c| c.syn_retransmits).sum();
            let total = sorted(
                rows.iter()
                    .filter_map(|c| c.query_to_first_byte)
                    .map(|d| d.as_secs_f64() * 1000.0),
            );
            let after = sorted(rows.iter().filter_map(|c| after_ms(c, m.is_none())));
            println!(
                "{:<16} {:<14} {:>4} {:>5} {:>6} {:>4} {:>8} {:>8} {:>9} {:>9}",
                series.label,
                m.map_or_else(|| "warm (floor)".into(), Mask::label),
                rows.len(),
                fails,
                format!("{one_syn}/{}", rows.len()),
                rtx,
                f(percentile(&total, 50.0)),
                f(percentile(&total, 95.0)),
                f(percentile(&after, 50.0)),
                f(percentile(&after, 95.0)),
            );
        }
    }
    // Where the unikernel's time goes, per mode (medians).
    println!(
        "\nWhere the unikernel's time goes (medians, ms): DNS query leaving the client -> jitsu-dns\n\
         starts QEMU (with standby=on: wakes the paused QEMU) -> the guest listens (QEMU's own\n\
         start, the firmware, the guest from its entry point, of which virtio-net's set-up) -> the\n\
         page's first byte at the client."
    );
    println!(
        "{:<16} {:<14} {:>11} {:>13} {:>11} {:>9} {:>11} {:>7} {:>15}",
        "",
        "mode",
        "query->exec",
        "exec->listen",
        "QEMU start",
        "firmware",
        "guest boot",
        "virtio",
        "listen->1st byte"
    );
    for (series, m) in all
        .iter()
        .filter(|s| s.backend == Backend::Qemu)
        .flat_map(|s| a.modes.iter().map(move |m| (s, m)))
    {
        let rows: Vec<&ColdStart> = series
            .results
            .iter()
            .filter(|(rm, c)| *rm == Some(*m) && c.ok())
            .map(|(_, c)| c)
            .collect();
        let med = |v: Vec<f64>| percentile(&sorted(v.into_iter()), 50.0);
        let exec = med(rows
            .iter()
            .filter_map(|c| c.query_to_spawn_us)
            .map(|u| u as f64 / 1000.0)
            .collect());
        let listen = med(rows
            .iter()
            .filter_map(|c| c.spawn_to_listening_us)
            .map(|u| u as f64 / 1000.0)
            .collect());
        let qemu = med(rows
            .iter()
            .filter_map(|c| {
                let g = c.guest.as_ref()?;
                Some(c.spawn_to_listening_us? as f64 / 1000.0 - g.after_ms - g.firmware_ms?)
            })
            .collect());
        let firmware = med(rows
            .iter()
            .filter_map(|c| c.guest.as_ref()?.firmware_ms)
            .collect());
        let guest = med(rows
            .iter()
            .filter_map(|c| Some(c.guest.as_ref()?.after_ms))
            .collect());
        let virtio = med(rows
            .iter()
            .filter_map(|c| c.guest.as_ref()?.virtio_ms)
            .collect());
        let after = med(rows
            .iter()
            .filter_map(|c| c.after_listening_us)
            .map(|u| u as f64 / 1000.0)
            .collect());
        println!(
            "{:<16} {:<14} {:>11} {:>13} {:>11} {:>9} {:>11} {:>7} {:>15}",
            series.label,
            m.label(),
            f(exec),
            f(listen),
            f(qemu),
            f(firmware),
            f(guest),
            f(virtio),
            f(after)
        );
    }
    println!(
        "\nfails: connections that got no page. 1 SYN: connections the client completed with its\n\
         first SYN. rtx: the client's SYN retransmissions in all (TcpExtTCPSynRetrans).\n\
         synjitsu: held SYNs re-sent at the guest's announcement (announce=listening), for the\n\
         guests that keep that promise (the unikernel, the test guest; the Linux guest does not:\n\
         its row probes); synjitsu+probe: without the promise, synjitsu probes the port first.\n\
         warm (floor): a second fetch right after each synjitsu cold start, by address, from the\n\
         guest that now listens; its 1st byte-listening columns are SYN to first byte, what a\n\
         connection costs at all: the floor of the cold rows' figure."
    );
    Ok(())
}
