//! One request as Nginx reports it: a line of the request log (`tailer.rs`) in the `log_format`
//! keter writes into every app's file (`templates/app.conf.tera`):
//!
//! ```text
//! k3|APP|RELEASE|$time_iso8601|$status|$bytes_sent|$upstream_response_time|$upstream_header_time
//! ```
//!
//! `$time_iso8601` is when Nginx logged the request, to the second, with the host's offset
//! from UTC (`2026-12-08T01:10:12+00:00`).
//!
//! The upstream fields are `-` when nothing was proxied (static files, redirects, Nginx's own
//! answers); with several attempts or an internal redirect (the operator's proxy-exception
//! page) they list values separated by `, ` and ` : `.
//!
//! Every field costs Nginx's worker CPU on every request, so the format holds only what the
//! counts need and what Nginx has ready as text. Counted with callgrind on a worker (README,
//! "Measured"), a number Nginx formats costs it about 200 instructions of the 22,000 a
//! proxied request takes; `$time_iso8601` is copied from a string Nginx keeps ready each
//! second, while `$msec` is formatted; `$upstream_status` is left out, since
//! `$upstream_response_time` is `-` exactly when nothing was proxied; and the `log_format`
//! says `escape=none`, since no field holds anything a client sent.
//!
//! An older keter wrote `k2` lines, which the log may still hold after an upgrade: they are
//! read too.
//!
//! ```text
//! k2|APP|RELEASE|$msec|$status|$bytes_sent|$upstream_status|$upstream_response_time|$upstream_header_time
//! ```

/// The first field: the version of the format, so that a line of another keter's format is
/// told apart (`k1` was a syslog datagram without the time; `k2` had `$msec` and
/// `$upstream_status`).
pub const VERSION: &str = "k3";

/// A status class. Upstream failures are 502 and 504 answers of Nginx itself, counted apart
/// from the app's own 5xx.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    Informational,
    Success,
    Redirection,
    ClientError,
    ServerError,
    UpstreamFailure,
}

impl Class {
    pub const ALL: [Class; 6] = [
        Class::Informational,
        Class::Success,
        Class::Redirection,
        Class::ClientError,
        Class::ServerError,
        Class::UpstreamFailure,
    ];

    /// The `class` label of `keter_app_requests_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Informational => "1xx",
            Class::Success => "2xx",
            Class::Redirection => "3xx",
            Class::ClientError => "4xx",
            Class::ServerError => "5xx",
            Class::UpstreamFailure => "upstream_failure",
        }
    }

    /// Counted as errors in the plots: 5xx and upstream failures.
    pub fn is_error(self) -> bool {
        matches!(self, Class::ServerError | Class::UpstreamFailure)
    }
}

/// One request.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub app: String,
    pub release: u64,
    /// When Nginx logged it: unix seconds.
    pub time: u64,
    pub status: u16,
    pub bytes: u64,
    /// Nginx tried the app (or another upstream).
    proxied: bool,
    /// The app answered with headers (at its last attempt).
    answered: bool,
    /// Sum of the upstream response times of every attempt; `None` when nothing was proxied.
    upstream: Option<f64>,
}

impl Line {
    /// Parses a line (without its newline); `None` for anything that is not keter's format.
    pub fn parse(line: &[u8]) -> Option<Line> {
        let text = std::str::from_utf8(line).ok()?;
        let mut f = text.trim_end().split('|');
        let older = match f.next()? {
            VERSION => false,
            "k2" => true,
            _ => return None,
        };
        let app = f.next()?;
        if !crate::names::AppName::is_valid(app) {
            return None;
        }
        let release = f.next()?.parse().ok()?;
        let time = if older {
            msec(f.next()?)?
        } else {
            iso8601(f.next()?)?
        };
        let status: u16 = f.next()?.parse().ok()?;
        let bytes = f.next()?.parse().ok()?;
        if older {
            // `$upstream_status`: `-` exactly when `$upstream_response_time` is.
            f.next()?;
        }
        let response_time = f.next()?;
        let header_time = f.next()?;
        if f.next().is_some() {
            return None;
        }
        let (mut any, mut sum) = (false, 0.0);
        for t in times(response_time).flatten() {
            any = true;
            sum += t;
        }
        let upstream = any.then_some(sum);
        // The last attempt of the first pass (before an internal redirect) got headers.
        let first_pass = header_time.split(':').next().unwrap_or("");
        let answered = times(first_pass).last().is_some_and(|t| t.is_some());
        Some(Line {
            app: app.to_string(),
            release,
            time,
            status,
            bytes,
            proxied: response_time.trim() != "-",
            answered,
            upstream,
        })
    }

    pub fn class(&self) -> Class {
        match self.status {
            502 | 504 if self.proxied && !self.answered => Class::UpstreamFailure,
            0..=199 => Class::Informational,
            200..=299 => Class::Success,
            300..=399 => Class::Redirection,
            400..=499 => Class::ClientError,
            _ => Class::ServerError,
        }
    }

    /// The upstream response time of a request the app answered.
    pub fn upstream_seconds(&self) -> Option<f64> {
        self.upstream.filter(|_| self.answered)
    }
}

/// Each attempt's time in an `$upstream_*_time` (`-` for none), separated by `, ` and ` : `.
fn times(v: &str) -> impl Iterator<Item = Option<f64>> + '_ {
    v.split([',', ':'])
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(seconds)
}

/// A time Nginx wrote (`0.012`: seconds, a dot, three digits), or `None` for `-`. The common
/// form is read without a float parser: the request log's thread reads every request.
fn seconds(t: &str) -> Option<f64> {
    if let Some((s, ms)) = t.split_once('.')
        && ms.len() == 3
        && let (Some(s), Some(ms)) = (digits(s), digits(ms))
        && s < 1 << 40
    {
        // One correctly rounded division: the same number as parsing the text.
        return Some((s * 1000 + ms) as f64 / 1000.0);
    }
    t.parse().ok()
}

/// `$msec`: unix seconds, a dot and three digits of milliseconds; the seconds.
fn msec(field: &str) -> Option<u64> {
    let (seconds, millis) = field.split_once('.')?;
    if millis.len() != 3 || !millis.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits(seconds)
}

/// `$time_iso8601`, `YYYY-MM-DDThh:mm:ss+hh:mm` (or `-hh:mm`): unix seconds.
fn iso8601(field: &str) -> Option<u64> {
    let b = field.as_bytes();
    // ASCII only: the slices below then fall on character boundaries whatever the line holds.
    if b.len() != 25
        || !b.is_ascii()
        || [
            (4, b'-'),
            (7, b'-'),
            (10, b'T'),
            (13, b':'),
            (16, b':'),
            (22, b':'),
        ]
        .iter()
        .any(|&(i, c)| b[i] != c)
    {
        return None;
    }
    let num = |from: usize, to: usize| digits(&field[from..to]);
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hour, minute, second) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    let (offset_hours, offset_minutes) = (num(20, 22)?, num(23, 25)?);
    if offset_minutes > 59 {
        return None;
    }
    let offset = (offset_hours * 60 + offset_minutes) * 60;
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || year < 1970
        || hour > 23
        || minute > 59
        || second > 60
        || offset > 24 * 3600
    {
        return None;
    }
    let local = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second;
    match b[19] {
        b'+' => local.checked_sub(offset),
        b'-' => local.checked_add(offset),
        _ => None,
    }
}

/// ASCII digits only (no sign, no spaces), as a number.
fn digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Days from 1970-01-01 to a date of the proleptic Gregorian calendar from 1970 on (Howard
/// Hinnant's `days_from_civil`).
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `unix` as Nginx's `$time_iso8601` writes it on a host whose time zone is UTC.
#[cfg(test)]
pub(crate) fn iso8601_utc(unix: u64) -> String {
    // Howard Hinnant's `civil_from_days`.
    let z = unix / 86_400 + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let s = unix % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}+00:00",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(msg: &str) -> Option<Line> {
        Line::parse(msg.as_bytes())
    }

    /// 2025-12-07T11:43:21 UTC.
    const T: &str = "2025-12-07T11:43:21+00:00";
    const UNIX: u64 = 1765107801;

    #[test]
    fn proxied_static_and_failed_requests() {
        let l = line(&format!("k3|shop|3|{T}|200|612|0.012|0.011")).unwrap();
        assert_eq!(
            (l.app.as_str(), l.release, l.time, l.status, l.bytes),
            ("shop", 3, UNIX, 200, 612)
        );
        assert_eq!(l.class(), Class::Success);
        assert_eq!(l.upstream_seconds(), Some(0.012));

        let l = line(&format!("k3|shop|3|{T}|404|150|-|-")).unwrap();
        assert_eq!(l.class(), Class::ClientError);
        assert_eq!(l.upstream_seconds(), None);

        // Connection refused: Nginx's own 502; with the operator's page behind an internal
        // redirect.
        let l = line(&format!("k3|shop|3|{T}|502|300|0.000|-")).unwrap();
        assert_eq!(l.class(), Class::UpstreamFailure);
        assert_eq!(l.upstream_seconds(), None);
        let l = line(&format!("k3|shop|3|{T}|502|300|0.000 : -|- : -")).unwrap();
        assert_eq!(l.class(), Class::UpstreamFailure);
        let l = line(&format!("k3|shop|3|{T}|504|300|60.001|-")).unwrap();
        assert_eq!(l.class(), Class::UpstreamFailure);

        // The app's own 502 is the app's 5xx.
        let l = line(&format!("k3|shop|3|{T}|502|120|0.004|0.004")).unwrap();
        assert_eq!(l.class(), Class::ServerError);
        assert_eq!(l.upstream_seconds(), Some(0.004));
        // Nginx's own 502 outside the proxy (nothing proxied) is a 5xx too.
        let l = line(&format!("k3|shop|3|{T}|502|120|-|-")).unwrap();
        assert_eq!(l.class(), Class::ServerError);

        // Two attempts: the times add up.
        let l = line(&format!("k3|shop|3|{T}|200|10|0.001, 0.002|-, 0.002")).unwrap();
        assert_eq!(l.class(), Class::Success);
        assert!((l.upstream_seconds().unwrap() - 0.003).abs() < 1e-9);
    }

    /// What an older keter's Nginx wrote, still in the log when this keter starts.
    #[test]
    fn lines_of_the_format_before_are_read_alike() {
        for (old, new) in [
            (
                "k2|shop|3|1765107801.250|200|612|200|0.012|0.011",
                "200|612|0.012|0.011",
            ),
            ("k2|shop|3|1765107801.999|404|150|-|-|-", "404|150|-|-"),
            (
                "k2|shop|3|1765107801.000|502|300|502|0.000|-",
                "502|300|0.000|-",
            ),
            (
                "k2|shop|3|1765107801.250|502|300|502 : -|0.000 : -|- : -",
                "502|300|0.000 : -|- : -",
            ),
            (
                "k2|shop|3|1765107801.250|502|120|502|0.004|0.004",
                "502|120|0.004|0.004",
            ),
        ] {
            let new = format!("k3|shop|3|{T}|{new}");
            assert_eq!(line(old), line(&new), "{old}");
            assert!(line(old).is_some(), "{old}");
        }
    }

    #[test]
    fn times_round_trip() {
        for unix in [
            0,
            UNIX,
            951_825_599,
            951_825_600,
            4_107_542_399,
            1_709_251_199,
        ] {
            let l = line(&format!("k3|shop|3|{}|200|1|-|-", iso8601_utc(unix))).unwrap();
            assert_eq!(l.time, unix);
        }
        assert_eq!(iso8601_utc(UNIX), T);
    }

    #[test]
    fn times_with_an_offset_are_utc() {
        for (time, unix) in [
            ("1970-01-01T00:00:00+00:00", 0),
            ("2025-12-07T12:43:21+01:00", UNIX),
            ("2025-12-07T06:13:21-05:30", UNIX),
            ("2024-02-29T23:59:59+00:00", 1709251199),
            ("2024-03-01T00:00:00+00:00", 1709251200),
            ("2100-03-01T00:00:00+00:00", 4107542400),
            ("2000-02-29T12:00:00+00:00", 951825600),
        ] {
            let l = line(&format!("k3|shop|3|{time}|200|1|-|-")).unwrap();
            assert_eq!(l.time, unix, "{time}");
        }
    }

    #[test]
    fn other_formats_are_refused() {
        for msg in [
            format!("k4|shop|3|{T}|200|612|0.012|0.011"),
            format!("k3|shop|3|{T}|200|612|0.012"),
            format!("k3|shop|3|{T}|200|612|0.012|0.011|x"),
            format!("k3|../x|3|{T}|200|612|0.012|0.011"),
            format!("k3|shop|x|{T}|200|612|0.012|0.011"),
            // A k2 line with the k3 version, and the other way round.
            "k3|shop|3|1765107801.250|200|612|200|0.012|0.011".into(),
            format!("k2|shop|3|{T}|200|612|0.012|0.011"),
            "k2|shop|3|1765107801.250|200|612|200|0.012".into(),
            String::new(),
        ] {
            assert_eq!(line(&msg), None, "{msg}");
        }
        assert_eq!(Line::parse(&[0xff, 0xfe]), None);
        // The old datagram, and times that are not `$msec` or `$time_iso8601`.
        assert_eq!(
            Line::parse(b"<190>Dec  7 11:43:21 keter: k1|shop|3|200|612|200|0.012|0.011"),
            None
        );
        for time in ["1765107801", "x.123", "1765107801.1", "-1.000"] {
            let l = format!("k2|shop|3|{time}|200|612|200|0.012|0.011");
            assert_eq!(Line::parse(l.as_bytes()), None, "{l}");
        }
        for time in [
            "1765107801.250",
            "2025-12-07T11:43:21",
            "2025-12-07T11:43:21Z",
            "2025-12-07 11:43:21+00:00",
            "2025-13-07T11:43:21+00:00",
            "2025-12-00T11:43:21+00:00",
            "2025-12-07T24:43:21+00:00",
            "1969-12-31T23:59:59+00:00",
            "1970-01-01T00:00:00+01:00",
            "2025-12-07T11:43:21*00:00",
            "+025-12-07T11:43:21+00:00",
            "2025-12-07T11:4a:21+00:00",
            "2025-12-07T11:43:21+00:60",
            // 25 bytes with a character of two: refused, not cut inside it.
            "2025-12-07T11:43:é+00:00",
            "2025-12-07T11:43:2é00:00",
        ] {
            let l = format!("k3|shop|3|{time}|200|612|0.012|0.011");
            assert_eq!(Line::parse(l.as_bytes()), None, "{l}");
        }
    }
}
