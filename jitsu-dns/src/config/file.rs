//! The TOML file: the top-level settings (the long flags with `_`), `[[vm]]` tables with a
//! spec's keys and `[[zone]]` tables, each value kept with its line for messages.
//!
//! Reading and parsing only ([`read`] apart from [`from_toml`], so tests parse strings);
//! validation is the other modules'.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::error::{ConfigError, Origin, invalid};
use super::flags::Flags;
use super::spec::Entry;

/// The TOML file: top-level keys are the long flags with `_`, plus `[[vm]]` and `[[zone]]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    bind: Option<Spanned<toml::Value>>,
    listen: Option<Spanned<toml::Value>>,
    forwarder: Option<Spanned<toml::Value>>,
    forwarder_port: Option<Spanned<toml::Value>>,
    delay: Option<Spanned<toml::Value>>,
    ttl: Option<Spanned<toml::Value>>,
    mode: Option<Spanned<toml::Value>>,
    backend: Option<Spanned<toml::Value>>,
    connect: Option<Spanned<toml::Value>>,
    synjitsu: Option<Spanned<toml::Value>>,
    persistdb: Option<Spanned<toml::Value>>,
    metrics: Option<Spanned<toml::Value>>,
    log_level: Option<Spanned<toml::Value>>,
    max_running: Option<Spanned<toml::Value>>,
    max_boots_per_second: Option<Spanned<toml::Value>>,
    #[serde(default)]
    vm: Vec<Spanned<BTreeMap<String, Spanned<toml::Value>>>>,
    #[serde(default)]
    zone: Vec<Spanned<ZoneFile>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ZoneFile {
    name: Spanned<String>,
    ns: Option<Spanned<String>>,
    ns_address: Option<Spanned<toml::Value>>,
}

/// A value with where it came from.
#[derive(Debug, Clone)]
struct Given {
    value: String,
    origin: Origin,
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map(|t| t.bytes().filter(|b| *b == b'\n').count() + 1)
        .unwrap_or(1)
}

/// Renders a scalar TOML value (or an array of them, for repeatable keys) as the strings a
/// spec would carry.
fn toml_strings(v: &toml::Value) -> Result<Vec<String>, String> {
    match v {
        toml::Value::String(s) => Ok(vec![s.clone()]),
        toml::Value::Integer(i) => Ok(vec![i.to_string()]),
        toml::Value::Float(x) => Ok(vec![x.to_string()]),
        toml::Value::Boolean(b) => Ok(vec![b.to_string()]),
        toml::Value::Array(items) => items
            .iter()
            .map(|i| match i {
                toml::Value::Array(_) | toml::Value::Table(_) => {
                    Err("nested arrays and tables are not accepted here".to_string())
                }
                other => toml_strings(other).map(|mut v| v.remove(0)),
            })
            .collect(),
        toml::Value::Table(_) => Err("expected a value, found a table".into()),
        toml::Value::Datetime(d) => Ok(vec![d.to_string()]),
    }
}

/// Parses a configuration file's text; `path` names it in messages.
pub fn from_toml(text: &str, path: &Path) -> Result<FileSettings, ConfigError> {
    let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
        path: path.to_path_buf(),
        line: e.span().map(|s| line_of(text, s.start)).unwrap_or(1),
        message: e.message().trim().to_string(),
    })?;
    let origin = |span: std::ops::Range<usize>, vm: Option<String>| Origin::File {
        path: path.to_path_buf(),
        line: line_of(text, span.start),
        vm,
    };
    let scalar =
        |key: &str, v: &Option<Spanned<toml::Value>>| -> Result<Option<Given>, ConfigError> {
            let Some(v) = v else { return Ok(None) };
            let o = origin(v.span(), None);
            let strings = toml_strings(v.get_ref()).map_err(|why| invalid(&o, key, "", why))?;
            // A list is accepted where a flag takes a comma-separated list (forwarder).
            Ok(Some(Given {
                value: strings.join(","),
                origin: o,
            }))
        };
    let mut given: HashMap<&'static str, Given> = HashMap::new();
    for (key, v) in [
        ("bind", &file.bind),
        ("listen", &file.listen),
        ("forwarder", &file.forwarder),
        ("forwarder_port", &file.forwarder_port),
        ("delay", &file.delay),
        ("ttl", &file.ttl),
        ("mode", &file.mode),
        ("backend", &file.backend),
        ("connect", &file.connect),
        ("synjitsu", &file.synjitsu),
        ("persistdb", &file.persistdb),
        ("metrics", &file.metrics),
        ("log_level", &file.log_level),
        ("max_running", &file.max_running),
        ("max_boots_per_second", &file.max_boots_per_second),
    ] {
        if let Some(g) = scalar(key, v)? {
            given.insert(key, g);
        }
    }
    let mut vms = Vec::new();
    for table in &file.vm {
        let name = table
            .get_ref()
            .get("name")
            .and_then(|v| v.get_ref().as_str())
            .map(str::to_string);
        let mut entries = Vec::new();
        for (key, v) in table.get_ref() {
            let o = origin(v.span(), name.clone());
            let strings = toml_strings(v.get_ref()).map_err(|why| invalid(&o, key, "", why))?;
            for value in strings {
                entries.push(Entry {
                    key: key.clone(),
                    value,
                    origin: o.clone(),
                });
            }
        }
        vms.push(Table {
            at: origin(table.span(), name),
            entries,
        });
    }
    let mut zones = Vec::new();
    for z in &file.zone {
        let z = z.get_ref();
        let mut entries = vec![Entry {
            key: "name".into(),
            value: z.name.get_ref().clone(),
            origin: origin(z.name.span(), None),
        }];
        if let Some(ns) = &z.ns {
            entries.push(Entry {
                key: "ns".into(),
                value: ns.get_ref().clone(),
                origin: origin(ns.span(), None),
            });
        }
        if let Some(a) = &z.ns_address {
            let o = origin(a.span(), None);
            for value in
                toml_strings(a.get_ref()).map_err(|why| invalid(&o, "ns_address", "", why))?
            {
                entries.push(Entry {
                    key: "ns_address".into(),
                    value,
                    origin: o.clone(),
                });
            }
        }
        zones.push(entries);
    }
    let get = |k: &str| given.get(k).map(|g| g.value.clone());
    // The file's scalar settings travel as flags, with their lines kept for messages.
    let flags = Flags {
        bind: get("bind"),
        listen: get("listen"),
        forwarder: get("forwarder"),
        forwarder_port: get("forwarder_port"),
        delay: get("delay"),
        ttl: get("ttl"),
        mode: get("mode"),
        backend: get("backend"),
        connect: get("connect"),
        synjitsu: get("synjitsu"),
        persistdb: get("persistdb"),
        config: None,
        metrics: get("metrics"),
        log_level: get("log_level"),
        max_running: get("max_running"),
        max_boots_per_second: get("max_boots_per_second"),
        specs: Vec::new(),
    };
    Ok(FileSettings {
        flags,
        origins: given.into_iter().map(|(k, g)| (k, g.origin)).collect(),
        vms,
        zones,
        path: path.to_path_buf(),
    })
}

/// A parsed configuration file, not yet merged with the flags.
#[derive(Debug, Clone)]
pub struct FileSettings {
    /// The top-level settings, as flags would carry them.
    pub(super) flags: Flags,
    /// Where each top-level setting is in the file.
    pub(super) origins: HashMap<&'static str, Origin>,
    /// The `[[vm]]` tables.
    pub(super) vms: Vec<Table>,
    /// The `[[zone]]` tables, each starting with its `name`.
    pub(super) zones: Vec<Vec<Entry>>,
    /// The file.
    pub(super) path: PathBuf,
}

/// A `[[vm]]` table: its keys as a spec's entries, and where it starts.
#[derive(Debug, Clone)]
pub(super) struct Table {
    /// The `[[vm]]` line.
    pub(super) at: Origin,
    /// Its keys, one entry per value.
    pub(super) entries: Vec<Entry>,
}

/// Reads and parses a configuration file.
pub fn read(path: &Path) -> Result<FileSettings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    from_toml(&text, path)
}
