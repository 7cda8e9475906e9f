//! One request as Nginx reports it: a line of the request log (`tailer.rs`) in the `log_format`
//! keter writes into every app's file (`templates/app.conf.tera`):
//!
//! ```text
//! k2|APP|RELEASE|$msec|$status|$bytes_sent|$upstream_status|$upstream_response_time|$upstream_header_time
//! ```
//!
//! `$msec` is when Nginx logged the request (unix seconds with milliseconds).
//!
//! The upstream fields are `-` when nothing was proxied (static files, redirects, Nginx's own
//! answers); with several attempts or an internal redirect (the operator's proxy-exception
//! page) they list values separated by `, ` and ` : `.

/// The first field: the version of the format, so that a line of another keter's format is
/// told apart and dropped (`k1` was a syslog datagram without the time).
pub const VERSION: &str = "k2";

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
        if f.next()? != VERSION {
            return None;
        }
        let app = f.next()?;
        if crate::names::AppName::new(app).is_err() {
            return None;
        }
        let release = f.next()?.parse().ok()?;
        let (seconds, millis) = f.next()?.split_once('.')?;
        if millis.len() != 3 || !millis.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let time = seconds.parse().ok()?;
        let status: u16 = f.next()?.parse().ok()?;
        let bytes = f.next()?.parse().ok()?;
        let upstream_status = f.next()?;
        let response_time = f.next()?;
        let header_time = f.next()?;
        if f.next().is_some() {
            return None;
        }
        let times = |v: &str| -> Vec<Option<f64>> {
            v.split([',', ':'])
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(|t| t.parse::<f64>().ok())
                .collect()
        };
        let responses = times(response_time);
        let upstream = responses
            .iter()
            .any(Option::is_some)
            .then(|| responses.iter().flatten().sum());
        // The last attempt of the first pass (before an internal redirect) got headers.
        let first_pass = header_time.split(':').next().unwrap_or("");
        let answered = times(first_pass).last().is_some_and(Option::is_some);
        Some(Line {
            app: app.to_string(),
            release,
            time,
            status,
            bytes,
            proxied: upstream_status.trim() != "-",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn line(msg: &str) -> Option<Line> {
        Line::parse(msg.as_bytes())
    }

    #[test]
    fn proxied_static_and_failed_requests() {
        let l = line("k2|shop|3|1765107801.250|200|612|200|0.012|0.011").unwrap();
        assert_eq!(
            (l.app.as_str(), l.release, l.time, l.status, l.bytes),
            ("shop", 3, 1765107801, 200, 612)
        );
        assert_eq!(l.class(), Class::Success);
        assert_eq!(l.upstream_seconds(), Some(0.012));

        let l = line("k2|shop|3|1765107801.250|404|150|-|-|-").unwrap();
        assert_eq!(l.class(), Class::ClientError);
        assert_eq!(l.upstream_seconds(), None);

        // Connection refused: Nginx's own 502; with the operator's page behind an internal
        // redirect.
        let l = line("k2|shop|3|1765107801.250|502|300|502|0.000|-").unwrap();
        assert_eq!(l.class(), Class::UpstreamFailure);
        assert_eq!(l.upstream_seconds(), None);
        let l = line("k2|shop|3|1765107801.250|502|300|502 : -|0.000 : -|- : -").unwrap();
        assert_eq!(l.class(), Class::UpstreamFailure);
        let l = line("k2|shop|3|1765107801.250|504|300|504|60.001|-").unwrap();
        assert_eq!(l.class(), Class::UpstreamFailure);

        // The app's own 502 is the app's 5xx.
        let l = line("k2|shop|3|1765107801.250|502|120|502|0.004|0.004").unwrap();
        assert_eq!(l.class(), Class::ServerError);
        assert_eq!(l.upstream_seconds(), Some(0.004));

        // Two attempts: the times add up.
        let l = line("k2|shop|3|1765107801.250|200|10|502, 200|0.001, 0.002|-, 0.002").unwrap();
        assert_eq!(l.class(), Class::Success);
        assert!((l.upstream_seconds().unwrap() - 0.003).abs() < 1e-9);
    }

    #[test]
    fn other_formats_are_refused() {
        for msg in [
            "k3|shop|3|1765107801.250|200|612|200|0.012|0.011",
            "k2|shop|3|1765107801.250|200|612|200|0.012",
            "k2|shop|3|1765107801.250|200|612|200|0.012|0.011|x",
            "k2|../x|3|1765107801.250|200|612|200|0.012|0.011",
            "k2|shop|x|1765107801.250|200|612|200|0.012|0.011",
            "",
        ] {
            assert_eq!(line(msg), None, "{msg}");
        }
        assert_eq!(Line::parse(&[0xff, 0xfe]), None);
        // The old datagram, and times that are not `$msec`.
        assert_eq!(
            Line::parse(b"<190>Dec  7 11:43:21 keter: k1|shop|3|200|612|200|0.012|0.011"),
            None
        );
        for time in ["1765107801", "x.123", "1765107801.1", "-1.000"] {
            let l = format!("k2|shop|3|{time}|200|612|200|0.012|0.011");
            assert_eq!(Line::parse(l.as_bytes()), None, "{l}");
        }
    }
}
