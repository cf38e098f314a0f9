use clap::Parser;

/// Authoritative DNS server that boots a VM when one of its names is resolved. The server
/// itself arrives with issue 4; this build only has `--help`.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!("this build of jitsu-dns has no DNS server yet; see `jitsu-dns --help`")
}
