//! The TOML file: the top-level settings (the long flags with `_`, read into [`Flags`]),
//! `[[vm]]` tables with a spec's keys and `[[zone]]` tables, each value kept with its line
//! for messages.
//!
//! Reading and parsing only ([`read`] apart from [`from_toml`], so tests parse strings);
//! validation is the other modules'.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, ValueDeserializer};

use super::error::{ConfigError, Origin, invalid};
use super::flags::Flags;
use super::spec::Entry;

/// A `[[vm]]` table as written: each key with its value and place.
type VmFile = Spanned<BTreeMap<String, Spanned<toml::Value>>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ZoneFile {
    name: Spanned<String>,
    ns: Option<Spanned<String>>,
    ns_address: Option<Spanned<toml::Value>>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map(|t| t.bytes().filter(|b| *b == b'\n').count() + 1)
        .unwrap_or(1)
}

/// Renders a scalar TOML value (or an array of them, for repeatable keys) as the strings a
/// spec would carry.
pub(super) fn toml_strings(v: &toml::Value) -> Result<Vec<String>, String> {
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
    let syntax = |e: toml::de::Error| ConfigError::Syntax {
        path: path.to_path_buf(),
        line: e.span().map(|s| line_of(text, s.start)).unwrap_or(1),
        message: e.message().trim().to_string(),
    };
    let mut root = DeTable::parse(text).map_err(syntax)?;
    // The tables are read apart, so that what is left is exactly the flags' settings.
    let vm_tables = root.get_mut().remove("vm");
    let zone_tables = root.get_mut().remove("zone");
    let flags = Flags::deserialize(toml::de::Deserializer::from(root)).map_err(syntax)?;
    let vm_tables: Vec<VmFile> = tables(vm_tables).map_err(syntax)?;
    let zone_tables: Vec<Spanned<ZoneFile>> = tables(zone_tables).map_err(syntax)?;
    let mut file = FileSettings {
        flags,
        vms: Vec::new(),
        zones: Vec::new(),
        path: path.to_path_buf(),
        text: text.to_string(),
    };
    for table in &vm_tables {
        let name = table
            .get_ref()
            .get("name")
            .and_then(|v| v.get_ref().as_str())
            .map(str::to_string);
        let mut entries = Vec::new();
        for (key, v) in table.get_ref() {
            let o = file.origin(v.span(), name.clone());
            let strings = toml_strings(v.get_ref()).map_err(|why| invalid(&o, key, "", why))?;
            for value in strings {
                entries.push(Entry {
                    key: key.clone(),
                    value,
                    origin: o.clone(),
                });
            }
        }
        let at = file.origin(table.span(), name);
        file.vms.push(Table { at, entries });
    }
    for z in &zone_tables {
        let z = z.get_ref();
        let mut entries = vec![Entry {
            key: "name".into(),
            value: z.name.get_ref().clone(),
            origin: file.origin(z.name.span(), None),
        }];
        if let Some(ns) = &z.ns {
            entries.push(Entry {
                key: "ns".into(),
                value: ns.get_ref().clone(),
                origin: file.origin(ns.span(), None),
            });
        }
        if let Some(a) = &z.ns_address {
            let o = file.origin(a.span(), None);
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
        file.zones.push(entries);
    }
    Ok(file)
}

/// An array of tables (`[[vm]]`, `[[zone]]`) taken out of the document, if it has one.
fn tables<'de, T: Deserialize<'de>>(
    value: Option<Spanned<toml::de::DeValue<'de>>>,
) -> Result<Vec<T>, toml::de::Error> {
    match value {
        Some(v) => Vec::deserialize(ValueDeserializer::from(v)),
        None => Ok(Vec::new()),
    }
}

/// A parsed configuration file, not yet merged with the flags.
#[derive(Debug, Clone)]
pub struct FileSettings {
    /// The top-level settings, as the flags carry them.
    pub(super) flags: Flags,
    /// The `[[vm]]` tables.
    pub(super) vms: Vec<Table>,
    /// The `[[zone]]` tables, each starting with its `name`.
    pub(super) zones: Vec<Vec<Entry>>,
    /// The file.
    pub(super) path: PathBuf,
    /// Its text, to tell the line of a value.
    text: String,
}

impl FileSettings {
    /// Where the value at byte `span` stands (inside the `[[vm]]` named `vm`).
    pub(super) fn origin(&self, span: Range<usize>, vm: Option<String>) -> Origin {
        Origin::File {
            path: self.path.clone(),
            line: line_of(&self.text, span.start),
            vm,
        }
    }
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
