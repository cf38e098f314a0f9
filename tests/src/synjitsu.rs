//! Support for synjitsu's end-to-end tests: a host namespace with `br0` and synjitsu on it,
//! a control client that plays jitsu-dns over the real socket, metrics scraped with curl.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use shared_proto::codec;
use shared_proto::{
    ClientCodec, ClientMessage, Event, FrameReader, Handover, PROTOCOL_VERSION, Phase, Request,
    ServerMessage, StreamError, VmIdentity, VmStatus,
};

use crate::curl::metric_in;
use crate::topo::{BRIDGE, Daemon, Host};
use crate::{bin_path, unique, wait_until};

/// The guest's MAC in every synjitsu test.
pub const VM_MAC: &str = "02:77:00:00:01:10";
/// The client's MAC.
pub const CLIENT_MAC: &str = "02:77:00:00:01:02";
/// synjitsu's IPv4 probe address.
pub const PROBE_V4: &str = "10.77.1.250";
/// synjitsu's IPv6 probe address.
pub const PROBE_V6: &str = "fd77:1::fa";
/// Where synjitsu serves metrics inside the host namespace.
pub const METRICS: &str = "127.0.0.1:9477";

/// Starts synjitsu on `host`'s `br0` with its control socket at `control` and the other
/// flags `args`, and waits up to `timeout` for the socket (a stale one is removed first).
pub fn start(host: &Host, control: &Path, args: &[&str], timeout: Duration) -> Result<Daemon> {
    let _ = std::fs::remove_file(control);
    let control_s = control.display().to_string();
    let mut all = vec!["--bridge", BRIDGE, "--control", &control_s];
    all.extend_from_slice(args);
    let mut d = host.spawn(bin_path("synjitsu"), &all)?;
    wait_until("synjitsu's control socket", timeout, || {
        control.exists().then_some(())
    })
    .with_context(|| format!("synjitsu's log:\n{}", d.log()))?;
    d.check_running()?;
    Ok(d)
}

/// The test VM `www`.
pub fn www(handover: Handover) -> VmIdentity {
    VmIdentity {
        name: "www".into(),
        mac: VM_MAC.parse().expect("a valid MAC"),
        ipv4: "10.77.1.10".parse().expect("a valid address"),
        ipv6: Some("fd77:1::10".parse().expect("a valid address")),
        handover,
        port: None,
        announces_listening: false,
    }
}

/// The guest's web root in `host`'s directory, its `index.html` saying `text`.
pub fn guest_page(host: &Host, text: &str) -> Result<PathBuf> {
    let dir = host.file("www");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("index.html"), text)?;
    Ok(dir)
}

/// The bridge side of synjitsu's port on `br0`.
pub const SYJ_PORT: &str = "syj-br0-p";

/// The `i`th VM of a large fleet (`i` below 10,000): named `v<i>`, MAC `02:78:00:00:<i>`,
/// address 10.77.100.1 on, 250 to a /24; none of them the one VM of the other tests.
pub fn fleet_vm(i: usize) -> VmIdentity {
    assert!(i < 10_000, "the fleet's addresses stop at 10.77.139.250");
    VmIdentity {
        name: format!("v{i}"),
        mac: shared_proto::Mac([0x02, 0x78, 0, 0, (i >> 8) as u8, i as u8]),
        ipv4: std::net::Ipv4Addr::new(10, 77, 100 + (i / 250) as u8, 1 + (i % 250) as u8),
        ipv6: None,
        handover: Handover::Wire,
        port: None,
        announces_listening: false,
    }
}

/// A host with synjitsu running on its bridge. Dropped in order: synjitsu, the host.
#[derive(Debug)]
pub struct SynjitsuHost {
    /// The daemon.
    pub daemon: Daemon,
    /// The control socket.
    pub control: PathBuf,
    /// The bridge, its namespace and the directory of logs, sockets and captures.
    pub host: Host,
    /// The flags it was started with, to start it again the same way.
    args: Vec<String>,
}

impl SynjitsuHost {
    /// Starts synjitsu on a new bridge with probe addresses and metrics, Xenstore off and
    /// debug logs; `extra` flags are appended (e.g. `--xenstore <socket>`, `--log-level info`:
    /// these two replace the defaults).
    pub fn start(tag: &str, extra: &[&str]) -> Result<SynjitsuHost> {
        let host = Host::new(tag)?;
        let control = host.file("synjitsu.sock");
        let mut args = vec![
            "--probe-ip",
            PROBE_V4,
            "--probe-ip",
            PROBE_V6,
            "--metrics",
            METRICS,
        ];
        // Defaults the caller may replace.
        for (flag, value) in [("--xenstore", "off"), ("--log-level", "debug")] {
            if !extra.contains(&flag) {
                args.extend([flag, value]);
            }
        }
        args.extend_from_slice(extra);
        let daemon = start(&host, &control, &args, Duration::from_secs(20))?;
        Ok(SynjitsuHost {
            daemon,
            control,
            host,
            args: args.iter().map(|a| a.to_string()).collect(),
        })
    }

    /// Starts synjitsu again with the same flags, once the earlier one has exited (killed
    /// or stopped by the test).
    pub fn restart(&mut self) -> Result<()> {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.daemon = start(&self.host, &self.control, &args, Duration::from_secs(20))?;
        Ok(())
    }

    /// synjitsu's own MAC on the bridge (the inner end of its port, which it sends from).
    pub fn own_mac(&self) -> Result<String> {
        let mac = self.host.ns().sh("cat /sys/class/net/syj-br0/address")?;
        Ok(mac.trim().to_string())
    }

    /// Waits until the bridge steers `mac` to synjitsu's port with a static entry.
    pub fn wait_steered(&self, mac: &str) -> Result<()> {
        wait_until(
            &format!("{mac} steered to synjitsu"),
            Duration::from_secs(10),
            || {
                self.host
                    .fdb()
                    .ok()?
                    .iter()
                    .any(|e| e.mac == mac && e.is_static && e.port == SYJ_PORT)
                    .then_some(())
            },
        )
    }

    /// The metrics text, scraped with curl inside the host namespace.
    pub fn metrics(&self) -> Result<String> {
        crate::curl::metrics(self.host.ns(), METRICS)
    }

    /// One sample's value (`name` with its labels, exactly as printed); 0 if absent.
    pub fn metric(&self, name: &str) -> Result<f64> {
        let text = self.metrics()?;
        Ok(metric_in(&text, name))
    }

    /// Stops synjitsu with SIGTERM; returns its exit code.
    pub fn stop(&mut self) -> Result<Option<i32>> {
        self.daemon.stop(Duration::from_secs(20))
    }
}

/// A control-socket client playing jitsu-dns.
#[derive(Debug)]
pub struct ControlClient {
    /// The connection, read through the codec's blocking reader.
    conn: FrameReader<UnixStream, ServerMessage>,
    next_id: u64,
    /// Events received while waiting for answers.
    pub events: Vec<Event>,
}

impl ControlClient {
    /// Connects (retrying until the socket accepts, up to 20 s) and says hello.
    pub fn connect(path: &Path) -> Result<ControlClient> {
        let stream = wait_until(
            "the control socket to accept",
            Duration::from_secs(20),
            || UnixStream::connect(path).ok(),
        )?;
        stream.set_read_timeout(Some(Duration::from_millis(100)))?;
        let mut c = ControlClient {
            conn: FrameReader::new(stream),
            next_id: 1,
            events: Vec::new(),
        };
        match c.request(ClientMessage::Hello {
            version: PROTOCOL_VERSION,
            client: "jitsu-tests".into(),
        })? {
            ServerMessage::Ok { .. } => Ok(c),
            other => bail!("hello refused: {other:?}"),
        }
    }

    /// Sends raw bytes (for malformed-frame tests).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.conn.get_mut().write_all(bytes)?;
        Ok(())
    }

    /// Sends one frame with `payload`.
    pub fn send_payload(&mut self, payload: &[u8]) -> Result<()> {
        let mut b = BytesMut::new();
        codec::encode_payload(payload, &mut b)?;
        self.send_raw(&b)
    }

    /// Reads the next message, up to `timeout`; `Ok(None)` if the server closed.
    pub fn next_message(&mut self, timeout: Duration) -> Result<Option<ServerMessage>> {
        // Each read blocks up to the socket's read timeout (100 ms); what it read is kept.
        wait_until("a message from synjitsu", timeout, || {
            match self.conn.read() {
                Ok(Some(Ok(m))) => Some(Ok(Some(m))),
                Ok(Some(Err(e))) => Some(Err(e.into())),
                Ok(None) => Some(Ok(None)),
                Err(StreamError::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    None
                }
                Err(e) => Some(Err(e.into())),
            }
        })?
    }

    /// Reads until the answer to request `id` (keeping events).
    pub fn answer(&mut self, id: u64) -> Result<ServerMessage> {
        loop {
            match self.next_message(Duration::from_secs(10))? {
                Some(ServerMessage::Event { event }) => self.events.push(event),
                Some(
                    m @ (ServerMessage::Ok { id: i, .. } | ServerMessage::Error { id: i, .. }),
                ) if i == id || i == 0 => {
                    return Ok(m);
                }
                Some(other) => bail!("unexpected answer {other:?} while waiting for {id}"),
                None => bail!("synjitsu closed the control connection"),
            }
        }
    }

    /// Sends a request and returns its answer.
    pub fn request(&mut self, body: ClientMessage) -> Result<ServerMessage> {
        let id = self.next_id;
        self.next_id += 1;
        let mut b = BytesMut::new();
        ClientCodec::new().encode_item(&Request { id, body }, &mut b)?;
        self.send_raw(&b)?;
        self.answer(id)
    }

    /// Sends every request at once, as fast as the socket takes them (a writer thread), while
    /// reading the answers here; returns them in the order of the requests.
    pub fn pipeline(&mut self, bodies: Vec<ClientMessage>) -> Result<Vec<ServerMessage>> {
        let first = self.next_id;
        let mut bytes = BytesMut::new();
        for body in bodies {
            let id = self.next_id;
            self.next_id += 1;
            ClientCodec::new().encode_item(&Request { id, body }, &mut bytes)?;
        }
        let mut w = self.conn.get_mut().try_clone()?;
        let writer = std::thread::spawn(move || w.write_all(&bytes));
        let answers = (first..self.next_id).map(|id| self.answer(id)).collect();
        writer
            .join()
            .map_err(|_| anyhow::anyhow!("the writer thread panicked"))??;
        answers
    }

    /// Sends a request that must succeed.
    pub fn ok(&mut self, body: ClientMessage) -> Result<()> {
        match self.request(body)? {
            ServerMessage::Ok { .. } => Ok(()),
            other => bail!("request refused: {other:?}"),
        }
    }

    /// `Sync` with one VM in one phase (or none).
    pub fn sync(&mut self, vms: &[(VmIdentity, Phase)]) -> Result<()> {
        self.ok(ClientMessage::Sync {
            vms: vms
                .iter()
                .map(|(vm, phase)| VmStatus {
                    vm: vm.clone(),
                    phase: *phase,
                })
                .collect(),
        })
    }

    /// Waits for an event matching `pred` (already received ones count), up to `timeout`.
    pub fn wait_event(
        &mut self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Event) -> bool,
    ) -> Result<Event> {
        let got = wait_until(&format!("a {what} event"), timeout, || {
            if let Some(i) = self.events.iter().position(&pred) {
                return Some(Ok(self.events.remove(i)));
            }
            match self.next_message(Duration::from_millis(200)) {
                Ok(Some(ServerMessage::Event { event })) => {
                    self.events.push(event);
                    None
                }
                Ok(Some(other)) => Some(Err(anyhow::anyhow!(
                    "unexpected {other:?} while waiting for {what}"
                ))),
                Ok(None) => Some(Err(anyhow::anyhow!(
                    "synjitsu closed the control connection"
                ))),
                Err(_) => None,
            }
        });
        got.with_context(|| format!("events received: {:?}", self.events))?
    }
}

/// A tcpdump capture in a namespace, written to a file; stopped (and flushed) on `finish`.
#[derive(Debug)]
pub struct Capture {
    child: std::process::Child,
    /// The pcap file.
    pub file: PathBuf,
    err: PathBuf,
}

impl Capture {
    /// Starts `tcpdump -i <ifname>` in `ns`, and waits until it listens.
    pub fn start(ns: &crate::Netns, ifname: &str, dir: &Path, tag: &str) -> Result<Capture> {
        let file = dir.join(format!("{}.pcap", unique(tag)));
        let err = dir.join(format!("{}.tcpdump.log", unique(tag)));
        let child = ns
            .command("tcpdump")
            // Headers only (-s), and a ring that holds thousands of them (-B, KiB): with the
            // full snapshot length the default 2 MiB ring holds a few frames, and a burst
            // while tcpdump waits for a CPU was dropped by the kernel.
            .args([
                "--immediate-mode",
                "-U",
                "-n",
                "-s",
                "512",
                "-B",
                "8192",
                "-i",
                ifname,
                "-w",
            ])
            .arg(&file)
            .stderr(std::fs::File::create(&err)?)
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("starting tcpdump")?;
        let e = err.clone();
        wait_until("tcpdump to listen", Duration::from_secs(20), || {
            std::fs::read_to_string(&e)
                .ok()
                .filter(|s| s.contains("listening on"))
        })?;
        Ok(Capture { child, file, err })
    }

    /// Stops the capture and returns `tcpdump -nn -tt -r` of it, one line per frame (each
    /// starting with its capture time in seconds since the epoch).
    pub fn finish(mut self) -> Result<Vec<String>> {
        crate::run(
            std::process::Command::new("kill").args(["-INT", &self.child.id().to_string()]),
        )?;
        let _ = self.child.wait();
        let out = crate::run(
            std::process::Command::new("tcpdump")
                .args(["-nn", "-tt", "-r"])
                .arg(&self.file),
        )?;
        // A capture that lost frames would miscount SYNs and miss first bytes.
        let stats = std::fs::read_to_string(&self.err).unwrap_or_default();
        let dropped: u64 = stats
            .lines()
            .find_map(|l| l.strip_suffix(" packets dropped by kernel"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        if dropped > 0 {
            bail!(
                "tcpdump's kernel ring dropped {dropped} frames of {}; its report:\n{stats}",
                self.file.display()
            );
        }
        let _ = std::fs::remove_file(&self.err);
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
