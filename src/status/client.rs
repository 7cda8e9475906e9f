//! The client side of the status interface, for `keter status`: one GET to the running
//! daemon's API (over TCP or its unix socket) and a table for people.
//!
//! Whatever comes from the daemon is printed with its control characters written out
//! ([`crate::applog::printable`]), the table and `--json` alike: the daemon escapes what apps
//! print already, but the answer may come from an older keter, and it ends up on an
//! operator's terminal.
//!
//! The peer is keter itself on this machine, so a small blocking HTTP/1.1 exchange is all it
//! takes: no proxy, no TLS, no redirects.

use std::fmt;
use std::io;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::Value;

use super::StatusAddress;
use crate::probe;

/// Largest answer read; the API of thousands of apps stays far below it.
const MAX_RESPONSE: u64 = 64 << 20;

/// Why the daemon's API could not be read.
#[derive(Debug)]
pub enum ClientError {
    /// Nothing answers at the address (keter not running, or another address configured).
    Connect(String),
    /// Something answered, but not with what `keter status` expects.
    Response(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Connect(m) | ClientError::Response(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for ClientError {}

/// A text of the daemon's answer, as it may be printed.
fn shown(text: &str) -> String {
    crate::applog::printable(text).into_owned()
}

/// The API's answer as `keter status --json` prints it: pretty JSON in which DEL and the C1
/// controls are `\u` escapes as well (serde_json escapes only C0 controls), so that the text
/// stays the same JSON and holds no control character for the terminal.
pub fn json_text(api: &Value) -> Result<String, serde_json::Error> {
    let text = serde_json::to_string_pretty(api)?;
    if !text.chars().any(|c| ('\u{7f}'..='\u{9f}').contains(&c)) {
        return Ok(text);
    }
    Ok(text
        .chars()
        .map(|c| {
            if ('\u{7f}'..='\u{9f}').contains(&c) {
                format!("\\u{:04x}", u32::from(c))
            } else {
                c.to_string()
            }
        })
        .collect())
}

/// `GET path` from the status interface at `address`; the body of a 200 answer.
pub fn get(address: &StatusAddress, path: &str, timeout: Duration) -> Result<String, ClientError> {
    let connect_error = |e: io::Error| {
        ClientError::Connect(format!(
            "cannot reach keter's status interface at {address}: {e} (is keter running, and \
             is this its configuration?)"
        ))
    };
    let answer = match address {
        StatusAddress::Tcp(addr) => {
            let mut s = TcpStream::connect_timeout(addr, timeout).map_err(connect_error)?;
            s.set_read_timeout(Some(timeout)).map_err(connect_error)?;
            probe::get(&mut s, "keter", path, MAX_RESPONSE)
        }
        StatusAddress::Unix(p) => {
            let mut s = UnixStream::connect(p).map_err(connect_error)?;
            s.set_read_timeout(Some(timeout)).map_err(connect_error)?;
            probe::get(&mut s, "keter", path, MAX_RESPONSE)
        }
    }
    .map_err(|e| ClientError::Response(format!("reading from {address}: {e}")))?;
    if answer.status != 200 {
        return Err(ClientError::Response(format!(
            "{address} answered {path} with HTTP status {}",
            answer.status
        )));
    }
    Ok(answer.body)
}

/// An `/api/apps` answer without the list of apps: not a keter's, or a keter's of another
/// version of the status API.
#[derive(Debug)]
pub struct NoAppsList;

impl fmt::Display for NoAppsList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the answer has no \"apps\" list")
    }
}

impl std::error::Error for NoAppsList {}

/// The `/api/apps` answer as a table, then each app's last error on its own line.
pub fn table(api: &Value) -> Result<String, NoAppsList> {
    let apps = api
        .get("apps")
        .and_then(Value::as_array)
        .ok_or(NoAppsList)?;
    if apps.is_empty() {
        return Ok("No app is deployed.\n".to_string());
    }
    let header = [
        "APP",
        "STATE",
        "SHA256",
        "PORTS",
        "PIDS",
        "HEALTH",
        "UPTIME",
        "RESTARTS",
        "CPU",
        "MEMORY",
        "TASKS",
        "OOM",
        "LAST DEPLOY",
        "HOSTS",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    let mut errors = Vec::new();
    let mut traffic = Vec::new();
    for app in apps {
        let text = |key: &str| shown(app.get(key).and_then(Value::as_str).unwrap_or(""));
        let name = text("name");
        let processes = app
            .get("processes")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let list = |key: &str| {
            let items: Vec<String> = processes
                .iter()
                .filter_map(|p| p.get(key).and_then(Value::as_u64))
                .map(|n| n.to_string())
                .collect();
            if items.is_empty() {
                "-".to_string()
            } else {
                items.join(",")
            }
        };
        // Each webapp's health and its last check's latency (README "Status interface").
        let health: Vec<String> = processes
            .iter()
            .filter_map(|p| {
                let state = shown(p.get("health").and_then(Value::as_str)?);
                Some(match p.get("health_latency_ms").and_then(Value::as_u64) {
                    Some(ms) => format!("{state}:{ms}ms"),
                    None => state,
                })
            })
            .collect();
        for p in &processes {
            let failures = p
                .get("health_failures")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            if failures > 0 {
                errors.push(format!(
                    "{name}: webapp {} (pid {}, port {}) is {} after {failures} failed health checks in a row{}",
                    p.get("stanza").and_then(Value::as_u64).unwrap_or(0),
                    p.get("pid").and_then(Value::as_i64).unwrap_or(0),
                    p.get("port").and_then(Value::as_u64).unwrap_or(0),
                    shown(p.get("health").and_then(Value::as_str).unwrap_or("?")),
                    p.get("health_error")
                        .and_then(Value::as_str)
                        .map(|e| format!(" ({})", shown(e)))
                        .unwrap_or_default(),
                ));
            }
        }
        let last_deploy = match app.get("last_deploy") {
            Some(d) if d.is_object() => format!(
                "{}{} {}ms",
                shown(d.get("result").and_then(Value::as_str).unwrap_or("?")),
                d.get("error_kind")
                    .and_then(Value::as_str)
                    .map(|k| format!(" ({})", shown(k)))
                    .unwrap_or_default(),
                d.get("duration_ms").and_then(Value::as_u64).unwrap_or(0)
            ),
            _ => "-".to_string(),
        };
        let retry_at = app
            .get("last_deploy")
            .and_then(|d| d.get("retry_at"))
            .and_then(Value::as_str);
        let hosts: Vec<String> = app
            .get("hosts")
            .and_then(Value::as_array)
            .map(|h| h.iter().filter_map(Value::as_str).map(shown).collect())
            .unwrap_or_default();
        let sha = text("sha256");
        rows.push(vec![
            name.clone(),
            text("state"),
            if sha.is_empty() {
                "-".into()
            } else {
                sha.chars().take(12).collect()
            },
            list("port"),
            list("pid"),
            if health.is_empty() {
                "-".into()
            } else {
                health.join(",")
            },
            app.get("uptime_seconds")
                .and_then(Value::as_u64)
                .map(|s| format!("{s}s"))
                .unwrap_or_else(|| "-".into()),
            app.get("restarts")
                .and_then(Value::as_u64)
                .unwrap_or(0)
                .to_string(),
            usage_cell(app, "cpu_seconds", |v| {
                v.as_f64().map(|s| format!("{s:.1}s"))
            }),
            usage_cell(app, "memory_bytes", |v| {
                v.as_u64().map(crate::cgroup::human_bytes)
            }),
            usage_cell(app, "tasks", |v| v.as_u64().map(|n| n.to_string())),
            usage_cell(app, "oom_kills", |v| v.as_u64().map(|n| n.to_string())),
            last_deploy,
            if hosts.is_empty() {
                "-".into()
            } else {
                hosts.join(",")
            },
        ]);
        if let Some(r) = app.get("requests").filter(|r| r.is_object()) {
            traffic.push(requests_line(&name, r));
        }
        if let Some(e) = app.get("last_error").and_then(Value::as_str) {
            errors.push(format!("{name}: last error: {}", shown(e)));
        }
        if let Some(r) = app.get("auto_rollback").filter(|r| r.is_object()) {
            errors.push(auto_rollback_line(&name, r));
        }
        if let Some(at) = retry_at {
            errors.push(format!(
                "{name}: the failed deploy is tried again at {}",
                shown(at)
            ));
        }
        for c in app
            .get("certificates")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            errors.push(certificate_line(&name, c));
        }
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    if !traffic.is_empty() {
        out.push('\n');
        for t in traffic {
            out.push_str(&t);
            out.push('\n');
        }
    }
    if !errors.is_empty() {
        out.push('\n');
        for e in errors {
            out.push_str(&e);
            out.push('\n');
        }
    }
    Ok(out)
}

/// A figure of an app's `usage`, `-` where the host cannot tell.
fn usage_cell(app: &Value, key: &str, show: impl Fn(&Value) -> Option<String>) -> String {
    app.get("usage")
        .and_then(|u| u.get(key))
        .and_then(show)
        .unwrap_or_else(|| "-".into())
}

/// An app's request metrics in one line (README, "Request metrics"): the rates over the last
/// minute, the counts since keter started by class, and the upstream response time quantiles.
fn requests_line(app: &str, r: &Value) -> String {
    let num = |k: &str| r.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let class = |k: &str| {
        r.get("by_class")
            .and_then(|c| c.get(k))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let ms = |k: &str| {
        r.get(k)
            .and_then(Value::as_f64)
            .map(|s| format!("{:.0} ms", s * 1000.0))
            .unwrap_or_else(|| "-".into())
    };
    format!(
        "{app}: {} req/s, {} errors/s (last minute); {} requests: 2xx {}, 3xx {}, 4xx {}, 5xx {}, \
         upstream failures {}; upstream p50 {}, p95 {}, p99 {}",
        num("requests_per_second"),
        num("errors_per_second"),
        r.get("requests").and_then(Value::as_u64).unwrap_or(0),
        class("2xx"),
        class("3xx"),
        class("4xx"),
        class("5xx"),
        class("upstream_failure"),
        ms("upstream_seconds_p50"),
        ms("upstream_seconds_p95"),
        ms("upstream_seconds_p99"),
    )
}

/// The automatic rollback of an app (README "Releases and rollback"): the release watched,
/// or the last one keter rolled back by itself, and why.
fn auto_rollback_line(name: &str, r: &Value) -> String {
    let text = |k: &str| r.get(k).and_then(Value::as_str).map(shown);
    let release = r.get("release").and_then(Value::as_u64).unwrap_or(0);
    let mut line = match (
        text("state").as_deref(),
        r.get("to").and_then(Value::as_u64),
    ) {
        (Some("watching"), _) => format!(
            "{name}: release {release} is rolled back automatically if it fails before {}",
            text("until").unwrap_or_default()
        ),
        (Some("due"), _) => format!("{name}: release {release} is to be rolled back"),
        (state, Some(to)) => format!(
            "{name}: release {release} {} to release {to} automatically",
            state.unwrap_or_default()
        ),
        (state, None) => format!("{name}: release {release} {}", state.unwrap_or_default()),
    };
    if let Some(at) = text("at") {
        line.push_str(&format!(" at {at}"));
    }
    if let Some(why) = text("reason") {
        line.push_str(&format!(": {why}"));
    }
    line
}

/// One certificate over ACME: its hosts and state, until when it is valid, and why there is
/// none yet with the next attempt.
fn certificate_line(app: &str, c: &Value) -> String {
    let text = |v: Option<&Value>| shown(v.and_then(Value::as_str).unwrap_or("?"));
    let hosts: Vec<String> = c
        .get("hosts")
        .and_then(Value::as_array)
        .map(|h| h.iter().filter_map(Value::as_str).map(shown).collect())
        .unwrap_or_default();
    let mut line = format!(
        "{app}: certificate for {}: {}",
        hosts.join(","),
        text(c.get("state"))
    );
    if let Some(until) = c.get("valid_until").and_then(Value::as_str) {
        line.push_str(&format!(", valid until {}", shown(until)));
    }
    match c.get("last_error").filter(|e| e.is_object()) {
        Some(e) => line.push_str(&format!(
            "; last attempt failed ({}): {}; next attempt at {}",
            text(e.get("kind")),
            text(e.get("message")),
            text(c.get("next_attempt"))
        )),
        None => line.push_str(&format!(
            "; next attempt at {}",
            text(c.get("next_attempt"))
        )),
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_have_a_row_per_app_and_list_errors() {
        let api = serde_json::json!({"apps": [
            {"name": "hello", "state": "running", "sha256": "0123456789abcdef", "hosts": ["a.example"],
             "processes": [{"kind": "webapp", "stanza": 0, "port": 4000, "pid": 42,
               "health": "failing", "health_latency_ms": 5000, "health_failures": 2,
               "health_error": "timed out after 5 s"}], "uptime_seconds": 5,
             "usage": {"cpu_seconds": 1.25, "memory_bytes": 52428800, "tasks": 3, "oom_kills": 1},
             "restarts": 1, "last_deploy": {"result": "succeeded", "duration_ms": 90}, "last_error": null,
             "requests": {"requests": 12, "requests_per_second": 0.2, "errors_per_second": 0.0,
             "by_class": {"2xx": 10, "4xx": 2}, "upstream_seconds_p50": 0.012,
             "upstream_seconds_p95": null, "upstream_seconds_p99": 0.25}},
            {"name": "broken", "state": "failed", "sha256": null, "hosts": [], "processes": [],
             "restarts": 0, "last_deploy": {"result": "failed", "duration_ms": 12},
             "last_error": "exec is missing"},
            {"name": "db", "state": "running", "sha256": "ab", "hosts": [], "processes": [],
             "restarts": 0, "last_deploy": {"result": "failed", "duration_ms": 7,
             "error_kind": "postgres", "retry_at": "2026-11-27T14:09:53.123Z"},
             "last_error": "postgres plugin: cannot connect"}
        ]});
        let t = table(&api).unwrap();
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("APP"));
        assert!(
            lines[1].starts_with("hello ")
                && lines[1].contains("0123456789ab")
                && lines[1].contains("4000")
                && lines[1].contains(" 1.2s  50 MiB ")
                && lines[2].contains(" -     -      ")
        );
        assert!(lines[1].contains("failing:5000ms"), "{t}");
        assert!(
            t.contains("hello: webapp 0 (pid 42, port 4000) is failing after 2 failed health checks in a row (timed out after 5 s)"),
            "{t}"
        );
        assert!(lines[2].starts_with("broken") && lines[2].contains("failed 12ms"));
        assert!(t.contains("broken: last error: exec is missing"));
        assert!(
            t.contains(
                "hello: 0.2 req/s, 0 errors/s (last minute); 12 requests: 2xx 10, 3xx 0, 4xx 2, \
                 5xx 0, upstream failures 0; upstream p50 12 ms, p95 -, p99 250 ms"
            ),
            "{t}"
        );
        assert!(lines[3].starts_with("db") && lines[3].contains("failed (postgres) 7ms"));
        assert!(t.contains("db: the failed deploy is tried again at 2026-11-27T14:09:53.123Z"));
    }

    /// An answer of an older keter, which passed on what an app printed as it was.
    #[test]
    fn nothing_from_the_daemon_reaches_the_terminal_raw() {
        let raw = "\x1b]0;owned\x07\x1b[2J\x1b]52;c;ZXZpbA==\x07\0\u{9b}8m\x7f";
        let api = serde_json::json!({"apps": [
            {"name": raw, "state": raw, "sha256": raw, "hosts": [raw], "processes": [],
             "restarts": 0, "last_deploy": {"result": raw, "error_kind": raw, "duration_ms": 1,
             "retry_at": raw}, "last_error": raw,
             "certificates": [{"hosts": [raw], "state": raw, "valid_until": raw,
              "next_attempt": raw, "last_error": {"kind": raw, "message": raw}}]}
        ]});
        let clean = |out: &str| {
            !out.chars()
                .any(|c| (c.is_control() && c != '\n') || ('\u{80}'..='\u{9f}').contains(&c))
        };
        let t = table(&api).unwrap();
        assert!(clean(&t), "{t:?}");
        assert!(t.contains("last error: \\x1b]0;owned\\x07\\x1b[2J"), "{t}");
        let j = json_text(&api).unwrap();
        assert!(clean(&j), "{j:?}");
        assert_eq!(serde_json::from_str::<Value>(&j).unwrap(), api);
    }

    #[test]
    fn an_answer_without_the_apps_list_is_named() {
        let e = table(&serde_json::json!({"error": "x"})).unwrap_err();
        assert_eq!(e.to_string(), "the answer has no \"apps\" list");
    }
}
