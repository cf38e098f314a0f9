use clap::Parser;

/// Holds the TCP SYNs of booting guests on the bridge and hands them over once the guest can
/// answer. The packet proxy itself arrives with issue 3; this build only has `--help`.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!("this build of synjitsu has no packet proxy yet; see `synjitsu --help`")
}
