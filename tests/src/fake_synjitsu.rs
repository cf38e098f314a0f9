//! A stand-in for synjitsu's control server, for testing its clients: a real Unix socket and
//! the real `shared-proto` codec, with scripted answers. It records every request (with when
//! it arrived and on which connection), answers `hello`, acknowledges everything, delays the
//! `booting` acknowledgement and sends `guest_announced` when told to, and can send events or
//! drop the connection on demand. It does nothing on any bridge: the real synjitsu is
//! issue 3's, and the two meet in issue 5's tests.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use shared_proto::{
    ClientMessage, Event, FrameReader, PROTOCOL_VERSION, Reply, Request, ServerCodec, ServerMessage,
};

/// How the fake answers `booting`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Policy {
    /// Acknowledge `booting` after this long.
    pub ack_booting_after: Duration,
    /// Send `guest_announced` this long after `booting`, if set.
    pub announce_after: Option<Duration>,
}

/// A request as received.
#[derive(Debug, Clone)]
pub struct Received {
    /// When it was decoded.
    pub at: Instant,
    /// 1 for the first connection, 2 for the next...
    pub conn: u32,
    /// The request.
    pub req: Request,
}

#[derive(Debug, Default)]
struct Log {
    requests: Vec<Received>,
    /// (request id, when the ack was written) for `booting`.
    booting_acks: Vec<(u64, Instant)>,
    /// Events written, with when.
    events: Vec<(Instant, Event)>,
    connections: u32,
}

/// The running fake; stops and removes its socket when dropped.
#[derive(Debug)]
pub struct FakeSynjitsu {
    path: PathBuf,
    log: Arc<Mutex<Log>>,
    current: Arc<Mutex<Option<UnixStream>>>,
    stop: Arc<AtomicBool>,
    accept: Option<thread::JoinHandle<()>>,
}

fn write_msg(conn: &Mutex<Option<UnixStream>>, msg: &ServerMessage) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    ServerCodec::new()
        .encode_item(msg, &mut buf)
        .map_err(std::io::Error::other)?;
    match conn.lock().expect("lock").as_mut() {
        Some(s) => s.write_all(&buf),
        None => Err(std::io::Error::new(
            std::io::ErrorKind::NotConnected,
            "no client",
        )),
    }
}

impl FakeSynjitsu {
    /// Listens on `path`.
    pub fn start(path: &Path, policy: Policy) -> std::io::Result<FakeSynjitsu> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        let log = Arc::new(Mutex::new(Log::default()));
        let current: Arc<Mutex<Option<UnixStream>>> = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, c, s) = (log.clone(), current.clone(), stop.clone());
        let accept = thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let stream = match listener.accept() {
                    Ok((st, _)) => st,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    Err(_) => continue,
                };
                let _ = stream.set_nonblocking(false);
                let conn = {
                    let mut g = l.lock().expect("lock");
                    g.connections += 1;
                    g.connections
                };
                if let Ok(w) = stream.try_clone() {
                    *c.lock().expect("lock") = Some(w);
                }
                let (l2, c2) = (l.clone(), c.clone());
                thread::spawn(move || serve(conn, stream, policy, &l2, &c2));
            }
        });
        Ok(FakeSynjitsu {
            path: path.to_path_buf(),
            log,
            current,
            stop,
            accept: Some(accept),
        })
    }

    /// The socket, for `--synjitsu`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Received> {
        self.log.lock().expect("lock").requests.clone()
    }

    /// When each `booting` was acknowledged: (request id, instant the ack was written).
    pub fn booting_acks(&self) -> Vec<(u64, Instant)> {
        self.log.lock().expect("lock").booting_acks.clone()
    }

    /// Events sent so far, with when.
    pub fn events_sent(&self) -> Vec<(Instant, Event)> {
        self.log.lock().expect("lock").events.clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u32 {
        self.log.lock().expect("lock").connections
    }

    /// Sends an event on the current connection.
    pub fn send_event(&self, event: Event) -> std::io::Result<()> {
        let at = Instant::now();
        write_msg(
            &self.current,
            &ServerMessage::Event {
                event: event.clone(),
            },
        )?;
        self.log.lock().expect("lock").events.push((at, event));
        Ok(())
    }

    /// Closes the current connection.
    pub fn disconnect(&self) {
        if let Some(s) = self.current.lock().expect("lock").take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for FakeSynjitsu {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        self.disconnect();
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(
    conn: u32,
    stream: UnixStream,
    policy: Policy,
    log: &Arc<Mutex<Log>>,
    current: &Arc<Mutex<Option<UnixStream>>>,
) {
    let mut requests = FrameReader::<_, Request>::new(stream);
    // The fake's clients speak correctly: anything else, or the end, ends the connection.
    while let Ok(Some(Ok(req))) = requests.read() {
        log.lock().expect("lock").requests.push(Received {
            at: Instant::now(),
            conn,
            req: req.clone(),
        });
        let id = req.id;
        match req.body {
            ClientMessage::Hello { .. } => {
                let _ = write_msg(
                    current,
                    &ServerMessage::Ok {
                        id,
                        reply: Reply::Hello {
                            version: PROTOCOL_VERSION,
                            server: "fake synjitsu".into(),
                        },
                    },
                );
            }
            ClientMessage::Booting { vm } => {
                let (log, current) = (log.clone(), current.clone());
                // The delays are the fake's script (a slow synjitsu, a guest that takes its
                // time), not a test waiting for something.
                thread::spawn(move || {
                    thread::sleep(policy.ack_booting_after);
                    let at = Instant::now();
                    if write_msg(
                        &current,
                        &ServerMessage::Ok {
                            id,
                            reply: Reply::Ack,
                        },
                    )
                    .is_ok()
                    {
                        log.lock().expect("lock").booting_acks.push((id, at));
                    }
                    if let Some(after) = policy.announce_after {
                        thread::sleep(after.saturating_sub(policy.ack_booting_after));
                        let event = Event::GuestAnnounced { name: vm.name };
                        let at = Instant::now();
                        if write_msg(
                            &current,
                            &ServerMessage::Event {
                                event: event.clone(),
                            },
                        )
                        .is_ok()
                        {
                            log.lock().expect("lock").events.push((at, event));
                        }
                    }
                });
            }
            _ => {
                let _ = write_msg(
                    current,
                    &ServerMessage::Ok {
                        id,
                        reply: Reply::Ack,
                    },
                );
            }
        }
    }
}
