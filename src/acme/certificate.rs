//! A certificate keter obtained, as one PEM file: the private key, then the certificate and
//! the CA's chain (what Nginx's `ssl_certificate` wants). Both Nginx directives can name this
//! one file (Nginx skips the blocks it does not look for), and one rename replaces key and
//! certificate together, so Nginx never reads a key beside another key's certificate.
//!
//! Before a file is written or reused it is checked: it parses, its key belongs to its
//! certificate, the certificate names exactly the hosts asked for, and it has not expired.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::PublicKeyData;
use x509_parser::extensions::GeneralName;
use x509_parser::pem::Pem;

use super::hosts::HostSet;

/// A stored, checked certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    /// The PEM file holding the key and the chain (mode 0600); give it to Nginx as both
    /// `ssl_certificate` and `ssl_certificate_key`.
    pub path: PathBuf,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The serial number in hex, which tells one certificate from the next.
    pub serial: String,
    /// The DNS names the certificate is for.
    pub names: Vec<String>,
}

impl Certificate {
    /// When renewal is due: two thirds into the lifetime (day 60 of Let's Encrypt's 90, as
    /// certbot and Caddy do), leaving a third of it to retry in.
    pub fn renew_at(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO);
        self.not_before + lifetime * 2 / 3
    }
}

/// What a PEM file holds, once parsed and checked against its own key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub serial: String,
    pub names: Vec<String>,
    /// Certificates in the chain, the leaf included.
    pub chain_len: usize,
}

/// Parses a file of PEM blocks: one `PRIVATE KEY` (PKCS#8) and the certificates, the first of
/// which must belong to that key.
pub fn parse(pem: &[u8]) -> Result<Parsed, CertificateError> {
    let mut key: Option<rcgen::KeyPair> = None;
    let mut certs: Vec<Pem> = Vec::new();
    for block in Pem::iter_from_buffer(pem) {
        let block = block.map_err(CertificateError::NotPem)?;
        match block.label.as_str() {
            "PRIVATE KEY" => {
                if key.is_some() {
                    return Err(CertificateError::TwoKeys);
                }
                let k = rcgen::KeyPair::try_from(block.contents.as_slice())
                    .map_err(CertificateError::Key)?;
                key = Some(k);
            }
            "CERTIFICATE" => certs.push(block),
            other => return Err(CertificateError::UnexpectedBlock(other.to_string())),
        }
    }
    let key = key.ok_or(CertificateError::NoKey)?;
    let leaf_pem = certs.first().ok_or(CertificateError::NoCertificate)?;
    let leaf = leaf_pem
        .parse_x509()
        .map_err(|source| CertificateError::Unreadable { index: 1, source })?;
    for (i, c) in certs.iter().enumerate().skip(1) {
        c.parse_x509()
            .map_err(|source| CertificateError::Unreadable {
                index: i + 1,
                source,
            })?;
    }
    if leaf.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
        return Err(CertificateError::NotThePair);
    }
    let time = |t: &x509_parser::time::ASN1Time| -> SystemTime {
        let secs = t.timestamp();
        if secs >= 0 {
            UNIX_EPOCH + Duration::from_secs(secs as u64)
        } else {
            UNIX_EPOCH
        }
    };
    let validity = leaf.validity();
    let mut names = Vec::new();
    if let Ok(Some(san)) = leaf.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    let serial: String = leaf
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(Parsed {
        not_before: time(&validity.not_before),
        not_after: time(&validity.not_after),
        serial,
        names,
        chain_len: certs.len(),
    })
}

/// Parses and checks a file's content for `hosts` at `now`: usable as it is.
pub fn check(pem: &[u8], hosts: &HostSet, now: SystemTime) -> Result<Parsed, CertificateError> {
    let parsed = parse(pem)?;
    if !hosts.matches(&parsed.names) {
        return Err(CertificateError::OtherHosts {
            names: parsed.names,
            hosts: hosts.to_string(),
        });
    }
    if parsed.not_after <= now {
        return Err(CertificateError::Expired(parsed.not_after));
    }
    Ok(parsed)
}

/// Why a certificate file is not usable.
#[derive(Debug)]
pub enum CertificateError {
    NotPem(x509_parser::error::PEMError),
    TwoKeys,
    Key(rcgen::Error),
    /// A PEM block of this label.
    UnexpectedBlock(String),
    NoKey,
    NoCertificate,
    /// Certificate `index` (1: the leaf) cannot be parsed.
    Unreadable {
        index: usize,
        source: x509_parser::nom::Err<x509_parser::error::X509Error>,
    },
    /// The key is not the leaf's.
    NotThePair,
    /// It is for these names, not for `hosts`.
    OtherHosts {
        names: Vec<String>,
        hosts: String,
    },
    Expired(SystemTime),
}

impl std::fmt::Display for CertificateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CertificateError::NotPem(e) => write!(f, "not a PEM file: {e}"),
            CertificateError::TwoKeys => f.write_str("more than one private key"),
            CertificateError::Key(e) => write!(f, "the private key cannot be read: {e}"),
            CertificateError::UnexpectedBlock(label) => {
                write!(f, "an unexpected PEM block {label:?}")
            }
            CertificateError::NoKey => f.write_str("no private key"),
            CertificateError::NoCertificate => f.write_str("no certificate"),
            CertificateError::Unreadable { index: 1, source } => {
                write!(f, "the certificate cannot be read: {source}")
            }
            CertificateError::Unreadable { index, source } => {
                write!(
                    f,
                    "certificate {index} of the chain cannot be read: {source}"
                )
            }
            CertificateError::NotThePair => {
                f.write_str("the private key does not belong to the certificate")
            }
            CertificateError::OtherHosts { names, hosts } if names.is_empty() => {
                write!(f, "the certificate is for no host name, not for {hosts}")
            }
            CertificateError::OtherHosts { names, hosts } => write!(
                f,
                "the certificate is for {}, not for {hosts}",
                names.join(" ")
            ),
            CertificateError::Expired(at) => write!(
                f,
                "the certificate expired at {}",
                crate::report::rfc3339(*at)
            ),
        }
    }
}

impl std::error::Error for CertificateError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CertificateError::NotPem(e) => Some(e),
            CertificateError::Key(e) => Some(e),
            CertificateError::Unreadable { source, .. } => Some(source),
            _ => None,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::names::Hostname;

    /// A key and a self-signed certificate for `names`, valid from `not_before` for `days`,
    /// in the stored file's layout.
    pub(crate) fn pem_for(names: &[&str], not_before: SystemTime, days: u64) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.not_before = not_before.into();
        params.not_after = (not_before + Duration::from_secs(days * 86_400)).into();
        let cert = params.self_signed(&key).unwrap();
        (key.serialize_pem(), cert.pem())
    }

    pub(crate) fn set(names: &[&str]) -> HostSet {
        let hosts: Vec<Hostname> = names.iter().map(|n| Hostname::new(n).unwrap()).collect();
        HostSet::new(&hosts).unwrap()
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn a_good_file_is_read_with_its_dates_and_names() {
        let start = at(1_800_000_000);
        let (key, cert) = pem_for(&["shop.test", "www.shop.test"], start, 90);
        let parsed = check(
            format!("{key}{cert}").as_bytes(),
            &set(&["www.shop.test", "shop.test"]),
            at(1_800_000_100),
        )
        .unwrap();
        assert_eq!(parsed.not_before, start);
        assert_eq!(parsed.not_after, start + Duration::from_secs(90 * 86_400));
        assert_eq!(parsed.chain_len, 1);
        assert!(!parsed.serial.is_empty());
        let c = Certificate {
            path: "/x".into(),
            not_before: parsed.not_before,
            not_after: parsed.not_after,
            serial: parsed.serial,
            names: parsed.names,
        };
        assert_eq!(c.renew_at(), start + Duration::from_secs(60 * 86_400));
    }

    #[test]
    fn wrong_key_names_expiry_and_garbage_are_refused() {
        let start = at(1_800_000_000);
        let (key, cert) = pem_for(&["shop.test"], start, 90);
        let (other_key, _) = pem_for(&["shop.test"], start, 90);
        let hosts = set(&["shop.test"]);
        let now = at(1_800_000_100);
        let e = check(format!("{other_key}{cert}").as_bytes(), &hosts, now)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "the private key does not belong to the certificate");
        let e = check(
            format!("{key}{cert}").as_bytes(),
            &set(&["other.test"]),
            now,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(e, "the certificate is for shop.test, not for other.test");
        let later = start + Duration::from_secs(91 * 86_400);
        let e = check(format!("{key}{cert}").as_bytes(), &hosts, later)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("the certificate expired at "), "{e}");
        assert_eq!(
            check(cert.as_bytes(), &hosts, now).unwrap_err().to_string(),
            "no private key"
        );
        assert_eq!(
            check(key.as_bytes(), &hosts, now).unwrap_err().to_string(),
            "no certificate"
        );
        assert!(check(b"", &hosts, now).is_err());
        let truncated = format!("{key}{}", &cert[..cert.len() / 2]);
        assert!(check(truncated.as_bytes(), &hosts, now).is_err());
    }
}
