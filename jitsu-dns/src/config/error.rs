//! Why a configuration is refused, and where each value came from (a flag, a VM spec, a
//! line of the file), so that every refusal names the place, the key, the value and why.

use std::fmt;
use std::path::PathBuf;

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A command-line flag (`--ttl`).
    Flag(String),
    /// A positional VM spec (1-based), with the VM's name once known.
    Spec {
        /// 1-based position among the specs.
        index: usize,
        /// The VM's name, if the spec has one.
        vm: Option<String>,
    },
    /// A line of the configuration file, with the VM's name if inside a `[[vm]]`.
    File {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// The VM's name, if inside a `[[vm]]` that has one.
        vm: Option<String>,
    },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag(flag) => write!(f, "flag {flag}"),
            Origin::Spec { index, vm: None } => write!(f, "VM spec {index}"),
            Origin::Spec {
                index,
                vm: Some(vm),
            } => write!(f, "VM spec {index} ({vm})"),
            Origin::File { path, line, vm } => {
                write!(f, "{} line {line}", path.display())?;
                if let Some(vm) = vm {
                    write!(f, " (vm {vm})")?;
                }
                Ok(())
            }
        }
    }
}

/// Why a configuration is refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read configuration file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown or mistyped setting.
    #[error("{} line {line}: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// The parser's message.
        message: String,
    },
    /// A value is wrong.
    #[error("{origin}: {key} = {value:?}: {why}")]
    Invalid {
        /// Where it was given.
        origin: Box<Origin>,
        /// The key or flag.
        key: String,
        /// The value as given.
        value: String,
        /// What is wrong.
        why: String,
    },
    /// A reload would remove more VMs than `max_removed_share` allows.
    #[error(
        "it would remove {removed} of {total} VMs ({names}), more than max_removed_share = \
         {share} allows; to remove them set max_removed_share = 1.0 in the file, then reload"
    )]
    TooManyRemoved {
        /// How many VMs would go.
        removed: usize,
        /// How many run under the current configuration.
        total: usize,
        /// The first few of them.
        names: String,
        /// The share allowed.
        share: f64,
    },
    /// A required key is absent.
    #[error("{origin}: {key} is missing: {why}")]
    Missing {
        /// Where it should have been.
        origin: Box<Origin>,
        /// The key.
        key: &'static str,
        /// Why it is needed.
        why: &'static str,
    },
}

/// `value` of `key`, given at `origin`, is wrong: `why`.
pub(super) fn invalid(
    origin: &Origin,
    key: &str,
    value: &str,
    why: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        origin: Box::new(origin.clone()),
        key: key.to_string(),
        value: value.to_string(),
        why: why.into(),
    }
}
