//! synjitsu: stands in for booting guests on the bridge, holds their clients' TCP SYNs and
//! hands them over once the guest can answer. The daemon is being built (issue 3); this
//! library is its home.
