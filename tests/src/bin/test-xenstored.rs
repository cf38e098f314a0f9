//! `test-xenstored <socket> [domid...]`: the tests' small Xenstore daemon as a process, for
//! scripts and manual runs (`XENSTORED_PATH=<socket> xenstore-ls`). `<socket>` is dom0's; each
//! `domid` gets a socket `d<domid>.sock` beside it whose clients are that domain. Runs until
//! killed.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let Some(socket) = args.next().map(PathBuf::from) else {
        anyhow::bail!("usage: test-xenstored <socket> [domid...]");
    };
    let xs = jitsu_tests::xenstored::TestXenstored::start(&socket)?;
    eprintln!("test-xenstored listening on {} (dom0)", socket.display());
    for arg in args {
        let domid: u32 = arg
            .to_str()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("{arg:?} is not a domain id"))?;
        let p = xs.domain_socket(domid)?;
        eprintln!(
            "test-xenstored listening on {} (domain {domid})",
            p.display()
        );
    }
    loop {
        std::thread::park();
    }
}
