//! jitsu-dns's configuration file (`jitsu_dns::config::from_toml`, then `merge` with no
//! flags), as the daemon reads it at start and on SIGHUP, and what the daemon then does with
//! it (its DNS table, the domain XML of each VM).
//!
//! Input: one byte of mode, then the text. Even mode: the text is the file. Odd mode: the
//! file starts with a `[[zone]]` and a `[[vm]]` whose names are near the longest a DNS name
//! may be (253 characters; generated from the input), then the text follows.
//!
//! Checks: no panic (a bad file is a `ConfigError`), and no value adds markup to the XML.
#![no_main]

use std::fmt::Write as _;
use std::path::Path;

use jitsu_dns::config::{Flags, from_toml, merge};
use jitsu_fuzz::{Input, long_name, use_config};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let Some(mode) = input.byte() else {
        return;
    };
    let mut text = String::new();
    if mode & 1 == 1 {
        let zone = long_name(&mut input, "example.org");
        let dns = long_name(&mut input, "example.net");
        let _ = write!(
            text,
            "[[zone]]\nname = \"{zone}\"\n{}[[vm]]\nname = \"x\"\ndns = \"{dns}\"\nip = \"10.0.0.1\"\ncommand = \"true\"\n",
            if mode & 2 == 2 {
                "ns = \"ns.example.org\"\n"
            } else {
                ""
            },
        );
    }
    let Ok(rest) = std::str::from_utf8(input.rest()) else {
        return;
    };
    text.push_str(rest);
    let Ok(file) = from_toml(&text, Path::new("fuzz.toml")) else {
        return;
    };
    if let Ok(cfg) = merge(&Flags::default(), Some(&file)) {
        use_config(&cfg);
    }
});
