//! The deployment examples in `examples/` are what a user copies: they must load as they are.

use std::path::PathBuf;

use jitsu_dns::config::{BackendKind, Flags, StopMode, load};

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("jitsu-dns/ is inside the repository")
        .join("examples")
}

#[test]
fn the_dom0_example_loads_with_every_vm() {
    let flags = Flags {
        config: Some(examples().join("dom0.toml")),
        ..Flags::default()
    };
    let c = load(&flags).unwrap_or_else(|e| panic!("examples/dom0.toml: {e}"));
    assert_eq!(c.backend, BackendKind::Libvirt);
    let names: Vec<&str> = c.vms.iter().map(|v| &*v.name).collect();
    assert_eq!(names, ["www", "nginx", "static"]);
    let www = &c.vms[0];
    assert!(www.use_synjitsu && www.synjitsu_tracked());
    assert_eq!(www.stop_mode, StopMode::Suspend);
    assert_eq!(
        www.memory_kib,
        Some(64 << 10),
        "64 MiB, as before memory took units"
    );
    assert!(
        c.vms
            .iter()
            .any(|v| v.use_synjitsu && v.handover != www.handover)
    );
}
