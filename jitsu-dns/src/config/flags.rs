//! The settings as given on the command line: strings, validated by [`super::load`] so
//! that flags, file and specs share one parser and one kind of error message.

use std::path::PathBuf;

/// The command line as given.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    /// `-b/--bind`.
    pub bind: Option<String>,
    /// `-l/--listen`.
    pub listen: Option<String>,
    /// `-f/--forwarder`.
    pub forwarder: Option<String>,
    /// `-p/--forwarder-port`.
    pub forwarder_port: Option<String>,
    /// `-d/--delay`.
    pub delay: Option<String>,
    /// `-t/--ttl`.
    pub ttl: Option<String>,
    /// `-m/--mode`.
    pub mode: Option<String>,
    /// `-x/--backend`.
    pub backend: Option<String>,
    /// `-c/--connect`.
    pub connect: Option<String>,
    /// `--synjitsu`.
    pub synjitsu: Option<String>,
    /// `--persistdb`.
    pub persistdb: Option<String>,
    /// `--config`.
    pub config: Option<PathBuf>,
    /// `--metrics`.
    pub metrics: Option<String>,
    /// `--log-level`.
    pub log_level: Option<String>,
    /// `--max-running`.
    pub max_running: Option<String>,
    /// `--max-boots-per-second`.
    pub max_boots_per_second: Option<String>,
    /// Positional VM specs.
    pub specs: Vec<String>,
}
