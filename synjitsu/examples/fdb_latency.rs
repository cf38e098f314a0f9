//! Times synjitsu's forwarding-table changes against spawning iproute2's `bridge` for the same
//! change: what `bench/fdb-latency` runs inside the namespace it sets up.
//!
//! `fdb_latency BRIDGE PORT [ROUNDS]`: ROUNDS (default 1000) steer/release pairs of one MAC to
//! PORT through [`synjitsu::fdb::Fdb`]; the same through the daemon's forwarding-table thread
//! ([`synjitsu::steering::Steering`]: from the wish handed over to its report back, as the
//! daemon's loop sees it); the release as the loop now makes it itself
//! ([`Steering::release_now`], after a steer through the thread); then ROUNDS/20 of the same
//! pair spawned as
//! `bridge fdb replace|del`. Prints the median and 90th percentile of each, and the ratios.
//! Figures only: it asserts nothing about speed.

use std::process::Command;
use std::time::{Duration, Instant};

use shared_proto::Mac;
use synjitsu::fdb::Fdb;
use synjitsu::hold::{FdbAction, FdbOp};
use synjitsu::port::ifindex_of;
use synjitsu::steering::Steering;
use synjitsu::steering::record::Record;

fn usage() -> ! {
    eprintln!("usage: fdb_latency BRIDGE PORT [ROUNDS]");
    std::process::exit(2)
}

/// (median, 90th percentile).
fn summary(mut d: Vec<Duration>) -> (Duration, Duration) {
    d.sort_unstable();
    (d[d.len() / 2], d[d.len() * 9 / 10])
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn bridge(args: &[&str]) {
    let st = Command::new("bridge")
        .args(args)
        .status()
        .expect("iproute2's bridge runs");
    assert!(st.success(), "bridge {args:?} failed");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(br), Some(port)) = (args.first(), args.get(1)) else {
        usage()
    };
    let rounds: usize = args
        .get(2)
        .map_or(1000, |r| r.parse().unwrap_or_else(|_| usage()));
    let mac = Mac([0x02, 0x77, 0x00, 0x00, 0xfd, 0xb1]);
    let ifindex = |dev: &str| ifindex_of::<u32>(dev).expect("the interface exists");
    let mut fdb = Fdb::open(ifindex(br), ifindex(port)).expect("netlink socket for the bridge");
    let (mut steer, mut release) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        fdb.steer(mac).expect("steer");
        steer.push(t.elapsed());
        let t = Instant::now();
        fdb.release(mac).expect("release");
        release.push(t.elapsed());
    }
    // The same through the thread, one wish at a time, each waited for as the loop does.
    let record = std::env::temp_dir().join(format!("fdb-latency-{}.fdb", std::process::id()));
    let mut steering = Steering::spawn(
        Fdb::open(ifindex(br), ifindex(port)).expect("netlink socket for the bridge"),
        Fdb::open(ifindex(br), ifindex(port)).expect("netlink socket for the bridge"),
        Record::open(&record).expect("a record in the temporary directory"),
        Mac([0x02, 0x77, 0x00, 0x00, 0xfd, 0xb0]),
        Duration::from_secs(3600),
    )
    .expect("the forwarding-table thread");
    // Waited for as the daemon's loop waits: on the thread's notification, in tokio.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let done = steering.done_ready();
    let (mut t_steer, mut t_release) = (Vec::new(), Vec::new());
    for id in 0..rounds as u64 * 2 {
        let action = if id % 2 == 0 {
            FdbAction::Steer
        } else {
            FdbAction::Release
        };
        let vm = "bench".to_string();
        let t = Instant::now();
        steering.want(
            [FdbOp {
                id,
                vm,
                mac,
                action,
            }],
            false,
        );
        rt.block_on(done.notified());
        assert_eq!(steering.done(), [id], "the thread reports each wish");
        match action {
            FdbAction::Steer => t_steer.push(t.elapsed()),
            FdbAction::Release => t_release.push(t.elapsed()),
        }
    }
    // The loop's own release, each after a steer through the thread.
    let mut now_release = Vec::new();
    for n in 0..rounds as u64 {
        let id = rounds as u64 * 2 + n * 2;
        let op = |id, action| FdbOp {
            id,
            vm: "bench".to_string(),
            mac,
            action,
        };
        steering.want([op(id, FdbAction::Steer)], false);
        rt.block_on(done.notified());
        assert_eq!(steering.done(), [id], "the thread reports each wish");
        let release = op(id + 1, FdbAction::Release);
        let t = Instant::now();
        assert!(steering.release_now(&release), "the entry was on the port");
        now_release.push(t.elapsed());
        steering.released(release);
        rt.block_on(done.notified());
        assert_eq!(steering.done(), [id + 1], "the thread is told");
    }
    steering.shutdown();
    let m = mac.to_string();
    let (mut add, mut del) = (Vec::new(), Vec::new());
    for _ in 0..(rounds / 20).max(5) {
        let t = Instant::now();
        bridge(&["fdb", "replace", &m, "dev", port, "master", "static"]);
        add.push(t.elapsed());
        let t = Instant::now();
        bridge(&["fdb", "del", &m, "dev", port, "master", "static"]);
        del.push(t.elapsed());
    }
    let rows = [
        ("netlink steer", summary(steer)),
        ("netlink release", summary(release)),
        ("thread steer", summary(t_steer)),
        ("thread release", summary(t_release)),
        ("loop release", summary(now_release)),
        ("bridge(8) replace", summary(add)),
        ("bridge(8) del", summary(del)),
    ];
    println!("{:<18} {:>10} {:>10}", "change", "median us", "p90 us");
    for (what, (med, p90)) in rows {
        println!("{what:<18} {:>10.1} {:>10.1}", us(med), us(p90));
    }
    let ratio = |a: Duration, b: Duration| b.as_secs_f64() / a.as_secs_f64();
    println!(
        "bridge(8) / netlink: steer x{:.0}, release x{:.0}; bridge(8) / thread: steer x{:.0}, release x{:.0}",
        ratio(rows[0].1.0, rows[5].1.0),
        ratio(rows[1].1.0, rows[6].1.0),
        ratio(rows[2].1.0, rows[5].1.0),
        ratio(rows[3].1.0, rows[6].1.0)
    );
}
