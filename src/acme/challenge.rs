//! HTTP-01 answers in keter's ACME webroot (`acme-webroot`): the file
//! `WEBROOT/.well-known/acme-challenge/TOKEN` holding the key authorization, which the Nginx
//! files already serve on every plain HTTP host (the same folder certbot's webroot mode
//! writes to). Files are readable by everyone (Nginx's workers run as another user) and
//! removed when the attempt ends, whether it succeeded or not.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::atomic_file;

/// The challenge files of one attempt; dropping it removes them.
#[derive(Debug)]
pub struct Challenges {
    dir: PathBuf,
    written: Vec<PathBuf>,
}

impl Challenges {
    /// Prepares `WEBROOT/.well-known/acme-challenge/` (0755).
    pub fn new(webroot: &Path) -> Result<Challenges, ChallengeError> {
        let dir = webroot.join(".well-known").join("acme-challenge");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&dir)
            .map_err(|source| ChallengeError::Create {
                path: dir.clone(),
                source,
            })?;
        // Nginx's workers must be able to enter every folder down to the token, whatever the
        // umask of whoever created them.
        for d in [webroot.join(".well-known"), dir.clone()] {
            let _ = fs::set_permissions(&d, fs::Permissions::from_mode(0o755));
        }
        Ok(Challenges {
            dir,
            written: Vec::new(),
        })
    }

    /// Writes the answer for `token`. The token comes from the CA: it must be base64url
    /// (RFC 8555 8.1), so it cannot name another path.
    pub fn write(&mut self, token: &str, key_authorization: &str) -> Result<(), ChallengeError> {
        check_token(token)?;
        let path = self.dir.join(token);
        atomic_file::replace(&path, key_authorization.as_bytes(), 0o644).map_err(|source| {
            ChallengeError::Write {
                path: path.clone(),
                source,
            }
        })?;
        self.written.push(path);
        Ok(())
    }
}

impl Drop for Challenges {
    fn drop(&mut self) {
        for p in &self.written {
            if let Err(e) = fs::remove_file(p)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                log::warn!("acme: cannot remove {}: {e}", p.display());
            }
        }
    }
}

fn check_token(token: &str) -> Result<(), ChallengeError> {
    let ok = !token.is_empty()
        && token.len() <= 256
        && token
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ChallengeError::Token(token.chars().take(80).collect()))
    }
}

/// Why a challenge answer cannot be given.
#[derive(Debug)]
pub enum ChallengeError {
    /// The challenge folder cannot be made.
    Create { path: PathBuf, source: io::Error },
    /// The answer cannot be written.
    Write { path: PathBuf, source: io::Error },
    /// The CA's token is not base64url (its first 80 characters).
    Token(String),
}

impl fmt::Display for ChallengeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChallengeError::Create { path, source } => {
                write!(f, "cannot create {}: {source}", path.display())
            }
            ChallengeError::Write { path, source } => {
                write!(f, "cannot write {}: {source}", path.display())
            }
            ChallengeError::Token(token) => write!(
                f,
                "the CA sent a challenge token that is not base64url: {token:?}"
            ),
        }
    }
}

impl std::error::Error for ChallengeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ChallengeError::Create { source, .. } | ChallengeError::Write { source, .. } => {
                Some(source)
            }
            ChallengeError::Token(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_world_readable_and_gone_after_the_attempt() {
        let root =
            std::env::temp_dir().join(format!("keter-unit-acme-chal-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let mut c = Challenges::new(&root).unwrap();
        c.write("tok-EN_1", "tok-EN_1.thumb").unwrap();
        let file = root.join(".well-known/acme-challenge/tok-EN_1");
        assert_eq!(fs::read_to_string(&file).unwrap(), "tok-EN_1.thumb");
        let mode = fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        let dir_mode = fs::metadata(file.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o755);
        for bad in ["../../etc/passwd", "a/b", "", "a.b", "tok\n"] {
            assert!(c.write(bad, "x").is_err(), "{bad:?}");
        }
        drop(c);
        assert!(!file.exists());
        fs::remove_dir_all(&root).unwrap();
    }
}
