//! Every YAML read in keter goes through this module.
//!
//! A file is parsed into a generic tree first and then read key by key with [`Fields`], so that
//! one pass reports every wrong type, every missing key and every unknown key (as a warning)
//! with its path, instead of stopping at the first error the way derived deserialisers do.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde_json::{Map, Value};

use crate::problem::Problems;

/// Text that is not YAML: the parser's error, shown by its message's first line only (the
/// rest is a source excerpt that the caller's own file name replaces).
#[derive(Debug)]
pub struct YamlError(Box<serde_saphyr::Error>);

impl fmt::Display for YamlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let msg = self.0.to_string();
        let first = msg.lines().next().unwrap_or("invalid YAML").trim();
        f.write_str(first.strip_prefix("error: ").unwrap_or(first))
    }
}

impl std::error::Error for YamlError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.0.as_ref())
    }
}

/// Parses YAML text into a generic tree.
pub fn parse(text: &str) -> Result<Value, YamlError> {
    serde_saphyr::from_str::<Value>(text).map_err(|e| YamlError(Box::new(e)))
}

/// Reads and parses a YAML file; problems are recorded in `problems` (file-level key).
pub fn read_file(path: &Path, problems: &mut Problems) -> Option<Value> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            problems.error("", format!("cannot read: {e}"));
            return None;
        }
    };
    match parse(&text) {
        Ok(v) => Some(v),
        Err(e) => {
            problems.error("", format!("invalid YAML: {e}"));
            None
        }
    }
}

/// Serialises a value as YAML (keter's own state files).
pub fn to_string<T: serde::Serialize>(value: &T) -> Result<String, serde_saphyr::SerializeError> {
    serde_saphyr::to_string(value)
}

/// Names a value's YAML type for error messages.
pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing (null)",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// A YAML mapping being read: each getter marks its key as known; [`Fields::finish`] warns
/// about the keys nobody asked for.
pub struct Fields<'a> {
    map: &'a Map<String, Value>,
    prefix: String,
    known: Vec<&'static str>,
}

impl<'a> Fields<'a> {
    /// Starts reading `value` (which must be a mapping) found at `prefix`.
    pub fn new(value: &'a Value, prefix: &str, problems: &mut Problems) -> Option<Fields<'a>> {
        match value {
            Value::Object(map) => Some(Fields {
                map,
                prefix: prefix.to_string(),
                known: Vec::new(),
            }),
            other => {
                problems.error(
                    prefix,
                    format!("expected a mapping of keys, found {}", type_name(other)),
                );
                None
            }
        }
    }

    /// The full key path of `key` (for messages).
    pub fn path(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}.{}", self.prefix, key)
        }
    }

    /// The raw value of `key`, if present and not null; marks the key as known.
    pub fn raw(&mut self, key: &'static str) -> Option<&'a Value> {
        self.known.push(key);
        match self.map.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }

    /// Whether the key is present at all (even when null).
    pub fn contains(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    pub fn string(&mut self, key: &'static str, problems: &mut Problems) -> Option<String> {
        let v = self.raw(key)?;
        as_string(v, &self.path(key), problems)
    }

    pub fn bool(&mut self, key: &'static str, problems: &mut Problems) -> Option<bool> {
        let v = self.raw(key)?;
        match v {
            Value::Bool(b) => Some(*b),
            Value::String(s) => match s.to_ascii_lowercase().as_str() {
                "true" | "yes" | "on" => Some(true),
                "false" | "no" | "off" => Some(false),
                _ => {
                    problems.error(
                        self.path(key),
                        format!("expected true or false, found {s:?}"),
                    );
                    None
                }
            },
            other => {
                problems.error(
                    self.path(key),
                    format!("expected true or false, found {}", type_name(other)),
                );
                None
            }
        }
    }

    /// A non-negative integer no larger than `max`.
    pub fn uint(&mut self, key: &'static str, max: u64, problems: &mut Problems) -> Option<u64> {
        let v = self.raw(key)?;
        as_uint(v, &self.path(key), max, problems)
    }

    /// A size in bytes ([`as_size`]).
    pub fn size(&mut self, key: &'static str, problems: &mut Problems) -> Option<u64> {
        let v = self.raw(key)?;
        as_size(v, &self.path(key), problems)
    }

    /// A list of strings; a single string is accepted as a list of one.
    pub fn strings(&mut self, key: &'static str, problems: &mut Problems) -> Option<Vec<String>> {
        let v = self.raw(key)?;
        let path = self.path(key);
        match v {
            Value::Array(items) => {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    if let Some(s) = as_string(item, &format!("{path}[{i}]"), problems) {
                        out.push(s);
                    }
                }
                Some(out)
            }
            Value::String(_) | Value::Number(_) | Value::Bool(_) => {
                as_string(v, &path, problems).map(|s| vec![s])
            }
            other => {
                problems.error(
                    path,
                    format!("expected a list of strings, found {}", type_name(other)),
                );
                None
            }
        }
    }

    /// A list of names (host names): only strings, or a single string for a list of one. A
    /// number or a boolean is refused, as Keter refuses `hosts: 12`: where a name belongs, a
    /// bare number is a mistake, not a host.
    pub fn names(&mut self, key: &'static str, problems: &mut Problems) -> Option<Vec<String>> {
        let v = self.raw(key)?;
        let path = self.path(key);
        let name = |v: &Value, path: &str, problems: &mut Problems| match v {
            Value::String(s) => Some(s.clone()),
            other => {
                problems.error(
                    path,
                    format!(
                        "expected a host name (a string; quote it if YAML reads it as something else), found {}",
                        type_name(other)
                    ),
                );
                None
            }
        };
        match v {
            Value::Array(items) => {
                let before = problems.errors.len();
                let out: Vec<String> = items
                    .iter()
                    .enumerate()
                    .filter_map(|(i, item)| name(item, &format!("{path}[{i}]"), problems))
                    .collect();
                (problems.errors.len() == before).then_some(out)
            }
            Value::Object(_) => {
                problems.error(
                    path,
                    format!("expected a list of host names, found {}", type_name(v)),
                );
                None
            }
            other => name(other, &path, problems).map(|s| vec![s]),
        }
    }

    /// A mapping of string keys to string values (environment variables).
    pub fn string_map(
        &mut self,
        key: &'static str,
        problems: &mut Problems,
    ) -> Option<BTreeMap<String, String>> {
        let v = self.raw(key)?;
        let path = self.path(key);
        match v {
            Value::Object(map) => {
                let mut out = BTreeMap::new();
                for (k, item) in map {
                    if let Some(s) = as_string(item, &format!("{path}.{k}"), problems) {
                        out.insert(k.clone(), s);
                    }
                }
                Some(out)
            }
            other => {
                problems.error(
                    path,
                    format!(
                        "expected a mapping of names to strings, found {}",
                        type_name(other)
                    ),
                );
                None
            }
        }
    }

    /// Warns about every key that no getter asked for.
    pub fn finish(self, problems: &mut Problems) {
        for key in self.map.keys() {
            if !self.known.iter().any(|k| k == key) {
                problems.warn(self.path(key), "unknown key, ignored");
            }
        }
    }
}

/// A size in bytes as Nginx writes one: a whole number, or a string of digits with `k`, `m`
/// or `g` after it (`10m`); 0 means no limit.
pub fn as_size(v: &Value, path: &str, problems: &mut Problems) -> Option<u64> {
    let parsed = match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => {
            let s = s.trim().to_ascii_lowercase();
            let (digits, unit) = match s.char_indices().last() {
                Some((i, c @ ('k' | 'm' | 'g'))) => (&s[..i], Some(c)),
                _ => (s.as_str(), None),
            };
            let shift = match unit {
                Some('k') => 10,
                Some('m') => 20,
                Some('g') => 30,
                _ => 0,
            };
            digits
                .parse::<u64>()
                .ok()
                .filter(|_| !digits.starts_with('+'))
                .and_then(|n| n.checked_mul(1 << shift))
        }
        _ => None,
    };
    // Nginx keeps sizes in an off_t.
    match parsed {
        Some(n) if n <= i64::MAX as u64 => Some(n),
        _ => {
            problems.error(
                path,
                format!(
                    "expected a size such as 10485760, \"10m\" or 0 for no limit, found {}",
                    match v {
                        Value::String(s) => format!("{s:?}"),
                        Value::Number(n) => n.to_string(),
                        other => type_name(other).to_string(),
                    }
                ),
            );
            None
        }
    }
}

/// A scalar as a string: numbers and booleans are accepted as their text, like Keter did.
pub fn as_string(v: &Value, path: &str, problems: &mut Problems) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        other => {
            problems.error(
                path,
                format!("expected a string, found {}", type_name(other)),
            );
            None
        }
    }
}

/// A non-negative integer (a number, or a string of digits) no larger than `max`.
pub fn as_uint(v: &Value, path: &str, max: u64, problems: &mut Problems) -> Option<u64> {
    let n = match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    match n {
        Some(n) if n <= max => Some(n),
        Some(n) => {
            problems.error(path, format!("{n} is too large (at most {max})"));
            None
        }
        None => {
            let shown = match v {
                Value::String(s) => format!("{s:?}"),
                Value::Number(n) => n.to_string(),
                other => type_name(other).to_string(),
            };
            problems.error(
                path,
                format!("expected a whole number from 0 to {max}, found {shown}"),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keter_booleans_and_numbers() {
        let v = parse("a: yes\nb: off\nc: '80'\nd: 443\n").unwrap();
        let mut p = Problems::new("f.yaml");
        let mut f = Fields::new(&v, "", &mut p).unwrap();
        assert_eq!(f.bool("a", &mut p), Some(true));
        assert_eq!(f.bool("b", &mut p), Some(false));
        assert_eq!(f.uint("c", 65535, &mut p), Some(80));
        assert_eq!(f.uint("d", 65535, &mut p), Some(443));
        f.finish(&mut p);
        assert!(p.errors.is_empty() && p.warnings.is_empty());
    }

    #[test]
    fn errors_name_key_and_unknown_keys_warn() {
        let v = parse("port: [1]\nextra: 1\nlisteners: {x: 1}\n").unwrap();
        let mut p = Problems::new("cfg.yaml");
        let mut f = Fields::new(&v, "", &mut p).unwrap();
        assert_eq!(f.uint("port", 65535, &mut p), None);
        let l = f.raw("listeners").unwrap();
        let mut inner = Fields::new(l, "listeners", &mut p).unwrap();
        inner.raw("host");
        inner.finish(&mut p);
        f.finish(&mut p);
        assert_eq!(
            p.errors[0].to_string(),
            "cfg.yaml: port: expected a whole number from 0 to 65535, found a list"
        );
        let warned: Vec<String> = p.warnings.iter().map(|w| w.key.clone()).collect();
        assert_eq!(warned, vec!["listeners.x", "extra"]);
    }

    #[test]
    fn sizes_as_nginx_writes_them() {
        let v = parse("a: 1048576\nb: 10m\nc: \"2G\"\nd: 0\ne: 5x\nf: -1\n").unwrap();
        let mut p = Problems::new("f.yaml");
        let mut f = Fields::new(&v, "", &mut p).unwrap();
        assert_eq!(f.size("a", &mut p), Some(1 << 20));
        assert_eq!(f.size("b", &mut p), Some(10 << 20));
        assert_eq!(f.size("c", &mut p), Some(2 << 30));
        assert_eq!(f.size("d", &mut p), Some(0));
        assert_eq!(f.size("e", &mut p), None);
        assert_eq!(f.size("f", &mut p), None);
        assert_eq!(p.errors.len(), 2);
    }

    #[test]
    fn host_names_must_be_strings() {
        let v = parse("a: [x.example.com, 12]\nb: 12\nc: y.example.com\nd: {x: 1}\n").unwrap();
        let mut p = Problems::new("f.yaml");
        let mut f = Fields::new(&v, "", &mut p).unwrap();
        assert_eq!(f.names("a", &mut p), None);
        assert_eq!(f.names("b", &mut p), None);
        assert_eq!(
            f.names("c", &mut p),
            Some(vec!["y.example.com".to_string()])
        );
        assert_eq!(f.names("d", &mut p), None);
        let keys: Vec<&str> = p.errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["a[1]", "b", "d"]);
        assert!(
            p.errors[0].message.contains("found a number"),
            "{:?}",
            p.errors
        );
    }

    #[test]
    fn parse_error_is_one_line() {
        let e = parse("a: [\n").unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        assert!(!e.contains('\n'));
    }
}
