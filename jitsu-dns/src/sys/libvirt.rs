//! The libvirt callbacks the `virt` crate does not wrap: domain lifecycle events and the
//! connection's close notice.
//!
//! Owns the C trampolines, the ownership of the Rust closures libvirt holds as `opaque`
//! pointers, and the guards that deregister them. It does not decide what an event means
//! (`backend::libvirt` maps them) and does not run the event loop (the `virt` crate's safe
//! `event_register_default_impl`/`event_run_default_impl` do).

use std::ffi::{CStr, c_char, c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};

use virt::connect::Connect;
use virt::error::Error;
use virt::sys;

/// A domain lifecycle event, as libvirt delivered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawLifecycle {
    /// The domain's name.
    pub(crate) name: String,
    /// The domain's UUID, lower-case with dashes.
    pub(crate) uuid: String,
    /// Its id, if it runs.
    pub(crate) id: Option<u32>,
    /// `virDomainEventType`.
    pub(crate) event: c_int,
    /// The event's detail (`virDomainEvent*DetailType`).
    pub(crate) detail: c_int,
}

type LifecycleFn = Box<dyn Fn(RawLifecycle) + Send + Sync>;
type CloseFn = Box<dyn Fn(c_int) + Send + Sync>;

/// The C signature of a lifecycle callback (`virConnectDomainEventCallback`).
type LifecycleCb =
    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, c_int, *mut c_void) -> c_int;
/// The erased signature `virConnectDomainEventRegisterAny` takes.
type GenericCb = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void);

/// A registered lifecycle callback; deregistered when dropped.
#[derive(Debug)]
pub(crate) struct LifecycleRegistration {
    // A reference of our own keeps the connection valid until we deregister.
    conn: Connect,
    id: c_int,
}

impl Drop for LifecycleRegistration {
    fn drop(&mut self) {
        // SAFETY: `conn` is a counted reference, so the pointer is valid; `id` came from a
        // successful registration on this connection and is deregistered only here. On a
        // broken connection libvirt fails the call and still frees the callback's data.
        unsafe {
            sys::virConnectDomainEventDeregisterAny(self.conn.as_ptr(), self.id);
        }
    }
}

unsafe extern "C" fn lifecycle_trampoline(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    // SAFETY: `opaque` is the `LifecycleFn` boxed by `register_lifecycle`; libvirt frees it
    // (through `free_lifecycle`) only after the last call of this callback.
    let f = unsafe { &*(opaque as *const LifecycleFn) };
    // SAFETY: libvirt passes a domain that is valid for the duration of the callback; the
    // name is owned by it (not freed by us) and copied at once.
    let name = unsafe {
        let p = sys::virDomainGetName(dom);
        if p.is_null() {
            String::new()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    let mut buf = [0 as c_char; sys::VIR_UUID_STRING_BUFLEN as usize];
    // SAFETY: the buffer has the VIR_UUID_STRING_BUFLEN bytes libvirt writes (with the NUL).
    let uuid = unsafe {
        if sys::virDomainGetUUIDString(dom, buf.as_mut_ptr()) == 0 {
            CStr::from_ptr(buf.as_ptr())
                .to_string_lossy()
                .to_ascii_lowercase()
        } else {
            String::new()
        }
    };
    // SAFETY: a plain getter on the valid domain; (unsigned)-1 means "not running".
    let id = unsafe { sys::virDomainGetID(dom) };
    let ev = RawLifecycle {
        name,
        uuid,
        id: (id != u32::MAX).then_some(id),
        event,
        detail,
    };
    // A panic must not unwind into libvirt's C frames.
    let _ = catch_unwind(AssertUnwindSafe(|| f(ev)));
    0
}

unsafe extern "C" fn free_lifecycle(opaque: *mut c_void) {
    // SAFETY: called once by libvirt, with the pointer `register_lifecycle` leaked.
    drop(unsafe { Box::from_raw(opaque as *mut LifecycleFn) });
}

/// Calls `f` on libvirt's event-loop thread for every lifecycle event of every domain of
/// `conn`. The default event loop must have been registered before `conn` was opened.
pub(crate) fn register_lifecycle(
    conn: &Connect,
    f: impl Fn(RawLifecycle) + Send + Sync + 'static,
) -> Result<LifecycleRegistration, Error> {
    let boxed: LifecycleFn = Box::new(f);
    let opaque = Box::into_raw(Box::new(boxed)) as *mut c_void;
    let cb: LifecycleCb = lifecycle_trampoline;
    // SAFETY: both are `extern "C"` function pointers of the same size; libvirt calls a
    // lifecycle callback with the lifecycle signature whatever the registration's type (its
    // own header's VIR_DOMAIN_EVENT_CALLBACK macro is this very cast).
    let generic: GenericCb = unsafe { std::mem::transmute::<LifecycleCb, GenericCb>(cb) };
    // SAFETY: the connection is valid (we hold a reference); a null domain means every
    // domain; `opaque` stays valid until libvirt calls `free_lifecycle`.
    let id = unsafe {
        sys::virConnectDomainEventRegisterAny(
            conn.as_ptr(),
            std::ptr::null_mut(),
            sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as c_int,
            Some(generic),
            opaque,
            Some(free_lifecycle),
        )
    };
    if id < 0 {
        // Whether libvirt already freed `opaque` on failure differs between its drivers:
        // leaking one closure is better than freeing it twice.
        return Err(Error::last_error());
    }
    Ok(LifecycleRegistration {
        conn: conn.clone(),
        id,
    })
}

/// A registered close callback; unregistered when dropped.
#[derive(Debug)]
pub(crate) struct CloseRegistration {
    conn: Connect,
}

impl Drop for CloseRegistration {
    fn drop(&mut self) {
        // SAFETY: the connection is valid (we hold a reference) and has `close_trampoline`
        // registered by `register_close`; libvirt frees its data through `free_close`.
        unsafe {
            sys::virConnectUnregisterCloseCallback(self.conn.as_ptr(), Some(close_trampoline));
        }
    }
}

unsafe extern "C" fn close_trampoline(
    _conn: sys::virConnectPtr,
    reason: c_int,
    opaque: *mut c_void,
) {
    // SAFETY: `opaque` is the `CloseFn` boxed by `register_close`, alive until `free_close`.
    let f = unsafe { &*(opaque as *const CloseFn) };
    let _ = catch_unwind(AssertUnwindSafe(|| f(reason)));
}

unsafe extern "C" fn free_close(opaque: *mut c_void) {
    // SAFETY: called once by libvirt, with the pointer `register_close` leaked.
    drop(unsafe { Box::from_raw(opaque as *mut CloseFn) });
}

/// Calls `f` (on the event-loop thread) with `virConnectCloseReason` when the connection
/// closes other than by our own hand: libvirtd exited, the socket broke, keepalive failed.
pub(crate) fn register_close(
    conn: &Connect,
    f: impl Fn(c_int) + Send + Sync + 'static,
) -> Result<CloseRegistration, Error> {
    let boxed: CloseFn = Box::new(f);
    let opaque = Box::into_raw(Box::new(boxed)) as *mut c_void;
    // SAFETY: the connection is valid; `opaque` stays valid until libvirt calls `free_close`.
    let rc = unsafe {
        sys::virConnectRegisterCloseCallback(
            conn.as_ptr(),
            Some(close_trampoline),
            opaque,
            Some(free_close),
        )
    };
    if rc < 0 {
        // As above: a leak rather than a possible double free.
        return Err(Error::last_error());
    }
    Ok(CloseRegistration { conn: conn.clone() })
}
