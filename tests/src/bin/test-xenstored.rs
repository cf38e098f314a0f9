//! `test-xenstored <socket>`: the tests' small Xenstore daemon as a process, for scripts and
//! manual runs (`XENSTORED_PATH=<socket> xenstore-ls`). Runs until killed.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let Some(socket) = std::env::args_os().nth(1).map(PathBuf::from) else {
        anyhow::bail!("usage: test-xenstored <socket>");
    };
    let _xs = jitsu_tests::xenstored::TestXenstored::start(&socket)?;
    eprintln!("test-xenstored listening on {}", socket.display());
    loop {
        std::thread::park();
    }
}
