//! Validated values: the only forms in which user input may reach an Nginx file, a path on
//! disk or a process environment.
//!
//! Each type checks its invariant in its constructor and cannot be built otherwise, so a
//! template that takes a `Hostname` cannot be handed `evil.com;}` (Piku PR #62 was an
//! unescaped value breaking the Nginx file).

use std::fmt;

use serde::Serialize;

/// An app's name: the bundle file name without `.keter`. Letters, digits, `-`, `_`, `.`;
/// 1 to 100 bytes; not starting with `.` or `-` (hidden files, option-like names).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct AppName(String);

impl AppName {
    pub const MAX_LEN: usize = 100;

    pub fn new(name: &str) -> Result<AppName, NameError> {
        if AppName::is_valid(name) {
            return Ok(AppName(name.to_string()));
        }
        if name.is_empty() {
            return Err(NameError::AppEmpty);
        }
        if name.len() > Self::MAX_LEN {
            return Err(NameError::AppTooLong(name.len()));
        }
        if name.starts_with('.') || name.starts_with('-') {
            return Err(NameError::AppStart(name.to_string()));
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return Err(NameError::AppChar(name.to_string(), c));
        }
        Ok(AppName(name.to_string()))
    }

    /// Whether [`AppName::new`] takes `name`, without making one (the request log checks the
    /// app of every line).
    pub fn is_valid(name: &str) -> bool {
        !name.is_empty()
            && name.len() <= Self::MAX_LEN
            && !name.starts_with(['.', '-'])
            && name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    }

    /// The app name of a bundle file name (`hello.keter` -> `hello`), if it is one.
    pub fn from_bundle_file_name(file_name: &str) -> Option<Result<AppName, NameError>> {
        let stem = file_name.strip_suffix(".keter")?;
        Some(AppName::new(stem))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AppName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A host name as Nginx's `server_name` will see it: RFC 1123 labels (letters, digits, inner
/// `-`, 1-63 bytes each) plus `_`, which Keter accepts and real host names such as `keter1_0`
/// use; at most 253 bytes. A label may be `*`, matching any one label in that position, as
/// Keter allows (`*.example.com`, `bar.*.*.example.com`); a wildcard host must have at least
/// two other labels, so `*` alone is refused, and so is the single label `_`, which is Nginx's
/// catch-all name.
///
/// Names compare case-insensitively (as Keter's do); [`Hostname::original`] keeps the name as
/// written, which Keter puts into `APPROOT` and redirect targets.
#[derive(Debug, Clone)]
pub struct Hostname {
    /// Lower case: what Nginx matches and what names compare by.
    lower: String,
    /// As written in the configuration.
    original: String,
}

impl PartialEq for Hostname {
    fn eq(&self, other: &Hostname) -> bool {
        self.lower == other.lower
    }
}

impl Eq for Hostname {}

impl std::hash::Hash for Hostname {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.lower.hash(state)
    }
}

impl PartialOrd for Hostname {
    fn partial_cmp(&self, other: &Hostname) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Hostname {
    fn cmp(&self, other: &Hostname) -> std::cmp::Ordering {
        self.lower.cmp(&other.lower)
    }
}

impl Serialize for Hostname {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.lower)
    }
}

impl Hostname {
    pub fn new(host: &str) -> Result<Hostname, NameError> {
        let lower = host.to_ascii_lowercase();
        if lower.is_empty() {
            return Err(NameError::HostEmpty);
        }
        if lower.len() > 253 {
            return Err(NameError::HostTooLong(lower.len()));
        }
        if lower == "_" {
            return Err(NameError::CatchAll);
        }
        let labels: Vec<&str> = lower.split('.').collect();
        for label in &labels {
            if *label == "*" {
                continue;
            }
            if let Err(why) = check_label(label) {
                return Err(NameError::Label(host.to_string(), why));
            }
        }
        let concrete = labels.iter().filter(|l| **l != "*").count();
        if lower.contains('*') && concrete < 2 {
            return Err(NameError::Label(host.to_string(), Label::LoneWildcard));
        }
        Ok(Hostname {
            lower,
            original: host.to_string(),
        })
    }

    /// The name in lower case.
    pub fn as_str(&self) -> &str {
        &self.lower
    }

    /// The name as written (Keter keeps it so in `APPROOT` and redirect targets).
    pub fn original(&self) -> &str {
        &self.original
    }

    pub fn is_wildcard(&self) -> bool {
        self.lower.contains('*')
    }

    /// The name as Nginx's `server_name` takes it. Nginx's own `*.example.com` would also
    /// match `a.b.example.com`, and it has no wildcard in the middle, so every wildcard host is
    /// an anchored regular expression with `[^.]+` for each `*` (exact names still win over
    /// it in Nginx, as in Keter).
    pub fn server_name(&self) -> String {
        if !self.is_wildcard() {
            return self.lower.clone();
        }
        format!("~^{}$", self.pattern())
    }

    /// The name as an unanchored regular expression: `.` escaped, each `*` one label.
    pub fn pattern(&self) -> String {
        self.lower
            .split('.')
            .map(|l| if l == "*" { "[^.]+" } else { l })
            .collect::<Vec<_>>()
            .join("\\.")
    }
}

fn check_label(label: &str) -> Result<(), Label> {
    if label.is_empty() {
        return Err(Label::Empty);
    }
    if label.len() > 63 {
        return Err(Label::TooLong(label.to_string()));
    }
    if let Some(c) = label
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(Label::Char(c));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(Label::Hyphen(label.to_string()));
    }
    Ok(())
}

impl fmt::Display for Hostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.lower)
    }
}

/// A host a stanza answers: a [`Hostname`] and, as Keter allows (`127.0.0.1:8000`), a port.
/// Keter matches the whole `Host` header first and then the header without its port, so a
/// host with a port answers only requests whose `Host` carries that very port, and a host
/// without one answers every port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Host {
    pub name: Hostname,
    pub port: Option<u16>,
    /// `name[:port]` in lower case: the `Host` header that reaches this stanza.
    text: String,
}

impl Host {
    pub fn new(text: &str) -> Result<Host, NameError> {
        let (name, port) = match text.rsplit_once(':') {
            Some((name, port)) => {
                let port = match port.parse::<u16>() {
                    Ok(p) if p > 0 && !port.starts_with('+') => p,
                    _ => {
                        return Err(NameError::Port(text.to_string(), port.to_string()));
                    }
                };
                (name, Some(port))
            }
            None => (text, None),
        };
        let name = Hostname::new(name)?;
        let text = match port {
            Some(p) => format!("{name}:{p}"),
            None => name.to_string(),
        };
        Ok(Host { name, port, text })
    }

    /// `name[:port]` in lower case, as a `Host` header.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// `name[:port]` with the name as written.
    pub fn original(&self) -> String {
        match self.port {
            Some(p) => format!("{}:{p}", self.name.original()),
            None => self.name.original().to_string(),
        }
    }
}

impl From<Hostname> for Host {
    fn from(name: Hostname) -> Host {
        Host {
            text: name.to_string(),
            name,
            port: None,
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for Host {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

/// An absolute URL path safe to place in an Nginx `location` and an HTTP request line:
/// starts with `/`, at most 1024 bytes, only RFC 3986 unreserved and sub-delimiter characters
/// that mean nothing to Nginx's configuration parser (no spaces, quotes, `;`, `{`, `}`, `$`,
/// `#`, `\`, controls).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct UrlPath(String);

impl UrlPath {
    pub fn new(path: &str) -> Result<UrlPath, NameError> {
        if !path.starts_with('/') {
            return Err(NameError::PathStart(path.to_string()));
        }
        if path.len() > 1024 {
            return Err(NameError::PathTooLong);
        }
        if let Some(c) = path.chars().find(|c| {
            !(c.is_ascii_alphanumeric()
                || matches!(
                    c,
                    '/' | '-'
                        | '_'
                        | '.'
                        | '~'
                        | '%'
                        | '!'
                        | '&'
                        | '+'
                        | ','
                        | '='
                        | ':'
                        | '@'
                        | '?'
                ))
        }) {
            return Err(NameError::PathChar(path.to_string(), c));
        }
        Ok(UrlPath(path.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UrlPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An absolute `http://` or `https://` URL that may be written into an Nginx `return`: at
/// most 2048 bytes of printable ASCII, without quotes, `\\`, `$` (an Nginx variable), `;`,
/// `{`, `}`, `#`, white space or control characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct RedirectUrl(String);

impl RedirectUrl {
    pub fn new(url: &str) -> Result<RedirectUrl, NameError> {
        let rest = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("http://"))
            .ok_or_else(|| NameError::UrlScheme(url.to_string()))?;
        if rest.is_empty() || rest.starts_with('/') {
            return Err(NameError::UrlNoHost(url.to_string()));
        }
        if url.len() > 2048 {
            return Err(NameError::UrlTooLong);
        }
        if let Some(c) = url.chars().find(|c| {
            !c.is_ascii_graphic() || matches!(c, '"' | '\'' | '\\' | '$' | ';' | '{' | '}' | '#')
        }) {
            return Err(NameError::UrlChar(url.to_string(), c));
        }
        Ok(RedirectUrl(url.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks that a file path may be written into an Nginx file: absolute, valid UTF-8, and free
/// of anything Nginx's parser would read as syntax or a variable (quotes, `\\`, `;`, `{`, `}`,
/// `$`, `#`, white space, control characters).
pub fn check_conf_path(p: &std::path::Path) -> Result<(), ConfPathError> {
    let error = |why| ConfPathError {
        path: p.to_path_buf(),
        why,
    };
    let Some(s) = p.to_str() else {
        return Err(error(ConfPathWhy::NotUtf8));
    };
    if !p.is_absolute() {
        return Err(error(ConfPathWhy::NotAbsolute));
    }
    if let Some(c) = s.chars().find(|c| {
        c.is_whitespace()
            || c.is_control()
            || matches!(c, '"' | '\'' | '\\' | ';' | '{' | '}' | '$' | '#')
    }) {
        return Err(error(ConfPathWhy::Char(c)));
    }
    Ok(())
}

/// A path that [`check_conf_path`] refuses, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfPathError {
    pub path: std::path::PathBuf,
    pub why: ConfPathWhy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfPathWhy {
    NotUtf8,
    NotAbsolute,
    /// A character Nginx's parser reads as syntax or a variable.
    Char(char),
}

impl fmt::Display for ConfPathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.path;
        match self.why {
            ConfPathWhy::NotUtf8 => write!(f, "the path {p:?} is not valid UTF-8"),
            ConfPathWhy::NotAbsolute => write!(f, "the path {p:?} is not absolute"),
            ConfPathWhy::Char(c) => write!(
                f,
                "the path {p:?} contains {c:?}, which cannot be written into an Nginx file"
            ),
        }
    }
}

impl std::error::Error for ConfPathError {}

/// Checks an environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn check_env_name(name: &str) -> Result<(), NameError> {
    let mut chars = name.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphabetic() || c == '_' => {}
        _ => return Err(NameError::EnvName(name.to_string())),
    }
    if chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Ok(())
    } else {
        Err(NameError::EnvName(name.to_string()))
    }
}

/// Checks an environment value: no NUL byte (it cannot be passed to exec).
pub fn check_env_value(value: &str) -> Result<(), NameError> {
    if value.contains('\0') {
        Err(NameError::EnvNul)
    } else {
        Ok(())
    }
}

/// Why a text is not a valid value of one of this module's types; each variant keeps the
/// text refused (and the character, where one is to blame).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameError {
    AppEmpty,
    /// Its length in bytes.
    AppTooLong(usize),
    AppStart(String),
    AppChar(String, char),
    /// A bundle file whose name does not end in `.keter`.
    NotABundleName,
    HostEmpty,
    HostTooLong(usize),
    /// `_`, Nginx's catch-all name.
    CatchAll,
    /// A label of the host name is not valid.
    Label(String, Label),
    /// `HOST:PORT` whose port (the second text) is not one.
    Port(String, String),
    PathStart(String),
    PathTooLong,
    PathChar(String, char),
    UrlScheme(String),
    UrlNoHost(String),
    UrlTooLong,
    UrlChar(String, char),
    EnvName(String),
    EnvNul,
    /// A header name that is empty or longer than 100 bytes.
    HeaderLength(String),
    HeaderChar(String, char),
    /// Text for an Nginx file longer than 4096 bytes: its length.
    TextTooLong(usize),
    /// Text for an Nginx file with a character Nginx would read as syntax.
    TextChar(String, char),
    /// A cookie name Nginx cannot read.
    Cookie(String),
}

/// What is wrong with a label of a host name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Label {
    Empty,
    TooLong(String),
    Char(char),
    Hyphen(String),
    /// A wildcard host with fewer than two other labels.
    LoneWildcard,
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Label::Empty => f.write_str("it has an empty label"),
            Label::TooLong(l) => write!(f, "the label {l:?} is longer than 63 bytes"),
            Label::Char(c) => write!(
                f,
                "it contains {c:?}; only letters, digits, '-', '_' and '.' are allowed"
            ),
            Label::Hyphen(l) => write!(f, "the label {l:?} starts or ends with '-'"),
            Label::LoneWildcard => f.write_str("a wildcard needs at least two other labels"),
        }
    }
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameError::AppEmpty => f.write_str("the app name is empty"),
            NameError::AppTooLong(len) => write!(
                f,
                "the app name is {len} bytes long (at most {})",
                AppName::MAX_LEN
            ),
            NameError::AppStart(name) => {
                write!(f, "the app name {name:?} starts with '.' or '-'")
            }
            NameError::AppChar(name, c) => write!(
                f,
                "the app name {name:?} contains {c:?}; only letters, digits, '-', '_' and '.' are allowed"
            ),
            NameError::NotABundleName => f.write_str("a bundle file must be named NAME.keter"),
            NameError::HostEmpty => f.write_str("the host name is empty"),
            NameError::HostTooLong(len) => {
                write!(f, "the host name is {len} bytes long (at most 253)")
            }
            NameError::CatchAll => f.write_str(
                "the host name \"_\" is Nginx's catch-all name, not a host; list the names to serve",
            ),
            NameError::Label(host, why) => {
                write!(f, "the host name {host:?} is not valid: {why}")
            }
            NameError::Port(text, port) => write!(
                f,
                "the host {text:?} is not valid: {port:?} is not a port from 1 to 65535"
            ),
            NameError::PathStart(path) => {
                write!(f, "the path {path:?} does not start with '/'")
            }
            NameError::PathTooLong => f.write_str("the path is longer than 1024 bytes"),
            NameError::PathChar(path, c) => write!(f, "the path {path:?} contains {c:?}"),
            NameError::UrlScheme(url) => {
                write!(f, "the URL {url:?} does not start with http:// or https://")
            }
            NameError::UrlNoHost(url) => write!(f, "the URL {url:?} has no host"),
            NameError::UrlTooLong => f.write_str("the URL is longer than 2048 bytes"),
            NameError::UrlChar(url, c) => write!(f, "the URL {url:?} contains {c:?}"),
            NameError::EnvName(name) => {
                write!(f, "{name:?} is not a valid environment variable name")
            }
            NameError::EnvNul => f.write_str("the value contains a NUL byte"),
            NameError::HeaderLength(name) => {
                write!(f, "the header name {name:?} must be 1 to 100 characters")
            }
            NameError::HeaderChar(name, c) => write!(
                f,
                "the header name {name:?} contains {c:?}; only letters, digits, '-' and '_' are allowed"
            ),
            NameError::TextTooLong(len) => write!(f, "{len} bytes long (at most 4096)"),
            NameError::TextChar(text, c) => write!(
                f,
                "{text:?} contains {c:?}, which cannot be written into an Nginx file (quotes, '\\', '$' and control characters are refused)"
            ),
            NameError::Cookie(name) => write!(
                f,
                "the cookie name {name:?} cannot be read by Nginx: it must be 1 to 100 letters, digits and '_'"
            ),
        }
    }
}

impl std::error::Error for NameError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_names() {
        assert!(AppName::new("hello").is_ok());
        assert!(AppName::new("my-app_2.v1").is_ok());
        for bad in [
            "",
            ".hidden",
            "-rf",
            "a b",
            "a;b",
            "a\nb",
            "é",
            "a/b",
            &"x".repeat(101),
        ] {
            assert!(AppName::new(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            AppName::from_bundle_file_name("hello.keter")
                .unwrap()
                .unwrap()
                .as_str(),
            "hello"
        );
        assert!(AppName::from_bundle_file_name("hello.tar").is_none());
    }

    #[test]
    fn host_names() {
        assert_eq!(
            Hostname::new("WWW.Example.com").unwrap().as_str(),
            "www.example.com"
        );
        assert!(Hostname::new("*.example.com").unwrap().is_wildcard());
        assert_eq!(
            Hostname::new("*.Example.com").unwrap().server_name(),
            "~^[^.]+\\.example\\.com$"
        );
        assert_eq!(
            Hostname::new("bar.*.*.example.com").unwrap().server_name(),
            "~^bar\\.[^.]+\\.[^.]+\\.example\\.com$"
        );
        assert_eq!(Hostname::new("a.b").unwrap().server_name(), "a.b");
        assert!(Hostname::new("localhost").is_ok());
        // Keter's own sample hosts use `_`; only Nginx's catch-all `_` itself is refused.
        assert_eq!(Hostname::new("Keter1_0").unwrap().as_str(), "keter1_0");
        assert_eq!(Hostname::new("Keter1_0").unwrap().original(), "Keter1_0");
        assert_eq!(
            Hostname::new("WWW.Example.com").unwrap(),
            Hostname::new("www.example.com").unwrap()
        );
        for bad in [
            "", "a;b", "a{b", "a}b", "a b", "a\nb", "a\"b", "a$b", "a#b", "a\0b", "-a.com",
            "a-.com", "a..com", "*", "*.com", "**.com", "a.com.", "*.*", "a*.com", "_", "a:80",
        ] {
            assert!(Hostname::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Hostname::new(&format!("{}.com", "a.".repeat(126))).is_err());
        assert!(Hostname::new(&"a".repeat(64)).is_err());
    }

    #[test]
    fn hosts_with_ports() {
        let h = Host::new("127.0.0.1:8000").unwrap();
        assert_eq!((h.name.as_str(), h.port), ("127.0.0.1", Some(8000)));
        assert_eq!(h.as_str(), "127.0.0.1:8000");
        let h = Host::new("Foo.Example.com").unwrap();
        assert_eq!((h.as_str(), h.port), ("foo.example.com", None));
        assert_eq!(h.original(), "Foo.Example.com");
        assert_eq!(
            Host::new("*.Example.com:8443").unwrap().original(),
            "*.Example.com:8443"
        );
        for bad in [
            "a.com:",
            "a.com:0",
            "a.com:70000",
            "a.com:+80",
            "a.com:x",
            ":80",
            "[::1]:80",
        ] {
            assert!(Host::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn url_paths() {
        assert!(UrlPath::new("/").is_ok());
        assert!(UrlPath::new("/health/check?x=1").is_ok());
        for bad in [
            "", "health", "/a b", "/a;b", "/a{", "/$x", "/a\"", "/a#", "/a\\b",
        ] {
            assert!(UrlPath::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn redirect_urls() {
        assert!(RedirectUrl::new("https://www.example.com/a?b=c&d").is_ok());
        assert!(RedirectUrl::new("http://example.com").is_ok());
        for bad in [
            "ftp://x",
            "https://",
            "https:///x",
            "//x.com",
            "https://a.com/$host",
            "https://a.com/\"",
            "https://a.com/;x",
            "https://a.com/{",
            "https://a .com",
            "https://a.com/\nx",
            "https://a.com/#frag",
        ] {
            assert!(RedirectUrl::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn env_names() {
        assert!(check_env_name("DATABASE_URL").is_ok());
        assert!(check_env_name("_x1").is_ok());
        assert!(check_env_name("1X").is_err());
        assert!(check_env_name("A-B").is_err());
        assert!(check_env_name("").is_err());
    }
}
