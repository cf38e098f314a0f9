//! The connection to libvirt, shared by every blocking caller (libvirt connections are
//! thread-safe): opened on demand, with keepalives and a close callback; after a loss, the
//! next call opens a new one and is retried once, a reconnect thread reopens it at once when
//! events are subscribed, and every known VM's current state is pushed again, since events
//! were lost in between. Also libvirt's event loop, started once per process.
//!
//! What to do with a domain is the backend's ([`super`]); what events mean is
//! [`super::lifecycle`]'s.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once, mpsc};
use std::time::Duration;

use virt::connect::Connect;
use virt::sys;

use super::lifecycle::{event_words, observed_from_event};
use super::xml::Hypervisor;
use super::{LibvirtBackend, LibvirtUri, state_of};
use crate::backend::{BackendError, EventSink, LifecycleEvent};
use crate::config::VmConfig;
use crate::fleet::Observed;
use crate::sys::libvirt::{
    CloseRegistration, LifecycleRegistration, RawLifecycle, register_close, register_lifecycle,
};

/// Reconnect attempts after a lost connection: first after this, then doubling...
const RECONNECT_FIRST: Duration = Duration::from_millis(200);
/// ...up to this.
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// Keepalive: a probe every 5 s, the connection is dead after 3 unanswered ones.
const KEEPALIVE_INTERVAL: i32 = 5;
const KEEPALIVE_COUNT: u32 = 3;

/// True for errors that mean the connection is gone (libvirtd exited, socket closed).
pub(super) fn connection_lost(e: &virt::error::Error) -> bool {
    let code = e.code().to_raw();
    let domain = e.domain().to_raw();
    domain == sys::VIR_FROM_RPC
        || matches!(
            code,
            sys::VIR_ERR_SYSTEM_ERROR
                | sys::VIR_ERR_RPC
                | sys::VIR_ERR_NO_CONNECT
                | sys::VIR_ERR_INVALID_CONN
        )
}

pub(super) fn no_domain(e: &virt::error::Error) -> bool {
    e.code().to_raw() == sys::VIR_ERR_NO_DOMAIN
}

/// An open connection and what is registered on it.
#[derive(Debug)]
pub(super) struct Session {
    // Field order is drop order: the registrations (each holding a reference of its own to
    // the connection) go first.
    lifecycle: Mutex<Option<LifecycleRegistration>>,
    _close: Option<CloseRegistration>,
    pub(super) conn: Connect,
    pub(super) hypervisor: Hypervisor,
    /// Set by the close callback.
    pub(super) closed: Arc<AtomicBool>,
}

/// Everything the backend's threads share.
pub(super) struct Inner {
    pub(super) uri: LibvirtUri,
    pub(super) session: Mutex<Option<Arc<Session>>>,
    /// Domain UUID -> VM name, for VMs whose domain has been seen: events name domains.
    pub(super) known: Mutex<HashMap<String, Arc<str>>>,
    /// Where lifecycle events go, once subscribed.
    pub(super) sink: Mutex<Option<Arc<EventSink>>>,
    /// Told when a connection closes, by the close callback.
    pub(super) lost: Mutex<Option<mpsc::Sender<()>>>,
    /// Host-side interface of each running domain (UUID -> domain id, device), so that
    /// polling counters does not fetch the domain's XML every time.
    pub(super) devices: Mutex<HashMap<String, (u32, String)>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("uri", &self.uri)
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

static EVENT_LOOP: Once = Once::new();

/// Registers libvirt's default event loop and runs it on a thread of its own, once per
/// process. It must precede opening a connection for that connection to deliver events
/// and keepalives.
pub(super) fn ensure_event_loop() {
    EVENT_LOOP.call_once(|| {
        // libvirt's default handler prints every error on stderr; ours go through tracing.
        virt::error::clear_error_callback();
        if let Err(e) = virt::event::event_register_default_impl() {
            tracing::warn!(error = %e.message(), "libvirt event loop unavailable: no lifecycle events");
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| {
                loop {
                    if let Err(e) = virt::event::event_run_default_impl() {
                        tracing::warn!(error = %e.message(), "libvirt event loop iteration failed");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the libvirt event thread: no lifecycle events");
        }
    });
}

impl LibvirtBackend {
    /// The current connection, or a new one if there is none or it closed.
    pub(super) fn session(&self) -> Result<Arc<Session>, BackendError> {
        let mut slot = self.inner.session.lock().expect("session lock poisoned");
        if let Some(s) = slot.as_ref()
            && !s.closed.load(Ordering::Acquire)
        {
            return Ok(s.clone());
        }
        let replaced = slot.take().is_some();
        let s = Arc::new(self.connect()?);
        *slot = Some(s.clone());
        drop(slot);
        if replaced {
            tracing::info!("libvirt reconnected");
            self.resync(&s);
        }
        Ok(s)
    }

    fn connect(&self) -> Result<Session, BackendError> {
        let uri = self.inner.uri.connect.as_deref();
        let shown = uri.unwrap_or("(libvirt's default)");
        let conn = Connect::open(uri).map_err(|e| {
            BackendError::Host(format!(
                "cannot connect to libvirt at {shown}: {}",
                e.message()
            ))
        })?;
        let hypervisor = Hypervisor::from_driver(&conn.driver_type().map_err(|e| {
            BackendError::Host(format!("libvirt at {shown}: driver type: {}", e.message()))
        })?);
        // Only remote connections have keepalives; the others say so, harmlessly.
        if let Err(e) = conn.set_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT) {
            tracing::debug!(error = %e.message(), "no libvirt keepalive");
        }
        let closed = Arc::new(AtomicBool::new(false));
        let flag = closed.clone();
        let inner = Arc::downgrade(&self.inner);
        let close = register_close(&conn, move |reason| {
            // Our own close (dropping the session) is not a loss.
            if u32::try_from(reason).ok() == Some(sys::VIR_CONNECT_CLOSE_REASON_CLIENT) {
                return;
            }
            flag.store(true, Ordering::Release);
            tracing::warn!(reason, "the libvirt connection closed");
            if let Some(inner) = inner.upgrade()
                && let Some(tx) = inner.lost.lock().expect("lost lock poisoned").as_ref()
            {
                let _ = tx.send(());
            }
        })
        .map_err(|e| tracing::debug!(error = %e.message(), "no libvirt close callback"))
        .ok();
        let s = Session {
            conn,
            hypervisor,
            closed,
            lifecycle: Mutex::new(None),
            _close: close,
        };
        if self
            .inner
            .sink
            .lock()
            .expect("sink lock poisoned")
            .is_some()
        {
            self.register_events(&s)?;
        }
        Ok(s)
    }

    /// Registers the lifecycle callback on `s`, once.
    pub(super) fn register_events(&self, s: &Session) -> Result<(), BackendError> {
        let mut slot = s.lifecycle.lock().expect("lifecycle lock poisoned");
        if slot.is_some() {
            return Ok(());
        }
        let inner = Arc::downgrade(&self.inner);
        let reg = register_lifecycle(&s.conn, move |ev: RawLifecycle| {
            if let Some(inner) = inner.upgrade() {
                inner.on_event(ev);
            }
        })
        .map_err(|e| {
            BackendError::Host(format!(
                "cannot register for libvirt lifecycle events: {}",
                e.message()
            ))
        })?;
        *slot = Some(reg);
        Ok(())
    }

    /// After a reconnect: events were lost, so every known VM's state is pushed again.
    fn resync(&self, s: &Session) {
        let Some(sink) = self.inner.sink.lock().expect("sink lock poisoned").clone() else {
            return;
        };
        let known: Vec<(String, Arc<str>)> = self
            .inner
            .known
            .lock()
            .expect("known lock poisoned")
            .iter()
            .map(|(u, n)| (u.clone(), n.clone()))
            .collect();
        for (uuid, name) in known {
            let state = match s.conn.lookup_domain_by_uuid_string(&uuid) {
                Ok(d) => match state_of(&d) {
                    Ok(st) => st,
                    Err(e) => {
                        tracing::debug!(vm = %name, error = %e.message(), "state after reconnect");
                        continue;
                    }
                },
                Err(e) if no_domain(&e) => Observed::Off,
                Err(e) => {
                    tracing::debug!(vm = %name, error = %e.message(), "lookup after reconnect");
                    continue;
                }
            };
            sink(LifecycleEvent {
                name: name.to_string(),
                state,
            });
        }
    }

    /// Runs `op` on the connection; if it failed because the connection was lost, once more
    /// on a new one. Every operation reads the domain's state first, so a retry is safe.
    pub(super) fn with_session<T>(
        &self,
        op: impl Fn(&Session) -> Result<T, OpError>,
    ) -> Result<T, OpError> {
        let first = self.session().map_err(OpError::NoConnection)?;
        match op(&first) {
            Err(e) if e.lost() || first.closed.load(Ordering::Acquire) => {
                first.closed.store(true, Ordering::Release);
                tracing::info!(error = %e.detail(), "libvirt call failed on a lost connection: reconnecting");
                let second = self.session().map_err(OpError::NoConnection)?;
                op(&second)
            }
            other => other,
        }
    }

    /// [`Self::with_session`] for an operation on `vm`, its failure named `what`.
    pub(super) fn vm_op<T>(
        &self,
        vm: &VmConfig,
        what: &'static str,
        op: impl Fn(&Session) -> Result<T, OpError>,
    ) -> Result<T, BackendError> {
        self.with_session(op)
            .map_err(|e| BackendError::vm(vm, what, e.detail()))
    }

    /// Starts the thread that reopens the connection as soon as it is lost (`lost` hears of
    /// it): events flow only over an open connection, and the next call may be a long time
    /// away when nothing runs.
    pub(super) fn spawn_reconnect(&self, lost: mpsc::Receiver<()>) -> Result<(), BackendError> {
        let inner = Arc::downgrade(&self.inner);
        std::thread::Builder::new()
            .name("libvirt-reconnect".into())
            .spawn(move || {
                while lost.recv().is_ok() {
                    let mut wait = RECONNECT_FIRST;
                    let mut warned = false;
                    loop {
                        std::thread::sleep(wait);
                        let Some(inner) = inner.upgrade() else {
                            return;
                        };
                        match (LibvirtBackend { inner }).session() {
                            Ok(_) => break,
                            Err(e) => {
                                if !warned {
                                    tracing::warn!(error = %e, "libvirt unreachable: retrying");
                                    warned = true;
                                }
                                wait = (wait * 2).min(RECONNECT_MAX);
                            }
                        }
                    }
                }
            })
            .map_err(|e| BackendError::Host(format!("cannot start the reconnect thread: {e}")))?;
        Ok(())
    }
}

/// Why a libvirt operation failed.
#[derive(Debug)]
pub(super) enum OpError {
    /// libvirt said no.
    Libvirt(virt::error::Error),
    /// No connection could be opened.
    NoConnection(BackendError),
    /// Something else, explained.
    Other(String),
}

impl From<virt::error::Error> for OpError {
    fn from(e: virt::error::Error) -> OpError {
        OpError::Libvirt(e)
    }
}

impl OpError {
    pub(super) fn lost(&self) -> bool {
        matches!(self, OpError::Libvirt(e) if connection_lost(e))
    }

    pub(super) fn detail(&self) -> String {
        match self {
            OpError::Libvirt(e) => e.message().to_string(),
            OpError::NoConnection(e) => e.to_string(),
            OpError::Other(s) => s.clone(),
        }
    }
}

impl Inner {
    fn on_event(&self, ev: RawLifecycle) {
        let (word, detail) = event_words(ev.event, ev.detail);
        let name = self
            .known
            .lock()
            .expect("known lock poisoned")
            .get(&ev.uuid)
            .map(|n| n.to_string())
            .unwrap_or_else(|| ev.name.clone());
        tracing::debug!(vm = %name, domain = %ev.name, event = word, detail, "libvirt lifecycle event");
        let Some(state) = observed_from_event(ev.event, ev.detail, ev.id) else {
            return;
        };
        let sink = self.sink.lock().expect("sink lock poisoned").clone();
        if let Some(sink) = sink {
            sink(LifecycleEvent { name, state });
        }
    }
}
