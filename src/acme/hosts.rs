//! The host names one certificate is obtained for (a stanza's hosts), and the name of its
//! file. Wildcards are refused here: HTTP-01 proves control of one host name at a time, and a
//! CA issues `*.example.com` only after a DNS-01 challenge.

use std::fmt;

use sha2::{Digest, Sha256};

use crate::names::Hostname;

/// Let's Encrypt's limit of names in one certificate.
pub const MAX_HOSTS: usize = 100;

/// A non-empty set of host names without wildcards, in the order given; two sets with the
/// same names in another order are equal, and share one certificate file.
#[derive(Debug, Clone)]
pub struct HostSet {
    hosts: Vec<Hostname>,
    /// The same names sorted: what equality, order and the file name's hash are taken from.
    sorted: Vec<Hostname>,
}

/// Why a stanza's hosts cannot share one certificate over ACME.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostSetError {
    Empty,
    Wildcard(Hostname),
    TooMany(usize),
}

impl std::fmt::Display for HostSetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostSetError::Empty => write!(f, "a certificate needs at least one host name"),
            HostSetError::Wildcard(w) => write!(
                f,
                "{w}: a wildcard host cannot get a certificate over ACME's HTTP-01 challenge \
                 (the CA issues wildcards only after a DNS-01 challenge); list each host name, \
                 or give the stanza a certificate of its own with ssl: {{key, certificate}}"
            ),
            HostSetError::TooMany(n) => write!(
                f,
                "{n} host names for one certificate: a CA accepts at most {MAX_HOSTS}"
            ),
        }
    }
}

impl std::error::Error for HostSetError {}

impl HostSet {
    /// Checks a stanza's hosts for `ssl: acme`. Duplicates are dropped.
    pub fn new(hosts: &[Hostname]) -> Result<HostSet, HostSetError> {
        if hosts.is_empty() {
            return Err(HostSetError::Empty);
        }
        if let Some(w) = hosts.iter().find(|h| h.is_wildcard()) {
            return Err(HostSetError::Wildcard(w.clone()));
        }
        let mut unique: Vec<Hostname> = Vec::new();
        for h in hosts {
            if !unique.contains(h) {
                unique.push(h.clone());
            }
        }
        if unique.len() > MAX_HOSTS {
            return Err(HostSetError::TooMany(unique.len()));
        }
        let mut sorted = unique.clone();
        sorted.sort();
        Ok(HostSet {
            hosts: unique,
            sorted,
        })
    }

    /// The names, first one first.
    pub fn hosts(&self) -> &[Hostname] {
        &self.hosts
    }

    /// A file name stem that is the same for the same set and differs between sets: the first
    /// host in sorted order (cut to stay well inside a file name's 255 bytes) and 8 hex digits
    /// of the SHA-256 of the sorted names. Host names contain only letters, digits, `-` and
    /// `.`, so the stem is safe in a path and in an Nginx file.
    pub fn file_stem(&self) -> String {
        let mut h = Sha256::new();
        for name in &self.sorted {
            h.update(name.as_str().as_bytes());
            h.update(b"\n");
        }
        let digest = h.finalize();
        let hex: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
        let first = self.sorted[0].as_str();
        let first = &first[..first.len().min(200)];
        format!("{first}-{hex}")
    }

    /// Whether `names` (a certificate's DNS names) are exactly these hosts.
    pub fn matches(&self, names: &[String]) -> bool {
        let mut names: Vec<String> = names.iter().map(|n| n.to_ascii_lowercase()).collect();
        names.sort();
        names.dedup();
        names.len() == self.sorted.len()
            && names.iter().zip(&self.sorted).all(|(a, b)| a == b.as_str())
    }
}

impl PartialEq for HostSet {
    fn eq(&self, other: &HostSet) -> bool {
        self.sorted == other.sorted
    }
}

impl Eq for HostSet {}

impl PartialOrd for HostSet {
    fn partial_cmp(&self, other: &HostSet) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for HostSet {
    fn cmp(&self, other: &HostSet) -> std::cmp::Ordering {
        self.sorted.cmp(&other.sorted)
    }
}

impl fmt::Display for HostSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, h) in self.hosts.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(h.as_str())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> Result<HostSet, HostSetError> {
        let hosts: Vec<Hostname> = names.iter().map(|n| Hostname::new(n).unwrap()).collect();
        HostSet::new(&hosts)
    }

    #[test]
    fn wildcards_are_refused_with_the_reason() {
        let e = set(&["www.example.com", "*.example.com"])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("*.example.com: a wildcard host"), "{e}");
        assert!(
            e.contains("DNS-01") && e.contains("ssl: {key, certificate}"),
            "{e}"
        );
        assert!(set(&[]).is_err());
    }

    #[test]
    fn the_same_names_in_another_order_are_the_same_set_and_file() {
        let a = set(&["www.example.com", "example.com", "WWW.example.com"]).unwrap();
        let b = set(&["example.com", "www.example.com"]).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.hosts().len(), 2);
        assert_eq!(a.to_string(), "www.example.com example.com");
        assert_eq!(a.file_stem(), b.file_stem());
        assert!(
            a.file_stem().starts_with("example.com-"),
            "{}",
            a.file_stem()
        );
        let c = set(&["www.example.com"]).unwrap();
        assert_ne!(a, c);
        assert_ne!(a.file_stem(), c.file_stem());
        assert!(a.matches(&["Example.com".into(), "www.example.com".into()]));
        assert!(!a.matches(&["example.com".into()]));
        assert!(!c.matches(&["www.example.com".into(), "example.com".into()]));
    }

    #[test]
    fn long_names_keep_the_file_name_short() {
        let label = "a".repeat(63);
        let long = format!("{label}.{label}.{label}.{}.example.com", "b".repeat(40));
        let s = set(&[&long]).unwrap();
        assert!(s.file_stem().len() <= 209, "{}", s.file_stem().len());
        let many: Vec<String> = (0..101).map(|i| format!("h{i}.example.com")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(set(&many).unwrap_err().to_string().contains("at most 100"));
    }
}
