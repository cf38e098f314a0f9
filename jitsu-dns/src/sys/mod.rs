//! The only `unsafe` in jitsu-dns: the libvirt callbacks the `virt` crate does not wrap
//! ([`libvirt`]), the tap device and descriptor inheritance of the QEMU backend ([`qemu`]),
//! and the process backend's gratuitous ARP on a packet socket ([`packet`]) and its
//! namespaces and command spawned into one ([`netns`]).
//!
//! Everything else (files, sockets, child processes, signals through rustix) goes through
//! safe wrappers.

#![allow(unsafe_code)]

pub(crate) mod libvirt;
pub(crate) mod netns;
pub(crate) mod packet;
pub(crate) mod qemu;
