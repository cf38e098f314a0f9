// SPDX-License-Identifier: GPL-3.0-only
//! The virtio-net device as smoltcp's `Device`, over virtio-drivers' raw driver: receive
//! buffers are posted once and recycled, and a frame to send is handed to the device without
//! waiting for it (the buffer is freed once the device has used it).
//!
//! Not waiting matters under TCG: QEMU sends a frame from its main loop, and a virtual CPU
//! spinning until then (as `VirtIONet::send` does) competes with that loop for the host's
//! CPUs and QEMU's lock: 30 us usually, but several milliseconds often enough on a busy host.
//!
//! In loopback (the server's rehearsal before it listens) frames sent go to a queue of their
//! own instead of the device, and come back as received frames when asked; the device's own
//! frames wait in its ring meanwhile.
//!
//! It owns the device, its buffers and its counters; it knows nothing of sockets or time.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;

use jitsu_unikernel::server::{LoopbackDevice, PeekDevice};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::mmio::MmioTransport;

use super::heap::IdentityHal;

/// Descriptors per virtqueue: receive buffers posted, and the most frames in flight. Each
/// posted buffer costs a notification (an exit to QEMU) at boot, and the device keeps frames
/// in the tap queue while none is free.
const QUEUE_SIZE: usize = 16;
/// Bytes of each receive buffer: a full Ethernet frame plus virtio-net's header.
const RX_BUFFER_LEN: usize = 2048;
/// virtio-net's header is at most this long (12 bytes with `num_buffers`, 10 without).
const MAX_HEADER_LEN: usize = 12;
/// The largest frame sent (Ethernet header and 1500 bytes of IP).
const MTU: usize = 1514;

type Raw = VirtIONetRaw<IdentityHal, MmioTransport<'static>, QUEUE_SIZE>;

/// Frames counted by the device.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NicCounters {
    /// Frames received.
    pub(crate) rx: u64,
    /// Frames handed to the device to send.
    pub(crate) tx: u64,
    /// Frames the device refused or returned in error (both directions).
    pub(crate) errors: u64,
}

/// A received frame: its buffer, and where in it the frame is.
struct Frame {
    buf: Box<[u8]>,
    start: usize,
    len: usize,
    /// A receive buffer of the device's (posted again once used), or a frame the server
    /// made (`inject`).
    posted: bool,
}

impl Frame {
    fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

/// The device and the buffers it holds.
struct Inner {
    raw: Raw,
    /// Receive buffers the device holds, by token.
    posted: [Option<Box<[u8]>>; QUEUE_SIZE],
    /// Frames the device is sending, by token.
    sending: [Option<Box<[u8]>>; QUEUE_SIZE],
    counters: NicCounters,
    /// In loopback, the frames sent and not yet looped back.
    looped: Option<VecDeque<Vec<u8>>>,
}

impl Inner {
    /// Gives the device a buffer to receive into.
    fn post(&mut self, mut buf: Box<[u8]>) {
        // SAFETY: the buffer is kept in `posted` under its token, untouched (and its heap
        // memory unmoved) until the device returns it through `receive_complete`.
        match unsafe { self.raw.receive_begin(&mut buf) } {
            Ok(token) => match self.posted.get_mut(usize::from(token)) {
                Some(slot) => *slot = Some(buf),
                // A token is a descriptor index, below QUEUE_SIZE; never reached.
                None => self.counters.errors += 1,
            },
            Err(_) => self.counters.errors += 1,
        }
    }

    /// The next frame the device received, if any.
    fn take(&mut self) -> Option<Frame> {
        let token = self.raw.poll_receive()?;
        let Some(mut buf) = self
            .posted
            .get_mut(usize::from(token))
            .and_then(Option::take)
        else {
            self.counters.errors += 1;
            return None;
        };
        // SAFETY: `buf` is the buffer passed to receive_begin for this token.
        match unsafe { self.raw.receive_complete(token, &mut buf) } {
            Ok((start, len)) if start + len <= buf.len() => {
                self.counters.rx += 1;
                Some(Frame {
                    buf,
                    start,
                    len,
                    posted: true,
                })
            }
            _ => {
                self.counters.errors += 1;
                self.post(buf);
                None
            }
        }
    }

    /// Frees the buffers of the frames the device has sent.
    #[inline(never)]
    fn reclaim(&mut self) {
        while let Some(token) = self.raw.poll_transmit() {
            let Some(buf) = self
                .sending
                .get_mut(usize::from(token))
                .and_then(Option::take)
            else {
                self.counters.errors += 1;
                return;
            };
            // SAFETY: `buf` is the buffer passed to transmit_begin for this token.
            if unsafe { self.raw.transmit_complete(token, &buf) }.is_err() {
                self.counters.errors += 1;
            }
        }
    }

    /// Builds a frame of `len` bytes with `f` and hands it to the device.
    ///
    /// Only the call to `f` is generic: the device's part is one copy for every caller
    /// ([`Inner::tx_buffer`], [`Inner::transmit`]), so that a frame the kernel sends itself
    /// before it listens runs (under TCG: has translated) the code smoltcp's replies take.
    fn send<R>(&mut self, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        if let Some(looped) = &mut self.looped {
            let mut frame = vec![0u8; len];
            let r = f(&mut frame);
            looped.push_back(frame);
            return r;
        }
        let (mut buf, header) = self.tx_buffer(len);
        let r = f(&mut buf[header..]);
        self.transmit(buf);
        r
    }

    /// A buffer for a frame of `len` bytes to the device, virtio-net's header filled in
    /// front of it, and where the frame starts.
    #[inline(never)]
    fn tx_buffer(&mut self, len: usize) -> (Vec<u8>, usize) {
        self.reclaim();
        let mut buf = vec![0u8; MAX_HEADER_LEN + len];
        let header = self
            .raw
            .fill_buffer_header(&mut buf)
            .unwrap_or(MAX_HEADER_LEN);
        buf.truncate(header + len);
        (buf, header)
    }

    /// Hands a buffer from [`Inner::tx_buffer`], its frame written, to the device.
    #[inline(never)]
    fn transmit(&mut self, buf: Vec<u8>) {
        let buf = buf.into_boxed_slice();
        // SAFETY: the buffer is kept in `sending` under its token, untouched (and its heap
        // memory unmoved) until the device is done with it (`reclaim`).
        match unsafe { self.raw.transmit_begin(&buf) } {
            Ok(token) => match self.sending.get_mut(usize::from(token)) {
                Some(slot) => {
                    *slot = Some(buf);
                    self.counters.tx += 1;
                }
                None => self.counters.errors += 1,
            },
            // The queue is full (smoltcp asked through `transmit`, which checks) or the
            // device failed: the frame is lost, as on a wire.
            Err(_) => self.counters.errors += 1,
        }
    }
}

/// A virtio-net device as a smoltcp `Device`.
pub(crate) struct Nic {
    inner: RefCell<Inner>,
    /// Frames the server made, returned by the next `receive`s before any other.
    injected: VecDeque<Frame>,
    /// A frame taken from the device by `peek`, returned by the next `receive` after them.
    peeked: Option<Frame>,
    /// In loopback, frames sent and looped back, to receive (after those above); the device
    /// is not read meanwhile.
    loopback: Option<VecDeque<Frame>>,
}

impl core::fmt::Debug for Nic {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Nic")
            .field("counters", &self.inner.borrow().counters)
            .finish_non_exhaustive()
    }
}

impl Nic {
    /// Negotiates with the device and posts every receive buffer.
    pub(crate) fn new(transport: MmioTransport<'static>) -> virtio_drivers::Result<Nic> {
        let mut inner = Inner {
            raw: Raw::new(transport)?,
            posted: [const { None }; QUEUE_SIZE],
            sending: [const { None }; QUEUE_SIZE],
            counters: NicCounters::default(),
            looped: None,
        };
        for _ in 0..QUEUE_SIZE {
            inner.post(vec![0u8; RX_BUFFER_LEN].into_boxed_slice());
        }
        Ok(Nic {
            inner: RefCell::new(inner),
            injected: VecDeque::new(),
            peeked: None,
            loopback: None,
        })
    }

    /// The MAC the device reports.
    pub(crate) fn mac(&self) -> [u8; 6] {
        self.inner.borrow().raw.mac_address()
    }

    /// Acknowledges the device's interrupt, so that its next used buffer raises a new one.
    /// Call it before draining the receive queue, never after: a frame that arrives in
    /// between then still wakes the CPU.
    pub(crate) fn ack_interrupt(&mut self) {
        self.inner.get_mut().raw.ack_interrupt();
    }

    /// True when a received frame waits.
    pub(crate) fn can_recv(&self) -> bool {
        !self.injected.is_empty()
            || self.peeked.is_some()
            || self.inner.borrow().raw.poll_receive().is_some()
    }

    /// Puts the device in loopback, or takes it out (dropping what was sent in loopback and
    /// not received).
    pub(crate) fn set_loopback(&mut self, on: bool) {
        // Frames of the server's own making, or looped back: none is the device's.
        self.injected.clear();
        if self.peeked.as_ref().is_some_and(|f| !f.posted) {
            self.peeked = None;
        }
        self.inner.get_mut().looped = on.then(VecDeque::new);
        self.loopback = on.then(VecDeque::new);
    }

    /// The next frame: one the server made, one `peek` took, then (in loopback) one
    /// looped back, else the device's.
    fn next_frame(&mut self) -> Option<Frame> {
        if let Some(frame) = self.injected.pop_front().or_else(|| self.peeked.take()) {
            return Some(frame);
        }
        match &mut self.loopback {
            Some(looped) => looped.pop_front(),
            None => self.inner.get_mut().take(),
        }
    }

    /// Sends one frame built by `f` into `len` bytes, outside smoltcp (the gratuitous ARP).
    pub(crate) fn send_raw(&mut self, len: usize, f: impl FnOnce(&mut [u8])) {
        self.inner.get_mut().send(len, f);
    }
}

/// A received frame, lent to smoltcp and posted again afterwards.
pub(crate) struct NicRx<'a> {
    inner: &'a RefCell<Inner>,
    frame: Frame,
}

/// The right to send one frame.
pub(crate) struct NicTx<'a> {
    inner: &'a RefCell<Inner>,
}

impl core::fmt::Debug for NicRx<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("NicRx")
            .field("len", &self.frame.len)
            .finish_non_exhaustive()
    }
}

impl core::fmt::Debug for NicTx<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("NicTx").finish_non_exhaustive()
    }
}

impl phy::RxToken for NicRx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        // smoltcp sends its reply from inside `f` (through the paired NicTx): the device is
        // not borrowed while `f` runs.
        let r = f(self.frame.bytes());
        if self.frame.posted {
            self.inner.borrow_mut().post(self.frame.buf);
        }
        r
    }
}

impl phy::TxToken for NicTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        self.inner.borrow_mut().send(len, f)
    }
}

impl Device for Nic {
    type RxToken<'a> = NicRx<'a>;
    type TxToken<'a> = NicTx<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(NicRx<'_>, NicTx<'_>)> {
        let frame = self.next_frame()?;
        Some((
            NicRx {
                inner: &self.inner,
                frame,
            },
            NicTx { inner: &self.inner },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<NicTx<'_>> {
        let inner = self.inner.get_mut();
        if inner.looped.is_some() {
            return Some(NicTx { inner: &self.inner });
        }
        inner.reclaim();
        inner.raw.can_send().then_some(NicTx { inner: &self.inner })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU;
        caps
    }
}

impl LoopbackDevice for Nic {
    fn loop_back_one(&mut self) -> bool {
        let (Some(sent), Some(looped)) = (&mut self.inner.get_mut().looped, &mut self.loopback)
        else {
            return false;
        };
        let Some(frame) = sent.pop_front() else {
            return false;
        };
        let len = frame.len();
        looped.push_back(Frame {
            buf: frame.into_boxed_slice(),
            start: 0,
            len,
            posted: false,
        });
        true
    }
}

impl PeekDevice for Nic {
    fn peek(&mut self) -> Option<&[u8]> {
        if self.injected.is_empty() && self.peeked.is_none() {
            self.peeked = self.next_frame();
        }
        self.injected
            .front()
            .or(self.peeked.as_ref())
            .map(Frame::bytes)
    }

    fn inject(&mut self, frame: Vec<u8>) {
        let len = frame.len();
        self.injected.push_front(Frame {
            buf: frame.into_boxed_slice(),
            start: 0,
            len,
            posted: false,
        });
    }
}
