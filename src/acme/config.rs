//! The global `acme` section: which ACME (RFC 8555) certificate authority keter asks for
//! certificates, who it is, that the operator agrees to the CA's terms, and how often a failed
//! attempt is retried. `docs/acme.md` describes how the section is used.
//!
//! ```yaml
//! acme:
//!   directory: https://acme-v02.api.letsencrypt.org/directory   # the default
//!   email: admin@example.com        # contact for the CA's account; optional
//!   accept-terms: true              # required: agreement to the CA's terms of service
//!   ca-file: /etc/keter/ca.pem      # a private CA's roots for the directory's HTTPS
//!   retry-delay: 60                 # first wait after a failed attempt, doubling...
//!   retry-max-delay: 21600          # ...up to this
//! ```

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::{Error as PemError, PemObject};
use serde_json::Value;

use crate::names::Hostname;
use crate::problem::Problems;
use crate::yaml::{self, Fields};

/// Let's Encrypt's production directory, the default.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// The validated `acme` section.
#[derive(Debug, Clone)]
pub struct AcmeConfig {
    /// The directory URL: `https://` with a host (RFC 8555 6.1 requires HTTPS).
    pub directory: String,
    /// Contact address given to the CA when keter's account is created (`mailto:` added).
    pub email: Option<String>,
    /// Roots trusted for the directory's HTTPS instead of the system's (`ca-file`), read when
    /// the configuration is loaded; empty for the system's trust store.
    pub ca_roots: Vec<CertificateDer<'static>>,
    /// The file `ca_roots` came from, for messages.
    pub ca_file: Option<PathBuf>,
    /// How failed attempts are spaced.
    pub retry: RetryTimings,
}

/// Waits between failed attempts: `first`, doubling up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryTimings {
    pub first: Duration,
    pub max: Duration,
}

impl RetryTimings {
    /// One minute doubling to six hours: a CA outage or a DNS record being fixed is retried
    /// soon, and a host that cannot validate costs Let's Encrypt's limit of five failed
    /// validations per host and hour only once.
    pub const DEFAULT: RetryTimings = RetryTimings {
        first: Duration::from_secs(60),
        max: Duration::from_secs(6 * 3600),
    };
}

/// Reads the `acme` value (`None` when the key is absent: keter then obtains no certificate).
pub fn read(value: Option<&Value>, base: &Path, problems: &mut Problems) -> Option<AcmeConfig> {
    let value = value?;
    let mut f = Fields::new(value, "acme", problems)?;
    let errors_before = problems.errors.len();
    let directory = f
        .string("directory", problems)
        .unwrap_or_else(|| LETS_ENCRYPT.to_string());
    if let Err(e) = check_directory(&directory) {
        problems.error("acme.directory", e);
    }
    let email = f.string("email", problems);
    if let Some(e) = &email
        && let Err(why) = check_email(e)
    {
        problems.error("acme.email", why);
    }
    match f.bool("accept-terms", problems) {
        Some(true) => {}
        Some(false) | None => {
            if !problems.errors.iter().any(|p| p.key == "acme.accept-terms") {
                problems.error(
                    "acme.accept-terms",
                    format!(
                        "required: set it to true to agree to the terms of service of {directory} \
                         (a CA refuses to open an account otherwise)"
                    ),
                );
            }
        }
    }
    let ca_file = f
        .string("ca-file", problems)
        .map(|p| crate::config::normalize(&base.join(p)));
    let ca_roots = match &ca_file {
        None => Vec::new(),
        Some(path) => read_roots(path).unwrap_or_else(|e| {
            problems.error("acme.ca-file", e);
            Vec::new()
        }),
    };
    let first = seconds(&mut f, "retry-delay", RetryTimings::DEFAULT.first, problems);
    let max = seconds(
        &mut f,
        "retry-max-delay",
        RetryTimings::DEFAULT.max,
        problems,
    );
    if first > max {
        problems.error(
            "acme.retry-delay",
            format!(
                "{} s is longer than retry-max-delay ({} s)",
                first.as_secs_f64(),
                max.as_secs_f64()
            ),
        );
    }
    f.finish(problems);
    (problems.errors.len() == errors_before).then_some(AcmeConfig {
        directory,
        email,
        ca_roots,
        ca_file,
        retry: RetryTimings { first, max },
    })
}

/// An `https://` URL with a host and nothing an HTTP client would refuse.
fn check_directory(url: &str) -> Result<(), ValueError> {
    let Some(rest) = url.strip_prefix("https://") else {
        return Err(ValueError::NotHttps(url.to_string()));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.is_empty() {
        return Err(ValueError::NoHost(url.to_string()));
    }
    match url.parse::<http::Uri>() {
        Ok(u) if u.host().is_some() => Ok(()),
        _ => Err(ValueError::NotAUrl(url.to_string())),
    }
}

/// Why a value of the `acme` section is refused; each variant keeps the value.
#[derive(Debug)]
enum ValueError {
    NotHttps(String),
    NoHost(String),
    NotAUrl(String),
    NoAt(String),
    NotPlain(String),
    NotADomain { email: String, domain: String },
    ReadRoots { path: PathBuf, source: io::Error },
    NoRoots(PathBuf),
    NotPem { path: PathBuf, source: PemError },
}

impl fmt::Display for ValueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValueError::NotHttps(url) => write!(
                f,
                "{url:?} is not an https:// URL (ACME directories are served over HTTPS only)"
            ),
            ValueError::NoHost(url) => write!(f, "{url:?} names no host"),
            ValueError::NotAUrl(url) => write!(f, "{url:?} is not a valid URL"),
            ValueError::NoAt(email) => {
                write!(f, "{email:?} is not an e-mail address (no '@')")
            }
            ValueError::NotPlain(email) => write!(f, "{email:?} is not a plain e-mail address"),
            ValueError::NotADomain { email, domain } => write!(
                f,
                "{email:?} is not an e-mail address: {domain:?} is not a domain name"
            ),
            ValueError::ReadRoots { path, source } => {
                write!(f, "cannot read {}: {source}", path.display())
            }
            ValueError::NoRoots(path) => write!(
                f,
                "{} holds no PEM certificate (BEGIN CERTIFICATE)",
                path.display()
            ),
            ValueError::NotPem { path, source } => {
                write!(
                    f,
                    "{}: not a PEM certificate file: {source}",
                    path.display()
                )
            }
        }
    }
}

impl std::error::Error for ValueError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ValueError::ReadRoots { source, .. } => Some(source),
            ValueError::NotPem { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A plain `local@domain` address: the CA turns it into a `mailto:` URL and rejects anything
/// fancier anyway.
fn check_email(email: &str) -> Result<(), ValueError> {
    let Some((local, domain)) = email.split_once('@') else {
        return Err(ValueError::NoAt(email.to_string()));
    };
    let bad_local = local.is_empty()
        || local
            .chars()
            .any(|c| !c.is_ascii_graphic() || "\"(),:;<>@[\\]".contains(c));
    if bad_local {
        return Err(ValueError::NotPlain(email.to_string()));
    }
    match Hostname::new(domain) {
        Ok(h) if !h.is_wildcard() && domain.contains('.') => Ok(()),
        _ => Err(ValueError::NotADomain {
            email: email.to_string(),
            domain: domain.to_string(),
        }),
    }
}

/// The certificates of a PEM file, at least one.
fn read_roots(path: &Path) -> Result<Vec<CertificateDer<'static>>, ValueError> {
    let bytes = std::fs::read(path).map_err(|source| ValueError::ReadRoots {
        path: path.to_path_buf(),
        source,
    })?;
    let roots: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&bytes).collect();
    match roots {
        Ok(r) if !r.is_empty() => Ok(r),
        Ok(_) => Err(ValueError::NoRoots(path.to_path_buf())),
        Err(source) => Err(ValueError::NotPem {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// A number of seconds up to 30 days (fractions allowed: tests use short waits).
fn seconds(
    f: &mut Fields,
    key: &'static str,
    default: Duration,
    problems: &mut Problems,
) -> Duration {
    let Some(v) = f.raw(key) else {
        return default;
    };
    let n = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    match n {
        Some(s) if s.is_finite() && s > 0.0 && s <= 30.0 * 86_400.0 => Duration::from_secs_f64(s),
        _ => {
            problems.error(
                f.path(key),
                format!(
                    "expected a number of seconds above 0 and up to 30 days, found {}",
                    match v {
                        Value::String(s) => format!("{s:?}"),
                        Value::Number(n) => n.to_string(),
                        other => yaml::type_name(other).to_string(),
                    }
                ),
            );
            default
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_str(text: &str) -> (Option<AcmeConfig>, Problems) {
        let mut problems = Problems::new("keter-config.yaml");
        let tree = crate::yaml::parse(text).unwrap();
        let c = read(tree.get("acme"), Path::new("/etc/keter"), &mut problems);
        (c, problems)
    }

    #[test]
    fn absent_section_means_no_acme_and_defaults_apply_otherwise() {
        assert!(read_str("root: /r\n").0.is_none());
        let (c, p) = read_str("acme: {accept-terms: true}\n");
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        let c = c.unwrap();
        assert_eq!(c.directory, LETS_ENCRYPT);
        assert_eq!((c.email, c.ca_file), (None, None));
        assert_eq!(c.retry, RetryTimings::DEFAULT);
    }

    #[test]
    fn terms_must_be_accepted() {
        for text in [
            "acme: {email: a@example.com}\n",
            "acme: {accept-terms: no}\n",
        ] {
            let (c, p) = read_str(text);
            assert!(c.is_none());
            assert_eq!(p.errors.len(), 1, "{:?}", p.errors);
            assert_eq!(p.errors[0].key, "acme.accept-terms");
            assert!(
                p.errors[0].message.contains(LETS_ENCRYPT),
                "{}",
                p.errors[0]
            );
        }
    }

    #[test]
    fn every_bad_value_is_named() {
        let (c, p) = read_str(
            "acme: {directory: 'http://ca.example/dir', email: 'a b@example.com', accept-terms: true, \
             ca-file: /nonexistent/ca.pem, retry-delay: 0, retry-max-delay: soon, colour: red}\n",
        );
        assert!(c.is_none());
        let keys: Vec<&str> = p.errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "acme.directory",
                "acme.email",
                "acme.ca-file",
                "acme.retry-delay",
                "acme.retry-max-delay"
            ]
        );
        assert!(p.errors[2].message.contains("/nonexistent/ca.pem"));
        assert_eq!(p.warnings[0].key, "acme.colour");
        for bad in ["https:///dir", "https://a b/dir", "ftp://x/"] {
            assert!(check_directory(bad).is_err(), "{bad}");
        }
        for bad in [
            "nobody",
            "@example.com",
            "a@b",
            "a@*.example.com",
            "a<b>@example.com",
        ] {
            assert!(check_email(bad).is_err(), "{bad}");
        }
        assert!(check_email("ops+keter@mail.example.com").is_ok());
        assert!(check_directory("https://127.0.0.1:14000/dir").is_ok());
    }

    #[test]
    fn reads_a_private_ca_and_refuses_a_file_without_certificates() {
        let dir = std::env::temp_dir().join(format!("keter-unit-acme-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".to_string()]).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.cert.pem()).unwrap();
        std::fs::write(dir.join("empty.pem"), "nothing here\n").unwrap();
        let text = format!(
            "acme: {{directory: 'https://127.0.0.1:14000/dir', accept-terms: true, ca-file: {}/ca.pem, retry-delay: 0.5, retry-max-delay: 2}}\n",
            dir.display()
        );
        let (c, p) = read_str(&text);
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        let c = c.unwrap();
        assert_eq!(c.ca_roots.len(), 1);
        assert_eq!(c.ca_roots[0].as_ref(), ca.cert.der().as_ref());
        assert_eq!(
            c.retry,
            RetryTimings {
                first: Duration::from_millis(500),
                max: Duration::from_secs(2)
            }
        );
        let text = format!(
            "acme: {{accept-terms: true, ca-file: {}/empty.pem}}\n",
            dir.display()
        );
        let (_, p) = read_str(&text);
        assert!(
            p.errors[0].message.contains("holds no PEM certificate"),
            "{:?}",
            p.errors
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
