//! Shared by the replay tests: where the fixtures are, and a replay driver that runs the
//! core's timers between frames at the capture's own times.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pcap_file::DataLink;
use pcap_file::pcap::PcapReader;

use shared_proto::{ClientMessage, Event, Handover, Mac, VmIdentity};
use synjitsu::hold::{Config, FrameMeta, Hold, Verdict};

/// The fixture addresses (pcap-fixtures contract).
pub const CLIENT_MAC: &str = "02:77:00:00:01:02";
pub const VM_MAC: &str = "02:77:00:00:01:10";
pub const OWN_MAC: &str = "02:53:59:4a:00:01";

/// The fixtures directory: `pcap-fixtures/` at the repository root, or `$JITSU_FIXTURES`.
pub fn fixtures_dir() -> PathBuf {
    std::env::var_os("JITSU_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../pcap-fixtures"))
}

/// One captured frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Capture time since the Unix epoch.
    pub ts: Duration,
    /// The bytes captured.
    pub data: Vec<u8>,
}

/// Every frame of a classic pcap file of Ethernet frames (`tcpdump -w`), read by `pcap-file`.
pub fn read_pcap(path: &Path) -> Result<Vec<Record>, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut reader = PcapReader::new(file).map_err(|e| e.to_string())?;
    let link = reader.header().datalink;
    if link != DataLink::ETHERNET {
        return Err(format!("link type {link:?} is not Ethernet"));
    }
    let mut out = Vec::new();
    while let Some(packet) = reader.next_packet() {
        let p = packet.map_err(|e| e.to_string())?;
        out.push(Record {
            ts: p.timestamp,
            data: p.data.into_owned(),
        });
    }
    Ok(out)
}

/// Reads a fixture; fails (never skips) naming the file and how to make it.
pub fn fixture(name: &str) -> Vec<Record> {
    let path = fixtures_dir().join(name);
    assert!(
        path.exists(),
        "fixture {} is missing: it belongs in pcap-fixtures/ (made by \
         pcap-fixtures/regenerate.sh, as root)",
        path.display()
    );
    let recs = read_pcap(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(!recs.is_empty(), "{} holds no frame", path.display());
    recs
}

/// Every fixture in the contract.
pub const ALL: [&str; 7] = [
    "curl-syn-v4.pcap",
    "curl-syn-v6.pcap",
    "curl-syn-v4-csum-partial.pcap",
    "garp-arping.pcap",
    "garp-arp-notify.pcap",
    "who-has.pcap",
    "noise.pcap",
];

pub fn www(handover: Handover) -> VmIdentity {
    VmIdentity {
        name: "www".into(),
        mac: VM_MAC.parse().unwrap(),
        ipv4: "10.77.1.10".parse().unwrap(),
        ipv6: Some("fd77:1::10".parse().unwrap()),
        handover,
        port: None,
        announces_listening: false,
    }
}

pub fn core() -> Hold {
    let mut cfg = Config::new(OWN_MAC.parse::<Mac>().unwrap());
    cfg.probe_v4 = Some("10.77.1.250".parse().unwrap());
    cfg.probe_v6 = Some("fd77:1::fa".parse().unwrap());
    cfg.xenstore_off = None;
    Hold::new(cfg)
}

/// Replays records through a core, the capture's timestamps as `now`.
pub struct Replay {
    pub core: Hold,
    pub base: Instant,
    pub first_ts: Duration,
    pub sent: Vec<Vec<u8>>,
    pub events: Vec<Event>,
}

impl Replay {
    /// A core; `now` for the first frame is `base`.
    pub fn new(core: Hold, recs: &[Record]) -> Replay {
        Replay {
            core,
            base: Instant::now(),
            first_ts: recs[0].ts,
            sent: Vec::new(),
            events: Vec::new(),
        }
    }

    pub fn at(&self, ts: Duration) -> Instant {
        self.base + ts.saturating_sub(self.first_ts)
    }

    /// Runs every timer due up to `now`, then drains outputs.
    pub fn advance(&mut self, now: Instant) {
        while let Some(t) = self.core.poll_at() {
            if t > now {
                break;
            }
            self.core.handle_timeout(t);
        }
        self.drain();
    }

    /// Takes every output, acting as the shell: forwarding-table changes complete at once.
    pub fn drain(&mut self) {
        let mut buf = Vec::new();
        loop {
            while self.core.poll_transmit(&mut buf) {
                self.sent.push(std::mem::take(&mut buf));
            }
            while let Some(e) = self.core.poll_event() {
                self.events.push(e);
            }
            while self.core.poll_store().is_some() {}
            let Some(op) = self.core.poll_fdb() else {
                break;
            };
            self.core.on_fdb_done(self.base, op.id);
        }
    }

    pub fn control(&mut self, msg: ClientMessage) {
        let now = self.base;
        self.core.on_control(now, &msg).unwrap();
        self.drain();
    }

    /// Feeds every record; returns the verdicts.
    pub fn run(&mut self, recs: &[Record], meta: FrameMeta) -> Vec<Verdict> {
        let mut verdicts = Vec::new();
        for r in recs {
            let now = self.at(r.ts);
            self.advance(now);
            verdicts.push(self.core.on_frame(now, &r.data, meta));
            self.drain();
        }
        verdicts
    }
}
