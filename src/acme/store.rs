//! keter's ACME files under `ROOT/etc/acme/` (folder mode 0700, files 0600, every file
//! replaced atomically through `atomic_file`):
//!
//! ```text
//! account-HOST-HASH.json   the account at one CA: its key and URL (one file per directory URL)
//! account-HOST-HASH.json.unknown-T   an account the CA said it did not know, set aside
//! certs/STEM.pem           one certificate: private key, certificate, chain (see certificate.rs)
//! ```
//!
//! Only the ACME thread writes here; anyone may read, since a reader sees either the old or
//! the new file, never half of one.

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::certificate::{self, Certificate};
use super::hosts::HostSet;
use crate::atomic_file;

/// The account keter holds at one CA, as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredAccount {
    pub directory: String,
    /// The contact address the account was created or last updated with.
    pub email: Option<String>,
    /// The ACME library's credentials (account URL and private key, base64 PKCS#8).
    pub credentials: serde_json::Value,
}

/// The folder of keter's ACME files.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// The store of keter's root whose `etc/` folder is `etc`.
    pub fn new(etc: &Path) -> Store {
        Store {
            dir: etc.join("acme"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates `acme/` and `acme/certs/` (0700) when they are missing.
    pub fn prepare(&self) -> Result<(), FileError> {
        let certs = self.dir.join("certs");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&certs)
            .map_err(FileError::io("cannot create", &certs))
    }

    /// Where the certificate for `hosts` is kept.
    pub fn certificate_path(&self, hosts: &HostSet) -> PathBuf {
        self.dir
            .join("certs")
            .join(format!("{}.pem", hosts.file_stem()))
    }

    /// The stored certificate for `hosts` if there is one usable at `now`. A file that cannot
    /// be used (unreadable, damaged, for other names, expired) is an error to log; it is
    /// replaced by the next certificate obtained.
    pub fn load_certificate(
        &self,
        hosts: &HostSet,
        now: SystemTime,
    ) -> Result<Option<Certificate>, FileError> {
        let path = self.certificate_path(hosts);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(FileError::io("cannot read", &path)(e)),
        };
        let parsed =
            certificate::check(&bytes, hosts, now).map_err(|why| FileError::Certificate {
                path: path.clone(),
                why,
            })?;
        Ok(Some(stored(path, parsed)))
    }

    /// Checks a key and chain just received for `hosts` and stores them as one file.
    pub fn save_certificate(
        &self,
        hosts: &HostSet,
        key_pem: &str,
        chain_pem: &str,
        now: SystemTime,
    ) -> Result<Certificate, FileError> {
        let mut content = key_pem.trim_end().to_string();
        content.push('\n');
        content.push_str(chain_pem.trim_end());
        content.push('\n');
        let parsed =
            certificate::check(content.as_bytes(), hosts, now).map_err(FileError::FromCa)?;
        let path = self.certificate_path(hosts);
        atomic_file::replace(&path, content.as_bytes(), 0o600)
            .map_err(FileError::io("cannot write", &path))?;
        Ok(stored(path, parsed))
    }

    /// `account-HOST-HASH.json`: the directory's host (and port) for the reader, a hash of the
    /// whole URL so that two directories of one CA (staging, production) get two accounts.
    pub fn account_path(&self, directory: &str) -> PathBuf {
        let authority = directory
            .strip_prefix("https://")
            .unwrap_or(directory)
            .split(['/', '?', '#'])
            .next()
            .unwrap_or("");
        let readable: String = authority
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(100)
            .collect();
        let digest = Sha256::digest(directory.as_bytes());
        let hex: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("account-{readable}-{hex}.json"))
    }

    pub fn load_account(&self, directory: &str) -> Result<Option<StoredAccount>, FileError> {
        let path = self.account_path(directory);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(FileError::io("cannot read", &path)(e)),
        };
        let account: StoredAccount =
            serde_json::from_str(&text).map_err(|source| FileError::Account {
                path: path.clone(),
                source,
            })?;
        if account.directory != directory {
            return Err(FileError::OtherCa {
                path,
                at: account.directory,
                wanted: directory.to_string(),
            });
        }
        Ok(Some(account))
    }

    /// Renames the account file of `directory` out of the way (`.json.unknown-UNIXTIME`) so
    /// that the next attempt opens a new account; it is kept for the operator.
    pub fn set_account_aside(&self, directory: &str) -> Result<PathBuf, FileError> {
        let path = self.account_path(directory);
        let secs = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let aside = path.with_extension(format!("json.unknown-{secs}"));
        fs::rename(&path, &aside).map_err(FileError::io("cannot rename", &path))?;
        Ok(aside)
    }

    pub fn save_account(&self, account: &StoredAccount) -> Result<(), FileError> {
        let path = self.account_path(&account.directory);
        let text = serde_json::to_string_pretty(account).map_err(FileError::Encode)?;
        atomic_file::replace(&path, text.as_bytes(), 0o600)
            .map_err(FileError::io("cannot write", &path))
    }
}

/// Why one of keter's ACME files cannot be used.
#[derive(Debug)]
pub enum FileError {
    /// `what` ("cannot read", "cannot write", ...) failed on `path`.
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// The stored certificate at `path` is not usable (`certificate::check` says why).
    Certificate {
        path: PathBuf,
        why: certificate::CertificateError,
    },
    /// The certificate the CA sent is not usable.
    FromCa(certificate::CertificateError),
    /// `path` is not an account file keter wrote.
    Account {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// `path` holds the account at the CA `at`, not at `wanted`.
    OtherCa {
        path: PathBuf,
        at: String,
        wanted: String,
    },
    /// The account cannot be encoded.
    Encode(serde_json::Error),
}

impl FileError {
    fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FileError + 'a {
        move |source| FileError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileError::Io { what, path, source } => {
                write!(f, "{what} {}: {source}", path.display())
            }
            FileError::Certificate { path, why } => write!(f, "{}: {why}", path.display()),
            FileError::FromCa(why) => {
                write!(f, "the CA sent a certificate keter cannot use: {why}")
            }
            FileError::Account { path, source } => write!(
                f,
                "{}: not an account file keter wrote: {source}",
                path.display()
            ),
            FileError::OtherCa { path, at, wanted } => write!(
                f,
                "{} is the account at {at}, not at {wanted}",
                path.display()
            ),
            FileError::Encode(e) => write!(f, "cannot encode the account: {e}"),
        }
    }
}

impl std::error::Error for FileError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            FileError::Io { source, .. } => Some(source),
            FileError::Account { source, .. } | FileError::Encode(source) => Some(source),
            FileError::Certificate { why, .. } | FileError::FromCa(why) => Some(why),
            FileError::OtherCa { .. } => None,
        }
    }
}

fn stored(path: PathBuf, parsed: certificate::Parsed) -> Certificate {
    Certificate {
        path,
        not_before: parsed.not_before,
        not_after: parsed.not_after,
        serial: parsed.serial,
        names: parsed.names,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acme::certificate::tests::{pem_for, set};
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    fn temp_store(label: &str) -> (PathBuf, Store) {
        let dir = std::env::temp_dir().join(format!(
            "keter-unit-acme-store-{label}-{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let store = Store::new(&dir);
        store.prepare().unwrap();
        (dir, store)
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_saved_certificate_is_private_and_loads_again() {
        let (dir, store) = temp_store("cert");
        assert_eq!(mode(store.dir()), 0o700);
        let hosts = set(&["shop.test", "www.shop.test"]);
        let now = SystemTime::now();
        assert_eq!(store.load_certificate(&hosts, now).unwrap(), None);
        let (key, chain) = pem_for(&["shop.test", "www.shop.test"], now, 90);
        let saved = store.save_certificate(&hosts, &key, &chain, now).unwrap();
        assert_eq!(mode(&saved.path), 0o600);
        assert!(saved.path.starts_with(dir.join("acme/certs")));
        let loaded = store.load_certificate(&hosts, now).unwrap().unwrap();
        assert_eq!(loaded, saved);
        // The same names in another order are the same certificate.
        let again = store
            .load_certificate(&set(&["www.shop.test", "shop.test"]), now)
            .unwrap();
        assert_eq!(again.as_ref(), Some(&saved));
        // Expired: an error to log, not a certificate.
        let later = now + Duration::from_secs(91 * 86_400);
        assert!(store.load_certificate(&hosts, later).is_err());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_bad_certificate_is_never_written() {
        let (dir, store) = temp_store("bad");
        let hosts = set(&["shop.test"]);
        let now = SystemTime::now();
        let (key, chain) = pem_for(&["other.test"], now, 90);
        let e = store
            .save_certificate(&hosts, &key, &chain, now)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not for shop.test"), "{e}");
        assert!(!store.certificate_path(&hosts).exists());
        fs::write(store.certificate_path(&hosts), "damaged").unwrap();
        let e = store.load_certificate(&hosts, now).unwrap_err().to_string();
        assert!(
            e.contains(&store.certificate_path(&hosts).display().to_string()),
            "{e}"
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn one_account_file_per_directory() {
        let (dir, store) = temp_store("account");
        let le = crate::acme::config::LETS_ENCRYPT;
        let staging = "https://acme-staging-v02.api.letsencrypt.org/directory";
        let p = store.account_path(le);
        assert!(
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("account-acme-v02.api.letsencrypt.org-")
        );
        assert_ne!(p, store.account_path(staging));
        assert!(
            store
                .account_path("https://127.0.0.1:14000/dir")
                .to_str()
                .unwrap()
                .contains("account-127.0.0.1_14000-")
        );
        assert!(store.load_account(le).unwrap().is_none());
        let account = StoredAccount {
            directory: le.to_string(),
            email: Some("ops@example.com".into()),
            credentials: serde_json::json!({"id": "https://ca/acct/1"}),
        };
        store.save_account(&account).unwrap();
        assert_eq!(mode(&p), 0o600);
        let back = store.load_account(le).unwrap().unwrap();
        assert_eq!(back.email.as_deref(), Some("ops@example.com"));
        let aside = store.set_account_aside(le).unwrap();
        assert!(store.load_account(le).unwrap().is_none());
        assert_eq!(mode(&aside), 0o600);
        assert!(
            aside.to_str().unwrap().contains(".json.unknown-"),
            "{}",
            aside.display()
        );
        fs::remove_dir_all(dir).unwrap();
    }
}
