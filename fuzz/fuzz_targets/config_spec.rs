//! jitsu-dns's VM specs on the command line (`name=www,dns=www.example.org,ip=10.0.0.1,..`,
//! read by `jitsu_dns::config::merge` through `parse_spec`), and what the daemon then does
//! with the configuration (its DNS table, the domain XML of each VM).
//!
//! Input: one byte of mode, then the specs. Even mode: the text, split at NUL bytes, is the
//! specs. Odd mode: the first spec is generated, `name=x,dns=<name>,ip=10.0.0.1,command=true`
//! with a DNS name near the longest a name may be (253 characters, from the input), plus
//! `zone=` (the name without its first labels) if the mode says so; the rest of the text follows as more keys of
//! that spec.
//!
//! Checks: no panic (a bad spec is a `ConfigError`), and no value adds markup to the XML.
#![no_main]

use jitsu_dns::config::{Flags, merge};
use jitsu_fuzz::{Input, long_name, use_config};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let Some(mode) = input.byte() else {
        return;
    };
    let mut specs = Vec::new();
    if mode & 1 == 1 {
        let dns = long_name(&mut input, "example.org");
        let mut spec = format!("name=x,dns={dns},ip=10.0.0.1,command=true");
        if mode & 2 == 2 {
            // An enclosing zone: the name without its first labels.
            let skip = 1 + usize::from(mode >> 2 & 3);
            let zone: Vec<&str> = dns.split('.').skip(skip).collect();
            spec.push_str(",zone=");
            spec.push_str(&zone.join("."));
        }
        let extra = String::from_utf8_lossy(input.rest());
        if !extra.is_empty() {
            spec.push(',');
            spec.push_str(&extra);
        }
        specs.push(spec);
    } else {
        specs.extend(
            input
                .rest()
                .split(|b| *b == 0)
                .map(|s| String::from_utf8_lossy(s).into_owned()),
        );
    }
    let flags = Flags {
        specs,
        ..Flags::default()
    };
    if let Ok(cfg) = merge(&flags, None) {
        use_config(&cfg);
    }
});
