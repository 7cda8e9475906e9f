//! Keter's per-stanza `middleware` list (webapp, static-files and reverse-proxy stanzas), read
//! into what Nginx does natively: added response headers, basic authentication, local-only
//! access, rate limits (Keter 2.3's rate limiter) and automatic HEAD. The WAI middlewares
//! Nginx cannot do in front of an app (`jsonp`, `accept-override`, `method-override`,
//! `method-override-post`) are refused with an error naming the entry: dropping one silently
//! would change what the app answers.
//!
//! Every value that reaches an Nginx file is checked here first (header names and values, the
//! realm, the local-only message; the rate limiter's in `rate_limit`); the README's
//! "Middleware" table lists the mapping.

use serde_json::Value;

pub use super::rate_limit::{CookieName, Identifier, Rate, Throttle, Zone};
use crate::names::NameError;
use crate::problem::Problems;
use crate::yaml::{self, Fields};

/// The middlewares of one stanza, as Nginx applies them. Nginx runs them in its own fixed
/// order (local-only and rate limits, then authentication, then the content with its headers)
/// whatever order the list gave.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Middlewares {
    /// `headers`: added to every response (`add_header ... always`).
    pub headers: Vec<(HeaderName, NginxString)>,
    /// `basic-auth`.
    pub basic_auth: Option<BasicAuth>,
    /// `local`: requests from anywhere but 127.0.0.1 and ::1 get this answer.
    pub local: Option<LocalOnly>,
    /// Every throttle of every `rate-limiter` entry; a request over any of them is refused.
    pub throttles: Vec<Throttle>,
    /// `autohead`: HEAD requests reach the app as GET, and Nginx sends only the headers.
    pub autohead: bool,
}

impl Middlewares {
    pub fn is_empty(&self) -> bool {
        *self == Middlewares::default()
    }
}

/// `basic-auth: {realm, creds: {user: password}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct BasicAuth {
    pub realm: NginxString,
    /// User names are non-empty, without `:` or control characters and not starting with
    /// `#` (the password file's separator and comment); passwords are any text.
    pub users: Vec<(String, String)>,
}

/// `local: {status, message}`, Keter's defaults 401 and "Unauthorized Accessing from
/// Localhost ONLY".
#[derive(Debug, Clone, PartialEq)]
pub struct LocalOnly {
    /// 200 to 599.
    pub status: u16,
    pub message: NginxString,
}

/// An HTTP header name safe to write into an Nginx file: 1 to 100 letters, digits, `-`, `_`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct HeaderName(String);

impl HeaderName {
    pub fn new(name: &str) -> Result<HeaderName, NameError> {
        if name.is_empty() || name.len() > 100 {
            return Err(NameError::HeaderLength(name.to_string()));
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(NameError::HeaderChar(name.to_string(), c));
        }
        Ok(HeaderName(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Nginx's variable for this request header: `$http_x_api_key`.
    pub fn request_variable(&self) -> String {
        format!("$http_{}", self.0.to_ascii_lowercase().replace('-', "_"))
    }
}

/// Text written between double quotes in an Nginx file (a header value, a realm, a message):
/// at most 4096 bytes, no control characters, and none of `"`, `\` (quoting) or `$` (Nginx
/// would read a variable).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct NginxString(String);

impl NginxString {
    pub fn new(text: &str) -> Result<NginxString, NameError> {
        if text.len() > 4096 {
            return Err(NameError::TextTooLong(text.len()));
        }
        if let Some(c) = text
            .chars()
            .find(|c| c.is_control() || matches!(c, '"' | '\\' | '$'))
        {
            return Err(NameError::TextChar(text.to_string(), c));
        }
        Ok(NginxString(text.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What each of Keter's WAI middlewares that Nginx cannot do in front of an app did, for the
/// error that refuses it.
const REFUSED: [(&str, &str); 4] = [
    (
        "jsonp",
        "Keter's jsonp middleware wraps JSON responses in the `callback` function; Nginx cannot rewrite response bodies. Answer JSONP in the app",
    ),
    (
        "accept-override",
        "Keter's accept-override middleware replaces the Accept header with the `_accept` query parameter (decoded); Nginx cannot decode it. Read `_accept` in the app",
    ),
    (
        "method-override",
        "Keter's method-override middleware takes the method of a POST from the `_method` query parameter; do it in the app (Yesod and most frameworks have it)",
    ),
    (
        "method-override-post",
        "Keter's method-override-post middleware takes the method of a POST from the `_method` field of its form body, which Nginx does not read; do it in the app",
    ),
];

/// Reads a stanza's `middleware` list; `None` (with problems recorded) when any entry is
/// refused or invalid.
pub fn read(f: &mut Fields, problems: &mut Problems) -> Option<Middlewares> {
    let key = f.path("middleware");
    let mut out = Middlewares::default();
    let Some(v) = f.raw("middleware") else {
        return Some(out);
    };
    let Value::Array(items) = v else {
        problems.error(
            key,
            format!(
                "expected a list of middlewares, found {}",
                yaml::type_name(v)
            ),
        );
        return None;
    };
    let before = problems.errors.len();
    for (i, item) in items.iter().enumerate() {
        read_entry(item, &format!("{key}[{i}]"), &mut out, problems);
    }
    (problems.errors.len() == before).then_some(out)
}

fn read_entry(v: &Value, path: &str, out: &mut Middlewares, problems: &mut Problems) {
    match v {
        Value::String(name) if name == "autohead" => out.autohead = true,
        Value::String(name) => match REFUSED.iter().find(|(n, _)| n == name) {
            Some((_, why)) => problems.error(
                path,
                format!("{why}; keter refuses the stanza rather than drop the middleware"),
            ),
            None => problems.error(path, format!("unknown middleware {name:?}")),
        },
        Value::Object(map) if map.len() == 1 => {
            let (name, body) = map.iter().next().expect("one entry");
            let path = format!("{path}.{name}");
            match name.as_str() {
                "headers" => read_headers(body, &path, out, problems),
                "basic-auth" if out.basic_auth.is_some() => problems.error(
                    path,
                    "a second basic-auth: Nginx checks one password file per location; merge the creds into one",
                ),
                "basic-auth" => out.basic_auth = read_basic_auth(body, &path, problems),
                "local" if out.local.is_some() => {
                    problems.error(path, "local is listed twice; keep one")
                }
                "local" => out.local = read_local(body, &path, problems),
                "rate-limiter" => super::rate_limit::read(body, &path, &mut out.throttles, problems),
                other => problems.error(path, format!("unknown middleware {other:?}")),
            }
        }
        _ => problems.error(
            path,
            "expected a middleware name (autohead, ...) or a mapping with one key (headers, basic-auth, local, rate-limiter)",
        ),
    }
}

fn read_headers(v: &Value, path: &str, out: &mut Middlewares, problems: &mut Problems) {
    let Value::Object(map) = v else {
        problems.error(
            path,
            format!(
                "expected a mapping of header names to values, found {}",
                yaml::type_name(v)
            ),
        );
        return;
    };
    for (name, value) in map {
        let key = format!("{path}.{name}");
        let Some(value) = yaml::as_string(value, &key, problems) else {
            continue;
        };
        match (HeaderName::new(name), NginxString::new(&value)) {
            (Ok(n), Ok(v)) => out.headers.push((n, v)),
            (Err(e), _) => problems.error(&key, e),
            (_, Err(e)) => problems.error(&key, format!("the value {e}")),
        }
    }
}

fn read_basic_auth(v: &Value, path: &str, problems: &mut Problems) -> Option<BasicAuth> {
    let mut f = Fields::new(v, path, problems)?;
    let realm = f
        .string("realm", problems)
        .unwrap_or_else(|| "keter".into());
    let realm = NginxString::new(&realm)
        .map_err(|e| problems.error(f.path("realm"), format!("the realm {e}")))
        .ok();
    let mut users = Vec::new();
    let creds_key = f.path("creds");
    match f.raw("creds") {
        None => {}
        Some(Value::Object(map)) => {
            for (user, password) in map {
                let key = format!("{creds_key}.{user}");
                let Some(password) = yaml::as_string(password, &key, problems) else {
                    continue;
                };
                if user.is_empty()
                    || user.starts_with('#')
                    || user.chars().any(|c| c == ':' || c.is_control())
                {
                    problems.error(
                        key,
                        "a user name must be non-empty, without ':' or control characters, and not start with '#'",
                    );
                } else if password.contains(['\n', '\r', '\0']) {
                    problems.error(key, "the password contains a line break or a NUL byte");
                } else {
                    users.push((user.clone(), password));
                }
            }
        }
        Some(other) => problems.error(
            creds_key,
            format!(
                "expected a mapping of user names to passwords, found {}",
                yaml::type_name(other)
            ),
        ),
    }
    f.finish(problems);
    if users.is_empty() {
        problems.warn(path, "no creds: every request is answered 401, as in Keter");
    }
    Some(BasicAuth {
        realm: realm?,
        users,
    })
}

fn read_local(v: &Value, path: &str, problems: &mut Problems) -> Option<LocalOnly> {
    let mut f = Fields::new(v, path, problems)?;
    let status = match f.uint("status", 999, problems) {
        None => 401,
        Some(s @ 200..=599) => s as u16,
        Some(other) => {
            problems.error(
                f.path("status"),
                format!("{other} is not a status Nginx can answer with; expected 200 to 599"),
            );
            401
        }
    };
    let message = f
        .string("message", problems)
        .unwrap_or_else(|| "Unauthorized Accessing from Localhost ONLY".into());
    let message = NginxString::new(&message)
        .map_err(|e| problems.error(f.path("message"), format!("the message {e}")))
        .ok();
    f.finish(problems);
    Some(LocalOnly {
        status,
        message: message?,
    })
}

pub(super) fn header_in(v: &Value, path: &str, problems: &mut Problems) -> Option<HeaderName> {
    let name = yaml::as_string(v, path, problems)?;
    HeaderName::new(&name)
        .map_err(|e| problems.error(path, e))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_list(text: &str) -> (Option<Middlewares>, Problems) {
        let tree = yaml::parse(text).unwrap();
        let mut p = Problems::new("keter.yaml");
        let mut f = Fields::new(&tree, "stanzas[0]", &mut p).unwrap();
        let m = read(&mut f, &mut p);
        (m, p)
    }

    #[test]
    fn every_native_middleware_and_each_refusal_names_its_entry() {
        let (m, p) = read_list(
            "middleware:\n  - autohead\n  - headers: {Access-Control-Allow-Origin: \"*\", X-Frame-Options: DENY}\n  - basic-auth: {realm: \"Keter Basic Auth\", creds: {jon: rocks, bla: 1234}}\n  - local: {status: 405, message: \"local only\"}\n  - rate-limiter:\n      zone_by: {header: X-Tenant-ID}\n      throttles:\n        - {name: api, limit: 1000, period: 3600, algorithm: sliding-window, identifier_by: {header: X-Api-Key}, token_bucket_ttl: 60}\n",
        );
        let m = m.unwrap();
        assert!(m.autohead);
        assert_eq!(m.headers.len(), 2);
        assert_eq!(m.headers[0].0.as_str(), "Access-Control-Allow-Origin");
        let auth = m.basic_auth.unwrap();
        assert_eq!(auth.realm.as_str(), "Keter Basic Auth");
        assert!(auth.users.contains(&("bla".into(), "1234".into())));
        assert_eq!(m.local.unwrap().status, 405);
        let t = &m.throttles[0];
        assert_eq!(
            t.zone,
            Zone::Header(HeaderName::new("X-Tenant-ID").unwrap())
        );
        assert_eq!(t.rate, Rate::PerMinute(17));
        assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
        assert!(p.errors.is_empty(), "{:?}", p.errors);

        let (m, p) = read_list(
            "middleware:\n  - jsonp\n  - accept-override\n  - method-override\n  - method-override-post\n  - gzip\n  - headers: {\"X-A\": \"$host\"}\n  - local: {status: 99}\n  - rate-limiter: {throttles: [{name: slow, limit: 1, period: 3600, algorithm: FixedWindow, identifier_by: ip}]}\n",
        );
        assert!(m.is_none());
        let keys: Vec<&str> = p.errors.iter().map(|e| e.key.as_str()).collect();
        for k in [
            "stanzas[0].middleware[0]",
            "stanzas[0].middleware[1]",
            "stanzas[0].middleware[2]",
            "stanzas[0].middleware[3]",
            "stanzas[0].middleware[4]",
            "stanzas[0].middleware[5].headers.X-A",
            "stanzas[0].middleware[6].local.status",
            "stanzas[0].middleware[7].rate-limiter.throttles[0]",
        ] {
            assert!(keys.contains(&k), "{k} missing in {keys:?}");
        }
        assert!(p.errors[0].message.contains("jsonp"), "{:?}", p.errors[0]);
    }

    #[test]
    fn header_and_cookie_names() {
        assert_eq!(
            HeaderName::new("X-Api-Key").unwrap().request_variable(),
            "$http_x_api_key"
        );
        for bad in ["", "a b", "a;b", "a$b", "a:b", "a\"b", "a#b"] {
            assert!(HeaderName::new(bad).is_err(), "{bad:?}");
        }
        assert!(CookieName::new("session_id").is_ok());
        assert!(CookieName::new("my-session").is_err());
        assert!(NginxString::new("a; b { } # c").is_ok());
        for bad in ["a\"b", "a\\b", "$x", "a\nb"] {
            assert!(NginxString::new(bad).is_err(), "{bad:?}");
        }
    }
}
