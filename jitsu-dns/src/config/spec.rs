//! The VM specs of the command line, `name=www,dns=www.example.org,ip=10.0.0.1,...`, as
//! Jitsu wrote them: split into [`Entry`]s, each with its origin, for [`super::vm`] to
//! validate.

use super::error::{ConfigError, Origin, invalid};

/// One `key=value` of a VM spec or `[[vm]]` table, with its origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// The value, unquoted.
    pub value: String,
    /// Where it was given.
    pub origin: Origin,
}

/// Splits a spec `name=www,dns=www.example.org,...` into entries. Commas inside single or
/// double quotes do not split, and a value wholly inside quotes loses them, so
/// `command="sleep 1, then more"` and `command=sh -c 'a, b'` both work.
pub fn parse_spec(text: &str, index: usize) -> Result<Vec<Entry>, ConfigError> {
    let origin = Origin::Spec { index, vm: None };
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    for c in text.chars() {
        match (quote, c) {
            (None, ',') => parts.push(std::mem::take(&mut cur)),
            (None, '\'' | '"') => {
                quote = Some(c);
                cur.push(c);
            }
            (Some(q), c) if c == q => {
                quote = None;
                cur.push(c);
            }
            _ => cur.push(c),
        }
    }
    if quote.is_some() {
        return Err(invalid(&origin, "spec", text, "unterminated quote"));
    }
    parts.push(cur);
    let mut entries = Vec::new();
    for part in parts {
        if part.trim().is_empty() {
            continue;
        }
        let Some((key, value)) = part.split_once('=') else {
            return Err(invalid(
                &origin,
                part.trim(),
                "",
                "expected key=value (specs look like name=www,dns=www.example.org,ip=10.0.0.1)",
            ));
        };
        let key = key.trim();
        let mut value = value.trim();
        for q in ['"', '\''] {
            if value.len() >= 2 && value.starts_with(q) && value.ends_with(q) {
                value = &value[1..value.len() - 1];
            }
        }
        entries.push(Entry {
            key: key.to_string(),
            value: value.to_string(),
            origin: origin.clone(),
        });
    }
    let name = entries
        .iter()
        .find(|e| e.key == "name")
        .map(|e| e.value.clone());
    for e in &mut entries {
        e.origin = Origin::Spec {
            index,
            vm: name.clone(),
        };
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_quoting() {
        let e = parse_spec("name=a,command=\"sleep 1, 2\",x=' y '", 3).unwrap();
        assert_eq!(e[1].value, "sleep 1, 2");
        assert_eq!(e[2].value, " y ");
        assert_eq!(
            e[0].origin,
            Origin::Spec {
                index: 3,
                vm: Some("a".into())
            }
        );
    }
}
