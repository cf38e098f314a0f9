//! The pcap fixtures replayed onto a real bridge with `tcpreplay`, with synjitsu (the real
//! binary, its kernel filter and packet socket) standing in for the fixtures' VM: the second
//! replay of each capture, after the one into the core (synjitsu/tests/fixtures.rs).
//!
//! A replayed frame is sent whole by tcpreplay, so the kernel never marks its checksum as
//! partial: the capture made with offload on arrives with a checksum that really is wrong,
//! and is dropped and counted as such (the real client path, with `CHECKSUM_PARTIAL`, is
//! completed instead: synjitsu_xenstore.rs and synjitsu_handover.rs).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use jitsu_tests::curl::metric_in;
use jitsu_tests::synjitsu::*;
use jitsu_tests::topo::Member;
use jitsu_tests::{repo_root, require_root, require_tool, run, wait_until};
use shared_proto::{ClientMessage, Event, Handover};

fn fixture(name: &str) -> PathBuf {
    let dir = std::env::var_os("JITSU_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("pcap-fixtures"));
    let p = dir.join(name);
    assert!(
        p.exists(),
        "fixture {} is missing: it belongs in pcap-fixtures/ (made by \
         pcap-fixtures/regenerate.sh, as root)",
        p.display()
    );
    p
}

/// `tcpdump -nn -r` of a fixture, one line per frame.
fn listing(name: &str) -> Result<Vec<String>> {
    let out = run(Command::new("tcpdump")
        .args(["-nn", "-r"])
        .arg(fixture(name)))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

fn replay(member: &Member, name: &str) -> Result<()> {
    member
        .ns
        .sh(&format!(
            "tcpreplay -q --topspeed -i eth0 {}",
            fixture(name).display()
        ))
        .with_context(|| format!("replaying {name}"))?;
    Ok(())
}

/// Lines of `lines` that contain `needle`.
fn count(lines: &[String], needle: &str) -> usize {
    lines.iter().filter(|l| l.contains(needle)).count()
}

/// Frames synjitsu received past its kernel filter, whatever became of them.
fn frames_total(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("synjitsu_frames_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Waits until `metric` reaches `want` (the daemon takes frames asynchronously).
fn reaches(synjitsu: &SynjitsuHost, metric: &str, want: f64) -> Result<()> {
    let last = std::cell::Cell::new(0.0);
    wait_until(
        &format!("{metric} = {want}"),
        Duration::from_secs(10),
        || {
            let v = synjitsu.metric(metric).ok()?;
            last.set(v);
            (v == want).then_some(())
        },
    )
    .with_context(|| format!("{metric} is {}", last.get()))
}

fn scenario() -> Result<()> {
    require_root();
    for (t, p) in [
        ("tcpreplay", "tcpreplay"),
        ("tcpdump", "tcpdump"),
        ("curl", "curl"),
    ] {
        require_tool(t, p);
    }
    let synjitsu = SynjitsuHost::start("syr", &[])?;
    // The replay port plays the client (and, last, the guest's own announcements).
    let rp = synjitsu.host.join("rpl", None, &[], true)?;
    let mut ctl = ControlClient::connect(&synjitsu.control)?;
    ctl.sync(&[])?;
    ctl.ok(ClientMessage::Booting {
        vm: www(Handover::Wire),
    })?;
    synjitsu.wait_steered(VM_MAC)?;

    // who-has: every ARP request and solicitation for the VM answered with its MAC.
    let who = listing("who-has.pcap")?;
    let arp_q = count(&who, "ARP, Request who-has 10.77.1.10");
    let ns_q = count(&who, "neighbor solicitation, who has fd77:1::10");
    ensure!(arp_q > 0 && ns_q > 0, "who-has.pcap: {who:?}");
    let cap = Capture::start(&rp.ns, "eth0", synjitsu.host.dir(), "rpl")?;
    replay(&rp, "who-has.pcap")?;
    reaches(
        &synjitsu,
        "synjitsu_arp_sent_total{kind=\"reply\"}",
        arp_q as f64,
    )?;
    reaches(
        &synjitsu,
        "synjitsu_na_sent_total{kind=\"solicited\"}",
        ns_q as f64,
    )?;
    let seen = cap.finish()?;
    let replies = count(&seen, "ARP, Reply 10.77.1.10 is-at 02:77:00:00:01:10");
    let nas = count(&seen, "neighbor advertisement, tgt is fd77:1::10");
    ensure!(
        replies >= arp_q && nas >= ns_q,
        "answers on the wire: {replies} ARP, {nas} NA:\n{}",
        seen.join("\n")
    );

    // curl's SYN and retransmits: held once.
    let syns = count(&listing("curl-syn-v4.pcap")?, "> 10.77.1.10.80: Flags [S],");
    replay(&rp, "curl-syn-v4.pcap")?;
    reaches(&synjitsu, "synjitsu_syns_held_total", 1.0)?;
    reaches(
        &synjitsu,
        "synjitsu_syn_retransmits_deduplicated_total",
        (syns - 1) as f64,
    )?;

    // The offload-on capture, replayed whole: really bad checksums, dropped and counted.
    let partial = count(
        &listing("curl-syn-v4-csum-partial.pcap")?,
        "> 10.77.1.10.80: Flags [S],",
    );
    replay(&rp, "curl-syn-v4-csum-partial.pcap")?;
    reaches(
        &synjitsu,
        "synjitsu_dropped_total{reason=\"bad_checksum\"}",
        partial as f64,
    )?;

    // Noise: nothing held, nothing answered. who-has.pcap replayed after it is a barrier:
    // synjitsu reads its socket in order, so once the barrier's answers are counted, every
    // noise frame that reached it has been judged.
    let before = synjitsu.metrics()?;
    let noise_frames = listing("noise.pcap")?.len();
    replay(&rp, "noise.pcap")?;
    replay(&rp, "who-has.pcap")?;
    reaches(
        &synjitsu,
        "synjitsu_arp_sent_total{kind=\"reply\"}",
        2.0 * arp_q as f64,
    )?;
    reaches(
        &synjitsu,
        "synjitsu_na_sent_total{kind=\"solicited\"}",
        2.0 * ns_q as f64,
    )?;
    let after = synjitsu.metrics()?;
    println!(
        "noise.pcap: {noise_frames} frames replayed, {} reached synjitsu past the bridge and \
         its kernel filter (with the barrier's {} questions)",
        frames_total(&after) - frames_total(&before),
        arp_q + ns_q
    );
    for m in [
        "synjitsu_syns_held_total",
        "synjitsu_syn_retransmits_deduplicated_total",
        "synjitsu_dropped_total{reason=\"bad_checksum\"}",
    ] {
        ensure!(
            metric_in(&before, m) == metric_in(&after, m),
            "{m} moved on noise: {} -> {}",
            metric_in(&before, m),
            metric_in(&after, m)
        );
    }

    // The guest's own gratuitous ARP: synjitsu stops standing in for it.
    replay(&rp, "garp-arping.pcap")?;
    ctl.wait_event(Duration::from_secs(10), "guest_announced", |e| {
        *e == Event::GuestAnnounced { name: "www".into() }
    })?;
    reaches(&synjitsu, "synjitsu_guests_announced_total", 1.0)?;
    Ok(())
}

#[test]
fn fixtures_replayed_onto_a_real_bridge() {
    scenario().unwrap();
}
