//! Keter's per-stanza `middleware` list (webapp, static-files and reverse-proxy stanzas), read
//! into what Nginx does natively: added response headers, basic authentication, local-only
//! access, rate limits (Keter 2.3's rate limiter) and automatic HEAD. The WAI middlewares
//! Nginx cannot do in front of an app (`jsonp`, `accept-override`, `method-override`,
//! `method-override-post`) are refused with an error naming the entry: dropping one silently
//! would change what the app answers.
//!
//! Every value that reaches an Nginx file is checked here first (header names and values, the
//! realm, the local-only message, rates); the README's "Middleware" section lists the mapping.

use serde_json::Value;

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

/// One throttle of Keter's rate limiter: at most `limit` requests per `period` seconds for
/// each client (as `identifier` and `zone` tell clients apart). Nginx's `limit_req` is a leaky
/// bucket: it admits `limit` requests at once and then refills at `limit / period`, whichever
/// of Keter's algorithms was named.
#[derive(Debug, Clone, PartialEq)]
pub struct Throttle {
    /// Keter's `name`, for messages.
    pub name: String,
    /// At least 1.
    pub limit: u32,
    /// Seconds, at least 1.
    pub period: u32,
    pub rate: Rate,
    pub identifier: Identifier,
    pub zone: Zone,
}

impl Throttle {
    /// Requests admitted beyond the first without waiting: the whole `limit` at once.
    pub fn burst(&self) -> u32 {
        self.limit - 1
    }
}

/// A rate as Nginx writes it: a whole number of requests per second or per minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rate {
    PerSecond(u64),
    PerMinute(u64),
}

impl Rate {
    /// Nginx's rate for `limit` requests per `period` seconds; `exact` is false when it had to
    /// be rounded to a whole number per minute. `None` below one request per minute, which
    /// Nginx cannot express.
    pub fn of(limit: u32, period: u32) -> Option<(Rate, bool)> {
        let (limit, period) = (u64::from(limit), u64::from(period));
        if limit % period == 0 {
            return Some((Rate::PerSecond(limit / period), true));
        }
        let per_minute = limit * 60;
        if per_minute % period == 0 {
            return Some((Rate::PerMinute(per_minute / period), true));
        }
        let rounded = (per_minute + period / 2) / period;
        (rounded > 0).then_some((Rate::PerMinute(rounded), false))
    }

    /// `10r/s`, `3r/m`.
    pub fn nginx(&self) -> String {
        match self {
            Rate::PerSecond(n) => format!("{n}r/s"),
            Rate::PerMinute(n) => format!("{n}r/m"),
        }
    }
}

/// Keter's `identifier_by`: what tells one client from another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identifier {
    /// `ip`: the client address (with `ip-from-header`, the one `X-Forwarded-For` gives).
    Ip,
    /// `ip+path`.
    IpAndPath,
    /// `ip+ua`; requests without a User-Agent are not counted, as in Keter.
    IpAndUserAgent,
    /// `{header: NAME}`; requests without the header are not counted.
    Header(HeaderName),
    /// `{cookie: NAME}`; requests without the cookie are not counted.
    Cookie(CookieName),
    /// `{header+ip: NAME}`; requests without the header are not counted.
    HeaderAndIp(HeaderName),
}

/// Keter's `zone_by`: separate counters per zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Zone {
    Default,
    Ip,
    Header(HeaderName),
}

/// An HTTP header name safe to write into an Nginx file: 1 to 100 letters, digits, `-`, `_`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct HeaderName(String);

impl HeaderName {
    pub fn new(name: &str) -> Result<HeaderName, String> {
        if name.is_empty() || name.len() > 100 {
            return Err(format!(
                "the header name {name:?} must be 1 to 100 characters"
            ));
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(format!(
                "the header name {name:?} contains {c:?}; only letters, digits, '-' and '_' are allowed"
            ));
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

/// A cookie name that can follow Nginx's `$cookie_`: 1 to 100 letters, digits and `_`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CookieName(String);

impl CookieName {
    pub fn new(name: &str) -> Result<CookieName, String> {
        if name.is_empty()
            || name.len() > 100
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(format!(
                "the cookie name {name:?} cannot be read by Nginx: it must be 1 to 100 letters, digits and '_'"
            ));
        }
        Ok(CookieName(name.to_string()))
    }

    /// Nginx's variable for this cookie: `$cookie_session`.
    pub fn request_variable(&self) -> String {
        format!("$cookie_{}", self.0)
    }
}

/// Text written between double quotes in an Nginx file (a header value, a realm, a message):
/// at most 4096 bytes, no control characters, and none of `"`, `\` (quoting) or `$` (Nginx
/// would read a variable).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct NginxString(String);

impl NginxString {
    pub fn new(text: &str) -> Result<NginxString, String> {
        if text.len() > 4096 {
            return Err(format!("{} bytes long (at most 4096)", text.len()));
        }
        if let Some(c) = text
            .chars()
            .find(|c| c.is_control() || matches!(c, '"' | '\\' | '$'))
        {
            return Err(format!(
                "{text:?} contains {c:?}, which cannot be written into an Nginx file (quotes, '\\', '$' and control characters are refused)"
            ));
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
                "rate-limiter" => read_rate_limiter(body, &path, out, problems),
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

fn read_rate_limiter(v: &Value, path: &str, out: &mut Middlewares, problems: &mut Problems) {
    let Some(mut f) = Fields::new(v, path, problems) else {
        return;
    };
    let zone = match f.raw("zone_by") {
        None => Some(Zone::Default),
        Some(Value::String(s)) if s == "default" => Some(Zone::Default),
        Some(Value::String(s)) if s == "ip" => Some(Zone::Ip),
        Some(Value::Object(m)) if m.len() == 1 && m.contains_key("header") => {
            header_in(&m["header"], &format!("{path}.zone_by.header"), problems).map(Zone::Header)
        }
        Some(_) => {
            problems.error(f.path("zone_by"), "expected default, ip or {header: NAME}");
            None
        }
    };
    let throttles_key = f.path("throttles");
    let throttles = match f.raw("throttles") {
        Some(Value::Array(items)) => items.as_slice(),
        other => {
            problems.error(
                &throttles_key,
                format!(
                    "required: a list of throttles such as [{{name: ip, limit: 100, period: 60, algorithm: FixedWindow, identifier_by: ip}}], found {}",
                    other.map_or("nothing", yaml::type_name)
                ),
            );
            &[]
        }
    };
    f.finish(problems);
    let Some(zone) = zone else { return };
    for (i, t) in throttles.iter().enumerate() {
        if let Some(t) = read_throttle(t, &format!("{throttles_key}[{i}]"), &zone, problems) {
            out.throttles.push(t);
        }
    }
}

fn read_throttle(v: &Value, path: &str, zone: &Zone, problems: &mut Problems) -> Option<Throttle> {
    let mut f = Fields::new(v, path, problems)?;
    let before = problems.errors.len();
    let name = f.string("name", problems);
    let limit = f.uint("limit", 1_000_000, problems);
    let period = f.uint("period", 366 * 86_400, problems);
    for (key, value) in [
        ("name", name.is_some()),
        ("limit", limit.is_some()),
        ("period", period.is_some()),
    ] {
        if !value && !problems.errors.iter().any(|e| e.key == f.path(key)) {
            problems.error(f.path(key), "required");
        }
    }
    match f.string("algorithm", problems) {
        Some(a) => {
            let known = [
                "fixedwindow",
                "slidingwindow",
                "tokenbucket",
                "leakybucket",
                "tinylru",
            ];
            if !known.contains(&a.to_ascii_lowercase().replace('-', "").as_str()) {
                problems.error(
                    f.path("algorithm"),
                    format!("unknown algorithm {a:?}; expected FixedWindow, SlidingWindow, TokenBucket, LeakyBucket or TinyLRU"),
                );
            }
        }
        None => problems.error(f.path("algorithm"), "required"),
    }
    let identifier = match f.raw("identifier_by") {
        Some(Value::String(s)) if s == "ip" => Some(Identifier::Ip),
        Some(Value::String(s)) if s == "ip+path" => Some(Identifier::IpAndPath),
        Some(Value::String(s)) if s == "ip+ua" => Some(Identifier::IpAndUserAgent),
        Some(Value::Object(m)) if m.len() == 1 => {
            let (k, v) = m.iter().next().expect("one entry");
            let at = format!("{}.{k}", f.path("identifier_by"));
            match k.as_str() {
                "header" => header_in(v, &at, problems).map(Identifier::Header),
                "header+ip" => header_in(v, &at, problems).map(Identifier::HeaderAndIp),
                "cookie" => yaml::as_string(v, &at, problems).and_then(|c| {
                    CookieName::new(&c)
                        .map(Identifier::Cookie)
                        .map_err(|e| problems.error(&at, e))
                        .ok()
                }),
                _ => None,
            }
        }
        _ => None,
    };
    if identifier.is_none() && problems.errors.len() == before {
        problems.error(
            f.path("identifier_by"),
            "expected ip, ip+path, ip+ua, {header: NAME}, {cookie: NAME} or {header+ip: NAME}",
        );
    }
    // Keter's token bucket keeps idle counters this long; Nginx's zone forgets the least
    // recently used ones when it fills, so the key has nothing to set.
    let _ = f.uint("token_bucket_ttl", u64::MAX, problems);
    f.finish(problems);
    let (limit, period) = (limit? as u32, period? as u32);
    if limit == 0 || period == 0 {
        problems.error(path, "limit and period must be at least 1");
        return None;
    }
    let Some((rate, exact)) = Rate::of(limit, period) else {
        problems.error(
            path,
            format!(
                "{limit} requests per {period} s is less than one per minute, the slowest rate Nginx's limit_req can keep"
            ),
        );
        return None;
    };
    if !exact {
        problems.warn(
            path,
            format!(
                "{limit} requests per {period} s is kept by Nginx as {} (it counts whole requests per minute), with the same {limit} at once",
                rate.nginx()
            ),
        );
    }
    if problems.errors.len() > before {
        return None;
    }
    Some(Throttle {
        name: name?,
        limit,
        period,
        rate,
        identifier: identifier?,
        zone: zone.clone(),
    })
}

fn header_in(v: &Value, path: &str, problems: &mut Problems) -> Option<HeaderName> {
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
    fn keters_rate_limiter_example() {
        let (m, p) = read_list(
            "middleware:\n  - rate-limiter:\n      zone_by: \"default\"\n      throttles:\n        - name: \"ip\"\n          limit: 4\n          period: 5\n          algorithm: \"FixedWindow\"\n          identifier_by: \"ip\"\n",
        );
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        let t = &m.unwrap().throttles[0];
        assert_eq!((t.limit, t.period, t.burst()), (4, 5, 3));
        assert_eq!(t.rate, Rate::PerMinute(48));
        assert_eq!((&t.identifier, &t.zone), (&Identifier::Ip, &Zone::Default));
    }

    #[test]
    fn rates_as_nginx_counts_them() {
        assert_eq!(Rate::of(10, 1), Some((Rate::PerSecond(10), true)));
        assert_eq!(Rate::of(100, 60), Some((Rate::PerMinute(100), true)));
        assert_eq!(Rate::of(300, 60), Some((Rate::PerSecond(5), true)));
        assert_eq!(Rate::of(1000, 3600), Some((Rate::PerMinute(17), false)));
        assert_eq!(Rate::of(1, 3600), None);
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
