//! Jitsu 0.2's own command lines (`examples/jitsu-0.2.sh`, verbatim from its README and
//! `--help`) are accepted by jitsu-dns and mean what they meant there: the backend, the
//! memory in KiB, the disks and NICs, relative paths from the working directory, the stop
//! mode, the TTL. Each is run through the real binary with `--check`, which prints what every
//! setting resolved to and the domain XML libvirt would be given, checked with libvirt's own
//! schema (virt-xml-validate).

use std::path::Path;
use std::process::Command;

use jitsu_tests::{Scratch, bin_path, repo_root, require_tool};

/// Runs example `n` of `examples/jitsu-0.2.sh` in `dir` with `jitsu` (the binary and any
/// flags before the example's own): its exit code, stdout and stderr.
fn example(n: u8, dir: &Path, jitsu: &str) -> (Option<i32>, String, String) {
    let out = Command::new("sh")
        .arg(repo_root().join("examples/jitsu-0.2.sh"))
        .arg(n.to_string())
        .env("JITSU", jitsu)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Example `n` through `jitsu-dns --check`: what it means, which must be valid.
fn checked(n: u8, dir: &Path) -> String {
    let jitsu = format!("{} --check", bin_path("jitsu-dns").display());
    let (code, out, err) = example(n, dir, &jitsu);
    assert_eq!(code, Some(0), "example {n}: {err}");
    out
}

fn has(text: &str, lines: &[&str]) {
    for l in lines {
        assert!(text.lines().any(|t| t == *l), "{l:?} missing from\n{text}");
    }
}

fn contains_all(text: &str, wants: &[&str]) {
    for want in wants {
        assert!(text.contains(want), "{want} missing from\n{text}");
    }
}

/// The domain XML in a `--check` output, checked against libvirt's schema.
fn valid_domain_xml(text: &str, dir: &Path) -> String {
    require_tool("virt-xml-validate", "libvirt-clients");
    let start = text.find("<domain ").expect("a domain XML");
    let end = text.find("</domain>\n").expect("the end of the domain XML") + 10;
    let xml = &text[start..end];
    let f = dir.join("domain.xml");
    std::fs::write(&f, xml).unwrap();
    let out = Command::new("virt-xml-validate")
        .arg(&f)
        .arg("domain")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "libvirt's schema refuses\n{xml}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    xml.to_string()
}

#[test]
fn libvirt_at_xen_from_the_uri_alone() {
    let dir = Scratch::new("j02a").unwrap();
    let out = checked(1, dir.path());
    has(
        &out,
        &[
            "backend libvirt at xen:/// (libvirt, from the scheme xen: of --connect)",
            "vm mirage-www",
            "  dns www.openmirage.org.",
            "  ip 192.168.0.22/24",
            "  stop_mode destroy",
            "  response_delay 0.1 s",
            "ttl 60 s (idle VMs stop after 120 s)",
            "dns 127.0.0.1:53",
        ],
    );
    // No kernel: the domain is libvirt's, used as it is defined, as Jitsu's libvirt backend did.
    assert!(
        out.contains("  domain: the one named mirage-www, which must be defined"),
        "{out}"
    );
}

#[test]
fn libxl_is_a_pv_domain_of_64000_kib_from_a_kernel_in_the_working_directory() {
    let dir = Scratch::new("j02b").unwrap();
    let out = checked(2, dir.path());
    let kernel = dir.path().join("mirage-www.xen");
    has(
        &out,
        &[
            "backend libvirt at xen:///system (-x libxl: libvirt's libxl driver at xen:///system)",
            "vm www",
            "  dns www.example.org.",
            "  ip 10.0.0.1/24",
            "  domain_type xenpv",
            "  memory 64000 KiB",
            &format!("  kernel {}", kernel.display()),
        ],
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("  nic 0 bridge br0 mac ") && l.ends_with(" (steered)")),
        "{out}"
    );
    let xml = valid_domain_xml(&out, dir.path());
    contains_all(
        &xml,
        &[
            "<domain type='xen'>",
            "<memory unit='KiB'>64000</memory>",
            "machine='xenpv'>xen</type>",
            &format!("<kernel>{}</kernel>", kernel.display()),
            "<source bridge='br0'/>",
        ],
    );
    assert_eq!(xml.matches("<interface ").count(), 1, "{xml}");
}

#[test]
fn rumprun_gets_two_raw_read_write_disks_as_xvda_and_xvdb() {
    let dir = Scratch::new("j02c").unwrap();
    // What `rumprun -T tmp` left for the example (rumprun_config must exist at start).
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    std::fs::write(dir.join("tmp/json.cfg"), "{\"cmdline\": \"nginx.bin\"}\n").unwrap();
    let out = checked(3, dir.path());
    let p = |rel: &str| dir.path().join(rel).display().to_string();
    has(
        &out,
        &[
            "vm rumprun",
            "  memory 64000 KiB",
            &format!("  kernel {}", p("nginx.bin")),
            &format!("  rumprun_config {}", p("tmp/json.cfg")),
            &format!(
                "  disk 0 {} as xvda file raw read-write",
                p("images/stubetc.iso")
            ),
            &format!(
                "  disk 1 {} as xvdb file raw read-write",
                p("images/data.iso")
            ),
        ],
    );
    let xml = valid_domain_xml(&out, dir.path());
    contains_all(
        &xml,
        &[
            &format!(
                "<disk type='file' device='disk'>\n      <driver name='qemu' type='raw'/>\n      \
                 <source file='{}'/>\n      <target dev='xvda' bus='xen'/>",
                p("images/stubetc.iso")
            ),
            &format!(
                "<source file='{}'/>\n      <target dev='xvdb' bus='xen'/>",
                p("images/data.iso")
            ),
        ],
    );
    assert!(!xml.contains("<readonly/>"), "{xml}");
}

#[test]
fn virtualbox_examples_suspend_and_take_options_after_the_vm() {
    let dir = Scratch::new("j02d").unwrap();
    let out = checked(4, dir.path());
    has(
        &out,
        &[
            "backend libvirt at vbox:///session (libvirt, from the scheme vbox: of --connect)",
            "mode suspend",
            "vm Ubuntu",
            "  dns www.example.com.",
            "  ip 127.0.0.1/24",
            "  stop_mode suspend",
        ],
    );
    let out = checked(5, dir.path());
    has(
        &out,
        &[
            "backend libvirt at vbox:///session (libvirt, from the scheme vbox: of --connect)",
            "ttl 60 s (idle VMs stop after 120 s)",
            "vm ubuntu",
            "  dns home.local.",
            "  ip 192.168.0.1/24",
            "  stop_mode suspend",
        ],
    );
}

#[test]
fn the_help_example_without_a_name_is_refused_as_jitsu_refused_it() {
    let dir = Scratch::new("j02e").unwrap();
    let jitsu = format!("{} --check", bin_path("jitsu-dns").display());
    let (code, out, err) = example(6, dir.path(), &jitsu);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(
        err.contains("VM spec 1: vm = \"mirage-www\": unknown key"),
        "{err}"
    );
}

#[test]
fn without_check_libxl_goes_to_libvirts_xen_driver() {
    // Run for real: the backend chosen is libvirt at xen:///system, said once, and this host
    // has no Xen, so it stops there (exit 1), before binding port 53.
    let dir = Scratch::new("j02f").unwrap();
    let (code, _, err) = example(2, dir.path(), &bin_path("jitsu-dns").display().to_string());
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(
        err.matches("backend: -x libxl: libvirt's libxl driver at xen:///system")
            .count(),
        1,
        "{err}"
    );
    assert!(
        err.contains("cannot connect to libvirt at xen:///system"),
        "{err}"
    );
    let (code, _, err) = example(1, dir.path(), &bin_path("jitsu-dns").display().to_string());
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("cannot connect to libvirt at xen:///"),
        "{err}"
    );
}
