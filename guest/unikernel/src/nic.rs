// SPDX-License-Identifier: GPL-3.0-only
//! smoltcp's view of the virtio-net device: receive and transmit tokens over
//! virtio-drivers' `VirtIONet` (its receive buffers are posted once and recycled; a frame to
//! send is copied into a fresh buffer and handed to the device).
//!
//! It owns the device and its counters; it does not know about sockets or time.

use core::cell::RefCell;

use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use virtio_drivers::Hal;
use virtio_drivers::device::net::{RxBuffer, VirtIONet};
use virtio_drivers::transport::Transport;

/// Descriptors per virtqueue: receive buffers posted at once, and the most frames in flight.
/// Each posted buffer costs a notification (an exit to QEMU) at boot, and the device keeps
/// frames in the tap queue while none is free.
pub const QUEUE_SIZE: usize = 16;
/// Bytes of each receive buffer: a full Ethernet frame plus virtio-net's header.
pub const RX_BUFFER_LEN: usize = 2048;
/// The largest frame sent (Ethernet header and 1500 bytes of IP).
pub const MTU: usize = 1514;

/// Frames counted by the device.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NicCounters {
    /// Frames received.
    pub rx: u64,
    /// Frames sent.
    pub tx: u64,
    /// Frames the device refused or returned in error (both directions).
    pub errors: u64,
}

/// A device that shows the next received frame before smoltcp takes it.
pub trait PeekDevice: Device {
    /// The frame the next `receive` returns, if one waits.
    fn peek(&mut self) -> Option<&[u8]>;
}

/// A virtio-net device as a smoltcp `Device`.
pub struct Nic<H: Hal, T: Transport> {
    net: RefCell<VirtIONet<H, T, QUEUE_SIZE>>,
    counters: RefCell<NicCounters>,
    /// A frame taken from the device by `peek`, returned by the next `receive`.
    peeked: Option<RxBuffer>,
}

impl<H: Hal, T: Transport> core::fmt::Debug for Nic<H, T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Nic")
            .field("counters", &*self.counters.borrow())
            .finish_non_exhaustive()
    }
}

impl<H: Hal, T: Transport> Nic<H, T> {
    /// Negotiates with the device and posts every receive buffer.
    pub fn new(transport: T) -> virtio_drivers::Result<Self> {
        Ok(Nic {
            net: RefCell::new(VirtIONet::new(transport, RX_BUFFER_LEN)?),
            counters: RefCell::new(NicCounters::default()),
            peeked: None,
        })
    }

    /// The MAC the device reports.
    pub fn mac(&self) -> [u8; 6] {
        self.net.borrow().mac_address()
    }

    /// Acknowledges the device's interrupt, so that its next used buffer raises a new one.
    /// Call it before draining the receive queue, never after: a frame that arrives in
    /// between then still wakes the CPU.
    pub fn ack_interrupt(&mut self) {
        self.net.get_mut().ack_interrupt();
    }

    /// True when a received frame waits.
    pub fn can_recv(&self) -> bool {
        self.peeked.is_some() || self.net.borrow().can_recv()
    }

    /// The next frame from the device, counted (errors too).
    fn take(&mut self) -> Option<RxBuffer> {
        let counters = self.counters.get_mut();
        match self.net.get_mut().receive() {
            Ok(buf) => {
                counters.rx += 1;
                Some(buf)
            }
            Err(virtio_drivers::Error::NotReady) => None,
            Err(_) => {
                counters.errors += 1;
                None
            }
        }
    }

    /// The counters so far.
    pub fn counters(&self) -> NicCounters {
        *self.counters.borrow()
    }

    /// Sends one frame built by `f` into a buffer of `len` bytes, outside smoltcp (the
    /// gratuitous ARP).
    pub fn send_raw(&mut self, len: usize, f: impl FnOnce(&mut [u8])) {
        let tx = NicTx {
            net: &self.net,
            counters: &self.counters,
        };
        phy::TxToken::consume(tx, len, f);
    }
}

/// A received frame, lent to smoltcp and recycled into the queue afterwards.
pub struct NicRx<'a, H: Hal, T: Transport> {
    net: &'a RefCell<VirtIONet<H, T, QUEUE_SIZE>>,
    counters: &'a RefCell<NicCounters>,
    buf: RxBuffer,
}

/// The right to send one frame.
pub struct NicTx<'a, H: Hal, T: Transport> {
    net: &'a RefCell<VirtIONet<H, T, QUEUE_SIZE>>,
    counters: &'a RefCell<NicCounters>,
}

impl<H: Hal, T: Transport> core::fmt::Debug for NicRx<'_, H, T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("NicRx")
            .field("len", &self.buf.packet_len())
            .finish_non_exhaustive()
    }
}

impl<H: Hal, T: Transport> core::fmt::Debug for NicTx<'_, H, T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("NicTx").finish_non_exhaustive()
    }
}

impl<H: Hal, T: Transport> phy::RxToken for NicRx<'_, H, T> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        // smoltcp sends its reply from inside `f` (through the paired NicTx): the device is
        // not borrowed while `f` runs.
        let r = f(self.buf.packet());
        if self.net.borrow_mut().recycle_rx_buffer(self.buf).is_err() {
            self.counters.borrow_mut().errors += 1;
        }
        r
    }
}

impl<H: Hal, T: Transport> phy::TxToken for NicTx<'_, H, T> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut net = self.net.borrow_mut();
        let mut tx = net.new_tx_buffer(len);
        let r = f(tx.packet_mut());
        // Blocks until the device has taken the frame: under QEMU that is its main loop
        // copying it to the tap, tens of microseconds.
        let mut counters = self.counters.borrow_mut();
        match net.send(tx) {
            Ok(()) => counters.tx += 1,
            Err(_) => counters.errors += 1,
        }
        r
    }
}

impl<H: Hal, T: Transport> Device for Nic<H, T> {
    type RxToken<'a>
        = NicRx<'a, H, T>
    where
        Self: 'a;
    type TxToken<'a>
        = NicTx<'a, H, T>
    where
        Self: 'a;

    fn receive(&mut self, _timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let buf = match self.peeked.take() {
            Some(buf) => buf,
            None => self.take()?,
        };
        Some((
            NicRx {
                net: &self.net,
                counters: &self.counters,
                buf,
            },
            NicTx {
                net: &self.net,
                counters: &self.counters,
            },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Self::TxToken<'_>> {
        self.net.get_mut().can_send().then_some(NicTx {
            net: &self.net,
            counters: &self.counters,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU;
        caps.max_burst_size = Some(1);
        caps
    }
}

impl<H: Hal, T: Transport> PeekDevice for Nic<H, T> {
    fn peek(&mut self) -> Option<&[u8]> {
        if self.peeked.is_none() {
            self.peeked = self.take();
        }
        self.peeked.as_ref().map(RxBuffer::packet)
    }
}
