//! jitsu-dns: an authoritative DNS server that boots a VM when one of its names is resolved.
//! The daemon is being built (issue 4); this library is its home.
