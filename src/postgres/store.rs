//! The credentials file `ROOT/etc/postgres.yaml`, in Keter's format: a mapping from app name to
//! `{name, user, pass, server, port}` (Keter's `DBInfo`; `server` defaults to `localhost` and
//! `port` to 5432 when absent), so that a file written by Keter is read as it is.
//!
//! The file holds passwords: it is created with mode 0600 when it is opened (never chmodded
//! afterwards, which would leave a window), and replaced atomically (temp file, fsync, rename,
//! fsync of the folder) so that a crash leaves either the old or the new records.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use super::Secret;
use crate::problem::Problems;
use crate::yaml::{self, Fields, YamlError};

/// Keter's defaults for records without a server.
const DEFAULT_SERVER: &str = "localhost";
const DEFAULT_PORT: u16 = 5432;

/// One app's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEntry {
    /// The database.
    pub name: String,
    /// The role.
    pub user: String,
    pub pass: Secret,
    /// Where the database was created (a host or a socket folder).
    pub server: String,
    pub port: u16,
}

/// Why the credentials file cannot be used. Never contains a password.
/// Why the credentials file cannot be used; `path` is the file.
#[derive(Debug)]
pub enum StoreError {
    Read {
        path: PathBuf,
        source: io::Error,
    },
    Invalid {
        path: PathBuf,
        why: Invalid,
    },
    Write {
        path: PathBuf,
        source: io::Error,
    },
    /// The entries cannot be written as YAML.
    Render {
        path: PathBuf,
        source: Box<serde_saphyr::SerializeError>,
    },
}

/// What is wrong in the credentials file.
#[derive(Debug)]
pub enum Invalid {
    Yaml(YamlError),
    /// The top level is not a mapping but this (a YAML type's name).
    NotAMapping(&'static str),
    /// Entries with wrong or missing keys: `KEY: MESSAGE` each.
    Entries(Vec<String>),
    /// A recorded name keter would not have made: `APP.KEY` and why.
    Entry {
        key: String,
        why: super::PgNameError,
    },
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Invalid::Yaml(e) => write!(f, "invalid YAML: {e}"),
            Invalid::NotAMapping(found) => {
                write!(f, "expected a mapping of app names, found {found}")
            }
            Invalid::Entries(all) => f.write_str(&all.join("; ")),
            Invalid::Entry { key, why } => write!(f, "{key}: {why}"),
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Read { path, source } => {
                write!(f, "cannot read {}: {source}", path.display())
            }
            StoreError::Invalid { path, why } => {
                write!(f, "{}: {why}; the file is left as it is", path.display())
            }
            StoreError::Write { path, source } => {
                write!(f, "cannot write {}: {source}", path.display())
            }
            StoreError::Render { path, source } => {
                write!(f, "cannot write {}: {source}", path.display())
            }
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Read { source, .. } | StoreError::Write { source, .. } => Some(source),
            StoreError::Render { source, .. } => Some(source.as_ref()),
            StoreError::Invalid {
                why: Invalid::Yaml(e),
                ..
            } => Some(e),
            StoreError::Invalid {
                why: Invalid::Entry { why, .. },
                ..
            } => Some(why),
            StoreError::Invalid { .. } => None,
        }
    }
}

/// Reads every record; a missing file has none.
pub fn read(path: &Path) -> Result<BTreeMap<String, StoredEntry>, StoreError> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(source) => {
            return Err(StoreError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    if let Ok(meta) = fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        log::warn!(
            "{} holds database passwords but other users may read it (mode {:o}); run chmod 600 on it",
            path.display(),
            meta.permissions().mode() & 0o777
        );
    }
    parse(&text).map_err(|why| StoreError::Invalid {
        path: path.to_path_buf(),
        why,
    })
}

/// Parses the file's text; the error lists every problem with its key.
fn parse(text: &str) -> Result<BTreeMap<String, StoredEntry>, Invalid> {
    let tree = yaml::parse(text).map_err(Invalid::Yaml)?;
    let mut out = BTreeMap::new();
    let map = match tree {
        Value::Null => return Ok(out),
        Value::Object(map) => map,
        other => return Err(Invalid::NotAMapping(yaml::type_name(&other))),
    };
    let mut problems = Problems::new("");
    for (app, value) in &map {
        let Some(mut f) = Fields::new(value, app, &mut problems) else {
            continue;
        };
        let required = |f: &mut Fields, key: &'static str, problems: &mut Problems| {
            let v = f.string(key, problems);
            if v.is_none() && !problems.errors.iter().any(|e| e.key == f.path(key)) {
                problems.error(f.path(key), "required");
            }
            v
        };
        let name = required(&mut f, "name", &mut problems);
        let user = required(&mut f, "user", &mut problems);
        let pass = required(&mut f, "pass", &mut problems);
        let server = f
            .string("server", &mut problems)
            .unwrap_or_else(|| DEFAULT_SERVER.to_string());
        let port = f
            .uint("port", 65535, &mut problems)
            .map_or(DEFAULT_PORT, |p| p as u16);
        f.finish(&mut problems);
        if let (Some(name), Some(user), Some(pass)) = (name, user, pass) {
            out.insert(
                app.clone(),
                StoredEntry {
                    name,
                    user,
                    pass: Secret::new(pass),
                    server,
                    port,
                },
            );
        }
    }
    for w in &problems.warnings {
        log::warn!("postgres.yaml: {}: {}", w.key, w.message);
    }
    if problems.has_errors() {
        let all: Vec<String> = problems
            .errors
            .iter()
            .map(|e| format!("{}: {}", e.key, e.message))
            .collect();
        return Err(Invalid::Entries(all));
    }
    Ok(out)
}

/// Keter's field names, in Keter's order.
#[derive(Serialize)]
struct Record<'a> {
    name: &'a str,
    user: &'a str,
    pass: &'a str,
    server: &'a str,
    port: u16,
}

fn render(entries: &BTreeMap<String, StoredEntry>) -> Result<String, serde_saphyr::SerializeError> {
    let records: BTreeMap<&str, Record> = entries
        .iter()
        .map(|(app, e)| {
            (
                app.as_str(),
                Record {
                    name: &e.name,
                    user: &e.user,
                    pass: e.pass.expose(),
                    server: &e.server,
                    port: e.port,
                },
            )
        })
        .collect();
    yaml::to_string(&records)
}

/// Replaces the file with `entries`: a fresh temp file created 0600, fsync, rename over the
/// old file, fsync of the folder.
pub fn write(path: &Path, entries: &BTreeMap<String, StoredEntry>) -> Result<(), StoreError> {
    let text = render(entries).map_err(|source| StoreError::Render {
        path: path.to_path_buf(),
        source: Box::new(source),
    })?;
    crate::atomic_file::replace(path, text.as_bytes(), 0o600).map_err(|source| StoreError::Write {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A file as Keter's plugin wrote it (its `DBInfo`; the second record from a version that
    /// did not write the server).
    const KETER_FILE: &str = "\
blog:
  name: blogqwhkzvyxpa
  user: blogmfkdsuwpel
  pass: jzkxqvwhre
  server: localhost
  port: 5432
shop:
  name: shopabcdefghij
  pass: klmnopqrst
  user: shopuvwxyzabcd
";

    fn temp_dir(label: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("keter-unit-{label}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn reads_a_file_written_by_keter() {
        let entries = parse(KETER_FILE).unwrap();
        assert_eq!(entries.len(), 2);
        let blog = &entries["blog"];
        assert_eq!(blog.name, "blogqwhkzvyxpa");
        assert_eq!(blog.user, "blogmfkdsuwpel");
        assert_eq!(blog.pass.expose(), "jzkxqvwhre");
        assert_eq!((blog.server.as_str(), blog.port), ("localhost", 5432));
        let shop = &entries["shop"];
        assert_eq!((shop.server.as_str(), shop.port), ("localhost", 5432));
    }

    #[test]
    fn empty_and_invalid_files() {
        assert!(parse("").unwrap().is_empty());
        let e = parse("blog: {name: b, pass: p}\nshop: [1]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("blog.user: required"), "{e}");
        assert!(e.contains("shop: expected a mapping"), "{e}");
        assert!(!e.contains(": p"), "the password leaked into {e}");
        assert!(parse("- a\n").is_err());
    }

    #[test]
    fn written_file_is_0600_keters_format_and_reads_back() {
        let dir = temp_dir("store");
        let path = dir.join("postgres.yaml");
        let mut entries = parse(KETER_FILE).unwrap();
        entries.insert(
            "new".into(),
            StoredEntry {
                name: "new".into(),
                user: "new".into(),
                // Looks like a number and has YAML syntax in it: must come back as written.
                pass: Secret::new("0123: #'\"".into()),
                server: "/var/run/postgresql".into(),
                port: 5433,
            },
        );
        write(&path, &entries).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(read(&path).unwrap(), entries);
        let text = fs::read_to_string(&path).unwrap();
        for key in ["name:", "user:", "pass:", "server:", "port:"] {
            assert!(text.contains(key), "{key} missing in {text}");
        }
        // Rewriting over a group-readable file (as Keter left it) gives a 0600 file again.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        write(&path, &entries).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert!(!dir.join(".postgres.yaml.tmp").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_file_has_no_records() {
        assert!(
            read(Path::new("/nonexistent/postgres.yaml"))
                .unwrap()
                .is_empty()
        );
    }
}
