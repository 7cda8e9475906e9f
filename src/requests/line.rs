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
//! The request log's thread reads every line Nginx writes, on the cores Nginx serves on, so a
//! line is read in one pass over its bytes, in place ([`Line::parse_after`]): no allocation, no
//! float parser for the usual forms, and the time field parsed once per second of lines
//! ([`LastTime`]). `cargo bench --bench figures counting` gives the cost per line.
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

/// One request; `app` borrows from the line it was read from.
#[derive(Debug, Clone, PartialEq)]
pub struct Line<'a> {
    pub app: &'a str,
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

/// The last `$time_iso8601` read and its unix time: the lines of one second share the field,
/// so a run of lines reads it once (`Requests::count_lines`).
#[derive(Debug, Default)]
pub struct LastTime {
    field: [u8; ISO8601_LEN],
    unix: Option<u64>,
}

const ISO8601_LEN: usize = 25;

impl LastTime {
    fn read(&mut self, field: &[u8]) -> Option<u64> {
        if let Some(unix) = self.unix
            && field == self.field
        {
            return Some(unix);
        }
        let unix = iso8601(field)?;
        self.field.copy_from_slice(field);
        self.unix = Some(unix);
        Some(unix)
    }
}

/// The fields of a line not read yet, separated by `|`. Each is read in one pass over its
/// bytes, numbers as they are scanned.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    /// The field up to the next `|`; `None` if it is the last.
    fn next(&mut self) -> Option<&'a [u8]> {
        let end = self.0.iter().position(|b| *b == b'|')?;
        let field = &self.0[..end];
        self.0 = &self.0[end + 1..];
        Some(field)
    }

    /// A field of `len` bytes, not the last.
    fn fixed(&mut self, len: usize) -> Option<&'a [u8]> {
        if self.0.get(len) != Some(&b'|') {
            return None;
        }
        let field = &self.0[..len];
        self.0 = &self.0[len + 1..];
        Some(field)
    }

    /// A field of ASCII digits, not the last, as a number; `None` beyond `u64`.
    fn number(&mut self) -> Option<u64> {
        let mut n = 0u64;
        for (i, b) in self.0.iter().enumerate() {
            let d = b.wrapping_sub(b'0');
            if d > 9 {
                if *b != b'|' || i == 0 {
                    return None;
                }
                self.0 = &self.0[i + 1..];
                return Some(n);
            }
            n = n.checked_mul(10)?.checked_add(u64::from(d))?;
        }
        None
    }

    /// The last field: the rest, without a `|`.
    fn last(self) -> Option<&'a [u8]> {
        (!self.0.contains(&b'|')).then_some(self.0)
    }
}

impl<'a> Line<'a> {
    /// Parses a line (without its newline); `None` for anything that is not keter's format.
    pub fn parse(line: &'a [u8]) -> Option<Line<'a>> {
        Line::parse_after(line, &mut LastTime::default())
    }

    /// [`Line::parse`], taking the time from `last` when the line has the same time field.
    pub fn parse_after(line: &'a [u8], last: &mut LastTime) -> Option<Line<'a>> {
        let mut f = Fields(line.trim_ascii_end());
        let older = match f.next()? {
            v if v == VERSION.as_bytes() => false,
            b"k2" => true,
            _ => return None,
        };
        let app = std::str::from_utf8(f.next()?)
            .ok()
            .filter(|a| crate::names::AppName::is_valid(a))?;
        let release = f.number()?;
        let time = if older {
            msec(f.next()?)?
        } else {
            last.read(f.fixed(ISO8601_LEN)?)?
        };
        let status = u16::try_from(f.number()?).ok()?;
        let bytes = f.number()?;
        if older {
            // `$upstream_status`: `-` exactly when `$upstream_response_time` is.
            f.next()?;
        }
        let response_time = f.next()?;
        let header_time = f.last()?;
        let upstream = match response_time {
            b"-" => None,
            one if let Some(t) = fixed_seconds(one) => Some(t),
            several => {
                let (mut any, mut sum) = (false, 0.0);
                for t in times(several) {
                    if let Some(t) = t? {
                        any = true;
                        sum += t;
                    }
                }
                any.then_some(sum)
            }
        };
        // The last attempt of the first pass (before an internal redirect) got headers.
        let answered = match header_time {
            b"-" => false,
            one if fixed_seconds(one).is_some() => true,
            several => {
                let first_pass = several.split(|b| *b == b':').next().unwrap_or(&[]);
                let mut answered = false;
                for t in times(first_pass) {
                    answered = t?.is_some();
                }
                answered
            }
        };
        Some(Line {
            app,
            release,
            time,
            status,
            bytes,
            proxied: response_time.trim_ascii() != b"-",
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

/// Each attempt's time in an `$upstream_*_time`, separated by `, ` and ` : `: `Some(None)` for
/// `-` (no time), `None` for what is not a time (the line is refused).
fn times(v: &[u8]) -> impl Iterator<Item = Option<Option<f64>>> + '_ {
    v.split(|b| matches!(b, b',' | b':'))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
        .map(|t| {
            if t == b"-" {
                Some(None)
            } else {
                seconds(t).map(Some)
            }
        })
}

/// A time Nginx wrote: seconds, a dot, three digits (`0.012`). Other forms of a number are read
/// by the float parser.
fn seconds(t: &[u8]) -> Option<f64> {
    fixed_seconds(t).or_else(|| std::str::from_utf8(t).ok()?.parse().ok())
}

/// A time in the form Nginx writes (`0.012`: seconds, a dot, three digits), read without a
/// float parser.
fn fixed_seconds(t: &[u8]) -> Option<f64> {
    let [whole @ .., b'.', a, b, c] = t else {
        return None;
    };
    let digit = |d: u8| d.is_ascii_digit().then(|| u64::from(d - b'0'));
    let ms = digit(*a)? * 100 + digit(*b)? * 10 + digit(*c)?;
    let s = number(whole).filter(|s| *s < 1 << 40)?;
    // One correctly rounded division: the same number as parsing the text.
    Some((s * 1000 + ms) as f64 / 1000.0)
}

/// `$msec`: unix seconds, a dot and three digits of milliseconds; the seconds.
fn msec(field: &[u8]) -> Option<u64> {
    match field {
        [seconds @ .., b'.', a, b, c] if [a, b, c].iter().all(|d| d.is_ascii_digit()) => {
            number(seconds)
        }
        _ => None,
    }
}

/// `$time_iso8601`, `YYYY-MM-DDThh:mm:ss+hh:mm` (or `-hh:mm`): unix seconds.
fn iso8601(b: &[u8]) -> Option<u64> {
    if b.len() != ISO8601_LEN
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
    let num = |from: usize, to: usize| number(&b[from..to]);
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

/// ASCII digits only (no sign, no spaces), as a number; `None` beyond `u64`.
fn number(b: &[u8]) -> Option<u64> {
    if b.is_empty() {
        return None;
    }
    b.iter().try_fold(0u64, |n, d| {
        let d = d.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(d))
    })
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

/// `unix` as Nginx's `$time_iso8601` writes it on a host whose time zone is UTC (for tests and
/// benches that write lines as Nginx does).
pub fn iso8601_utc(unix: u64) -> String {
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

    /// A line of `msg` (kept for the test's length: a line borrows its text).
    fn line(msg: &str) -> Option<Line<'static>> {
        Line::parse(msg.as_bytes().to_vec().leak())
    }

    /// 2025-12-07T11:43:21 UTC.
    const T: &str = "2025-12-07T11:43:21+00:00";
    const UNIX: u64 = 1765107801;

    #[test]
    fn proxied_static_and_failed_requests() {
        let l = line(&format!("k3|shop|3|{T}|200|612|0.012|0.011")).unwrap();
        assert_eq!(
            (l.app, l.release, l.time, l.status, l.bytes),
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
            // Fields that are not numbers or times, or too large.
            format!("k3|shop|99999999999999999999|{T}|200|612|0.012|0.011"),
            format!("k3|shop|3|{T}|70000|612|0.012|0.011"),
            format!("k3|shop|3|{T}|+200|612|0.012|0.011"),
            format!("k3|shop|3|{T}|200||0.012|0.011"),
            format!("k3|shop|3|{T}|200|612|abc|0.011"),
            format!("k3|shop|3|{T}|200|612|0.012|x : 0.011"),
            format!("k3|shop|3|{T}|200|612|0.012|0.011|"),
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
