//! Keter 2.3's rate limiter (the `rate-limiter` middleware, from the
//! keter-rate-limiting-plugin), read into throttles that Nginx's `limit_req` keeps: Keter's
//! `limit` requests per `period` seconds, per client as `identifier_by` and `zone_by` tell
//! clients apart. `nginx::middleware` renders them.

use serde_json::Value;

use super::middleware::{HeaderName, header_in};
use crate::names::NameError;
use crate::problem::Problems;
use crate::yaml::{self, Fields};

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

/// A cookie name that can follow Nginx's `$cookie_`: 1 to 100 letters, digits and `_`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CookieName(String);

impl CookieName {
    pub fn new(name: &str) -> Result<CookieName, NameError> {
        if name.is_empty()
            || name.len() > 100
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(NameError::Cookie(name.to_string()));
        }
        Ok(CookieName(name.to_string()))
    }

    /// Nginx's variable for this cookie: `$cookie_session`.
    pub fn request_variable(&self) -> String {
        format!("$cookie_{}", self.0)
    }
}

/// One `rate-limiter` entry: its throttles are added to `out`.
pub(super) fn read(v: &Value, path: &str, out: &mut Vec<Throttle>, problems: &mut Problems) {
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
            out.push(t);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::middleware::{self, Middlewares};

    fn read_list(text: &str) -> (Option<Middlewares>, Problems) {
        let tree = yaml::parse(text).unwrap();
        let mut p = Problems::new("keter.yaml");
        let mut f = Fields::new(&tree, "stanzas[0]", &mut p).unwrap();
        let m = middleware::read(&mut f, &mut p);
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
}
