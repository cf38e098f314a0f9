//! Times synjitsu's forwarding-table changes against spawning iproute2's `bridge` for the same
//! change: what `bench/fdb-latency` runs inside the namespace it sets up.
//!
//! `fdb_latency BRIDGE PORT [ROUNDS]`: ROUNDS (default 1000) steer/release pairs of one MAC to
//! PORT through [`synjitsu::fdb::Fdb`], then ROUNDS/20 of the same pair spawned as
//! `bridge fdb replace|del`. Prints the median and 90th percentile of each, and their ratio.
//! Figures only: it asserts nothing about speed.

use std::process::Command;
use std::time::{Duration, Instant};

use shared_proto::Mac;
use synjitsu::fdb::Fdb;
use synjitsu::port::ifindex_of;

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
        ("bridge(8) replace", summary(add)),
        ("bridge(8) del", summary(del)),
    ];
    println!("{:<18} {:>10} {:>10}", "change", "median us", "p90 us");
    for (what, (med, p90)) in rows {
        println!("{what:<18} {:>10.1} {:>10.1}", us(med), us(p90));
    }
    let ratio = |a: Duration, b: Duration| b.as_secs_f64() / a.as_secs_f64();
    println!(
        "bridge(8) / netlink: steer x{:.0}, release x{:.0}",
        ratio(rows[0].1.0, rows[2].1.0),
        ratio(rows[1].1.0, rows[3].1.0)
    );
}
