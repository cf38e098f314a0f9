//! `jitsu-boots`: the timing program of `bench/boots`. How fast one jitsu-dns binary boots
//! process-backend VMs, in network namespaces it creates and removes.
//!
//! `jitsu-boots run <jitsu-dns> <label> <vms> <singles>`: a host namespace with `br0`, and
//! jitsu-dns (the binary given) with `singles + vms` VMs, each `exec sleep infinity` with
//! `response_delay = 0` and the backend's default `ifup = jitsu`, TTL one hour (no idle stop
//! during the run). Then, from inside the namespace (`measure`, run through `ip netns exec`):
//! - `singles` cold VMs queried one after the other: the query-to-answer time of a cold VM
//!   with nothing else booting;
//! - `vms` cold VMs queried at once (one UDP query each, from one socket): the time to each
//!   answer, boots a second (`vms` / the time to the last answer), when jitsu-dns's
//!   `vms_running` gauge counts them all, when the store's history has every
//!   `booting -> running` (polled with `git log` every 50 ms), and the largest
//!   `state_store_lag_seconds` scraped (every 20 ms).
//!
//! Prints one line of `key=value` figures, after the label. With `JITSU_BOOTS_LOG=<file>`,
//! jitsu-dns's log is kept there (with `RUST_LOG` set for its debug lines, for profiling).

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use jitsu_tests::jitsu_dns::{DnsHarness, start_command, store_log};

const METRICS: &str = "127.0.0.1:9153";
const USAGE: &str = "usage: jitsu-boots run <jitsu-dns> <label> <vms> <singles>\n       \
                     jitsu-boots measure <db> <vms> <singles>";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize| -> Result<usize> {
        args.get(i)
            .context(USAGE)?
            .parse()
            .with_context(|| format!("{USAGE}\nnot a number: {:?}", args[i]))
    };
    match args.first().map(String::as_str) {
        Some("run") => run(
            Path::new(args.get(1).context(USAGE)?),
            args.get(2).context(USAGE)?,
            num(3)?,
            num(4)?,
        ),
        Some("measure") => measure(Path::new(args.get(1).context(USAGE)?), num(2)?, num(3)?),
        _ => bail!("{USAGE}"),
    }
}

fn name(i: usize) -> String {
    format!("b{i}")
}

fn run(jitsu_dns: &Path, label: &str, vms: usize, singles: usize) -> Result<()> {
    let mut h = DnsHarness::new("boots")?;
    let total = vms + singles;
    let mut config = String::new();
    for i in 0..total {
        config.push_str(&format!(
            "[[vm]]\nname = \"{n}\"\ndns = [\"{n}.example.org\"]\nip = \"10.77.{}.{}/16\"\n\
             response_delay = 0\ncommand = \"exec sleep infinity\"\n\n",
            1 + i / 200,
            10 + i % 200,
            n = name(i),
        ));
    }
    let cfg = h.host.file("boots.toml");
    std::fs::write(&cfg, config)?;
    let db = h.db();
    let mut cmd = h.host.ns().command(jitsu_dns);
    cmd.args(["-b", "127.0.0.1", "-l", "53", "-f", "0.0.0.0", "-t", "3600"])
        .args(["--log-level", "info", "--metrics", METRICS])
        .arg("-c")
        .arg(h.vms.uri(None))
        .arg("--persistdb")
        .arg(&db)
        .arg("--config")
        .arg(&cfg);
    h.daemon = Some(start_command(
        &h.host,
        cmd,
        &["@127.0.0.1", "jitsu-test-probe.invalid"],
        "status: ",
    )?);
    let me = std::env::current_exe()?;
    let out = Command::new("ip")
        .args(["netns", "exec", h.host.ns().name()])
        .arg(me)
        .arg("measure")
        .arg(&db)
        .args([vms.to_string(), singles.to_string()])
        .stderr(std::process::Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!(
            "measure failed: {}\n--- jitsu-dns ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            h.log()
        );
    }
    print!("{label:<22} {}", String::from_utf8_lossy(&out.stdout));
    // For profiling: jitsu-dns's log kept (run with RUST_LOG for its debug lines).
    if let Some(path) = std::env::var_os("JITSU_BOOTS_LOG") {
        std::fs::write(&path, h.log()).with_context(|| format!("writing {path:?}"))?;
    }
    Ok(())
}

/// A query for `name` A with id `id`.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    // Recursion desired off, one question.
    q.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// The id of an answer with an address (NOERROR, at least one answer record), if it is one.
fn answered(buf: &[u8]) -> Option<u16> {
    (buf.len() >= 12 && buf[3] & 0x0f == 0 && u16::from_be_bytes([buf[6], buf[7]]) > 0)
        .then(|| u16::from_be_bytes([buf[0], buf[1]]))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One scrape of jitsu-dns's metrics: (`vms_running`, `state_store_lag_seconds`).
fn scrape() -> Option<(f64, f64)> {
    let mut s = TcpStream::connect(METRICS).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let value = |metric: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == metric).then(|| v.trim().parse::<f64>().ok())?
        })
    };
    Some((
        value("jitsu_dns_vms_running")?,
        value("jitsu_dns_state_store_lag_seconds").unwrap_or(0.0),
    ))
}

/// VMs the store's history shows as having gone `booting -> running`.
fn recorded_running(db: &Path) -> usize {
    store_log(db)
        .iter()
        .filter(|l| l.contains(": booting -> running"))
        .count()
}

fn measure(db: &Path, vms: usize, singles: usize) -> Result<()> {
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.connect("127.0.0.1:53")?;
    sock.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut buf = [0u8; 1500];
    let mut wait_answer = |id: u16| -> Result<()> {
        loop {
            let n = match sock.recv(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("no answer within 30 s"),
            };
            if answered(&buf[..n]) == Some(id) {
                return Ok(());
            }
        }
    };
    // Cold VMs one after the other.
    let mut single = Vec::new();
    for i in 0..singles {
        let t = Instant::now();
        sock.send(&query(i as u16, &format!("{}.example.org", name(i))))?;
        wait_answer(i as u16)?;
        single.push(ms(t.elapsed()));
    }
    single.sort_by(f64::total_cmp);

    // Then `vms` at once, watched from two threads.
    let total = vms + singles;
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let gauge = {
        let stop = stop.clone();
        thread::spawn(move || {
            let (mut all_running, mut max_lag) = (None, 0.0f64);
            while !stop.load(Ordering::Relaxed) {
                if let Some((running, lag)) = scrape() {
                    max_lag = max_lag.max(lag);
                    if all_running.is_none() && running as usize >= total {
                        all_running = Some(t0.elapsed());
                    }
                }
                thread::sleep(Duration::from_millis(20));
            }
            (all_running, max_lag)
        })
    };
    let store = {
        let (stop, db) = (stop.clone(), PathBuf::from(db));
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if recorded_running(&db) >= total {
                    return Some(t0.elapsed());
                }
                thread::sleep(Duration::from_millis(50));
            }
            None
        })
    };
    let mut sent = Vec::with_capacity(vms);
    for i in singles..total {
        sock.send(&query(i as u16, &format!("{}.example.org", name(i))))?;
        sent.push(t0.elapsed());
    }
    let mut at: Vec<Option<Duration>> = vec![None; vms];
    let mut left = vms;
    while left > 0 {
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("jitsu-boots: {left} of {vms} unanswered: {e}");
                break;
            }
        };
        if let Some(id) = answered(&buf[..n]) {
            let i = usize::from(id).wrapping_sub(singles);
            if let Some(slot) = at.get_mut(i).filter(|s| s.is_none()) {
                *slot = Some(t0.elapsed());
                left -= 1;
            }
        }
    }
    // The store has a minute to catch up.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !store.is_finished() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let (all_running, max_lag) = gauge.join().expect("the scraper does not panic");
    let recorded = store.join().expect("the git poller does not panic");

    let mut lat: Vec<f64> = at
        .iter()
        .zip(&sent)
        .filter_map(|(a, s)| a.map(|a| ms(a - *s)))
        .collect();
    lat.sort_by(f64::total_cmp);
    let last = at.iter().flatten().max().copied();
    let f = |d: Option<Duration>| {
        d.map(|d| format!("{:.2}", d.as_secs_f64()))
            .unwrap_or("-".into())
    };
    println!(
        "cold_p50_ms={:.1} cold_p95_ms={:.1} answered={}/{vms} burst_p50_ms={:.0} last_answer_s={} \
         boots_per_s={:.0} all_running_s={} all_recorded_s={} store_behind_s={} max_store_lag_s={max_lag:.2}",
        percentile(&single, 50.0),
        percentile(&single, 95.0),
        vms - left,
        percentile(&lat, 50.0),
        f(last),
        last.map(|l| vms as f64 / l.as_secs_f64()).unwrap_or(0.0),
        f(all_running),
        f(recorded),
        match (recorded, all_running) {
            (Some(r), Some(a)) => format!("{:.2}", r.as_secs_f64() - a.as_secs_f64()),
            _ => "-".into(),
        },
    );
    Ok(())
}
