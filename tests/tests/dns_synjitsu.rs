//! jitsu-dns's masking with synjitsu, against a fake control server on a real socket with the
//! real codec: the answer waits for synjitsu's acknowledgement (`use_synjitsu`) or for the
//! guest's announcement (`wait_for=announce`); without synjitsu, answers still come after
//! the response delay; every reconnect gets a full `sync`; stops and wake requests flow.

use std::time::{Duration, Instant};

use jitsu_tests::fake_synjitsu::{FakeSynjitsu, Policy};
use jitsu_tests::jitsu_dns::{DnsHarness, assert_history};
use jitsu_tests::{require_root, require_tool, wait_until};
use shared_proto::{ClientMessage, Event, Handover, Mac, Phase};

const LONG: Duration = Duration::from_secs(60);

fn prerequisites() {
    require_root();
    require_tool("dig", "dnsutils");
    require_tool("git", "git");
}

fn spec(h: &DnsHarness, extra: &str) -> String {
    format!(
        "name=www,dns=www.example.org,ip=10.77.0.1,response_delay=0{extra},\
         command='echo $$ >> {}; exec sleep 600'",
        h.host.file("boots").display()
    )
}

/// jitsu-dns with `www` (its spec with `keys`, after the flags `flags`), its synjitsu the fake
/// answering by `policy`.
fn with_fake(tag: &str, policy: Policy, flags: &[&str], keys: &str) -> (DnsHarness, FakeSynjitsu) {
    let mut h = DnsHarness::new(tag).unwrap();
    let fake = FakeSynjitsu::start(&h.host.file("synjitsu.sock"), policy).unwrap();
    let www = spec(&h, keys);
    let mut extra = flags.to_vec();
    extra.extend(["--synjitsu", fake.path().to_str().unwrap(), &www]);
    let args = h.args(None, &extra);
    h.start(&args, &[]).unwrap();
    (h, fake)
}

/// Waits until jitsu-dns has connected and sent its `sync` on connection `conn`.
fn wait_sync(fake: &FakeSynjitsu, conn: u32) -> Vec<shared_proto::VmStatus> {
    wait_until(&format!("a sync on connection {conn}"), LONG, || {
        fake.requests().into_iter().find_map(|r| match r.req.body {
            ClientMessage::Sync { vms } if r.conn == conn => Some(vms),
            _ => None,
        })
    })
    .unwrap()
}

fn boots(h: &DnsHarness) -> usize {
    std::fs::read_to_string(h.host.file("boots"))
        .unwrap_or_default()
        .lines()
        .count()
}

#[test]
fn use_synjitsu_answers_once_synjitsu_acknowledges_booting() {
    prerequisites();
    let ack_after = Duration::from_millis(800);
    let policy = Policy {
        ack_booting_after: ack_after,
        announce_after: None,
    };
    let (h, fake) = with_fake("dsyn", policy, &[], ",use_synjitsu=true");
    let sync = wait_sync(&fake, 1);
    assert_eq!(sync.len(), 1);
    assert_eq!(
        (sync[0].vm.name.as_str(), sync[0].phase),
        ("www", Phase::Stopped)
    );

    let asked = Instant::now();
    let d = h.dig(&["+time=20", "www.example.org", "A"]);
    let answered = Instant::now();
    assert_eq!(d.addresses(), vec!["10.77.0.1"], "{}", d.text);
    let booting: Vec<_> = fake
        .requests()
        .into_iter()
        .filter_map(|r| match r.req.body {
            ClientMessage::Booting { vm } => Some((r.req.id, vm)),
            _ => None,
        })
        .collect();
    assert_eq!(booting.len(), 1, "one booting per boot");
    let (id, vm) = &booting[0];
    assert_eq!(vm.name, "www");
    assert_eq!(vm.mac, Mac::derived_from(b"www"));
    assert_eq!(vm.ipv4.to_string(), "10.77.0.1");
    assert_eq!(vm.handover, Handover::Wire);
    let acks = fake.booting_acks();
    let acked = acks
        .iter()
        .find(|(i, _)| i == id)
        .map(|(_, t)| *t)
        .expect("the booting was acknowledged");
    assert!(
        answered > acked,
        "the answer came after synjitsu's acknowledgement"
    );
    assert!(
        answered - asked >= ack_after,
        "it waited for the ack: {:?}",
        answered - asked
    );
    // The answer may come before the backend finished starting the VM (synjitsu holds its
    // SYNs meanwhile): wait for the command, then make sure it ran once.
    wait_until("the VM's command to start", LONG, || {
        (boots(&h) >= 1).then_some(())
    })
    .unwrap();
    assert_eq!(boots(&h), 1);
}

#[test]
fn wait_for_announce_answers_when_the_guest_announces_itself() {
    prerequisites();
    let announce_after = Duration::from_millis(800);
    let policy = Policy {
        ack_booting_after: Duration::ZERO,
        announce_after: Some(announce_after),
    };
    let keys = ",wait_for=announce,wait_for_timeout=30";
    let (h, fake) = with_fake("dann", policy, &[], keys);
    wait_sync(&fake, 1);
    let asked = Instant::now();
    let d = h.dig(&["+time=20", "www.example.org", "A"]);
    let answered = Instant::now();
    assert_eq!(d.addresses(), vec!["10.77.0.1"], "{}", d.text);
    let announced = fake
        .events_sent()
        .into_iter()
        .find_map(|(t, e)| matches!(e, Event::GuestAnnounced { .. }).then_some(t))
        .expect("the announcement was sent");
    assert!(
        answered > announced,
        "the answer came after the guest's announcement"
    );
    assert!(answered - asked >= announce_after, "{:?}", answered - asked);
    h.wait_state("www", "running", LONG);
    assert_history(
        &h.db(),
        &["www: booting -> running (guest announced itself)"],
    );
}

#[test]
fn without_synjitsu_answers_still_come_after_the_response_delay() {
    prerequisites();
    let mut h = DnsHarness::new("dnosyn").unwrap();
    let missing = h.host.file("nobody-listens.sock");
    let www = "name=www,dns=www.example.org,ip=10.77.0.1,response_delay=0.5,use_synjitsu=true,\
               command='exec sleep 600'";
    let b = "name=b,dns=b.example.org,ip=10.77.0.2,response_delay=0.3,wait_for=announce,\
             wait_for_timeout=60,command='exec sleep 600'";
    let args = h.args(None, &["--synjitsu", missing.to_str().unwrap(), www, b]);
    h.start(&args, &[]).unwrap();
    for (name, delay) in [("www", 500), ("b", 300)] {
        let asked = Instant::now();
        // dig gives up after 20 s: an answer proves no wait for the 60 s timeout.
        let d = h.dig(&["+time=20", &format!("{name}.example.org"), "A"]);
        let took = asked.elapsed();
        assert_eq!(d.status, "NOERROR", "{}", d.text);
        assert_eq!(d.addresses().len(), 1, "{}", d.text);
        assert!(
            took >= Duration::from_millis(delay),
            "{name}: the response delay applies: {took:?}"
        );
    }
    assert!(h.log().contains("synjitsu unreachable"), "{}", h.log());
}

#[test]
fn every_reconnect_resyncs_and_stops_and_wake_requests_flow() {
    prerequisites();
    let (h, fake) = with_fake(
        "dresync",
        Policy::default(),
        &["-t", "1"],
        ",use_synjitsu=true",
    );
    wait_sync(&fake, 1);
    fake.disconnect();
    let again = wait_sync(&fake, 2);
    assert_eq!(again.len(), 1, "a full sync after the reconnect");
    assert_eq!(again[0].phase, Phase::Stopped);

    // A SYN for the stopped VM: synjitsu asks, jitsu-dns boots it.
    fake.send_event(Event::WakeRequest { name: "www".into() })
        .unwrap();
    wait_until("the wake request to boot the VM", LONG, || {
        (boots(&h) == 1).then_some(())
    })
    .unwrap();
    wait_until("a booting request on the new connection", LONG, || {
        fake.requests()
            .iter()
            .any(|r| r.conn == 2 && matches!(r.req.body, ClientMessage::Booting { .. }))
            .then_some(())
    })
    .unwrap();
    h.wait_state("www", "running", LONG);
    // Idle for 2 x TTL: stopped, and synjitsu is told so it can wake it again.
    h.wait_state("www", "off", LONG);
    wait_until("a stopped request", LONG, || {
        fake.requests()
            .iter()
            .any(|r| matches!(&r.req.body, ClientMessage::Stopped { vm } if vm.name == "www"))
            .then_some(())
    })
    .unwrap();
    assert_history(
        &h.db(),
        &["www: off -> booting (wake request from synjitsu)"],
    );
}
