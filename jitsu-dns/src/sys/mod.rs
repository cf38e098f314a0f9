//! The only `unsafe` in jitsu-dns: the libvirt callbacks the `virt` crate does not wrap
//! ([`libvirt`]), and the tap device and descriptor inheritance of the QEMU backend
//! ([`qemu`]).
//!
//! Everything else (files, sockets, child processes, signals through rustix) goes through
//! safe wrappers.

#![allow(unsafe_code)]

pub(crate) mod libvirt;
pub(crate) mod qemu;
