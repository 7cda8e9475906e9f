//! `/metrics`: keter's counters in the Prometheus text exposition format (version 0.0.4).
//!
//! Every family is written with its `# HELP` and `# TYPE` lines even when it has no sample
//! yet, so that dashboards and alerts see the series from keter's first scrape.

use std::fmt::Write;

use crate::nginx::NginxCounters;
use crate::report::{AppState, BUCKETS, Histogram, Reports};
use crate::requests::{Class, LATENCY_BUCKETS, Requests};

/// The content type Prometheus expects for this format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders every metric.
pub fn render(reports: &Reports, nginx: &NginxCounters) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = String::with_capacity(4096);
    let apps = reports.apps();

    family(
        &mut out,
        "keter_deploys_total",
        "counter",
        "Deploys since keter started, by how they ended.",
    );
    for (result, n) in reports.deploys() {
        sample(
            &mut out,
            "keter_deploys_total",
            &[("result", result.as_str())],
            n,
        );
    }

    histogram(
        &mut out,
        "keter_deploy_duration_seconds",
        "Time from picking up a bundle to the switch, of successful deploys.",
        &reports.deploy_duration,
    );
    histogram(
        &mut out,
        "keter_readiness_wait_seconds",
        "Time from starting a webapp process until it answered its health check.",
        &reports.readiness_wait,
    );

    family(
        &mut out,
        "keter_app_restarts_total",
        "counter",
        "Crash restarts of an app's processes since keter started.",
    );
    for (app, n) in reports.restarts() {
        sample(&mut out, "keter_app_restarts_total", &[("app", &app)], n);
    }

    family(
        &mut out,
        "keter_app_health_replacements_total",
        "counter",
        "Unhealthy webapp processes replaced by a fresh one since keter started.",
    );
    for (app, n) in reports.health_replacements() {
        sample(
            &mut out,
            "keter_app_health_replacements_total",
            &[("app", &app)],
            n,
        );
    }

    family(
        &mut out,
        "keter_app_unhealthy",
        "gauge",
        "Webapp processes of an app that failed health-check-failures checks in a row and are not replaced yet.",
    );
    for app in &apps {
        let n = app
            .processes
            .iter()
            .filter(|p| matches!(p.health, Some("unhealthy" | "replacing")))
            .count() as u64;
        sample(&mut out, "keter_app_unhealthy", &[("app", &app.name)], n);
    }

    family(
        &mut out,
        "keter_app_health_check_seconds",
        "gauge",
        "How long the last health check of a webapp process took.",
    );
    for app in &apps {
        for p in &app.processes {
            if let Some(ms) = p.health_latency_ms {
                sample(
                    &mut out,
                    "keter_app_health_check_seconds",
                    &[("app", &app.name), ("stanza", &p.stanza.to_string())],
                    ms as f64 / 1000.0,
                );
            }
        }
    }

    family(
        &mut out,
        "keter_apps",
        "gauge",
        "Apps known to keter, by state.",
    );
    for state in AppState::ALL {
        let n = apps.iter().filter(|a| a.state == state).count() as u64;
        sample(&mut out, "keter_apps", &[("state", state.as_str())], n);
    }

    family(
        &mut out,
        "keter_app_log_lines_dropped_total",
        "counter",
        "Output lines of an app dropped because its log could not keep up.",
    );
    for app in &apps {
        sample(
            &mut out,
            "keter_app_log_lines_dropped_total",
            &[("app", &app.name)],
            app.log_lines_dropped,
        );
    }

    // Each app's processes together, as their control groups count them now; absent where
    // the host cannot tell (README "Limits and accounting").
    for (name, kind, help, value) in [
        (
            "keter_app_cpu_seconds_total",
            "counter",
            "CPU time used by the serving version's processes.",
            (|a: &crate::report::AppReport| a.usage.cpu_usec.map(|u| (u as f64 / 1e6).to_string()))
                as fn(&crate::report::AppReport) -> Option<String>,
        ),
        (
            "keter_app_memory_bytes",
            "gauge",
            "Memory used by the serving version's processes.",
            |a| a.usage.memory_bytes.map(|n| n.to_string()),
        ),
        (
            "keter_app_memory_peak_bytes",
            "gauge",
            "The highest memory use of each of the serving version's processes, summed.",
            |a| a.usage.memory_peak_bytes.map(|n| n.to_string()),
        ),
        (
            "keter_app_tasks",
            "gauge",
            "Processes and threads of the serving version.",
            |a| a.usage.tasks.map(|n| n.to_string()),
        ),
        (
            "keter_app_oom_kills_total",
            "counter",
            "Processes of the serving version killed by the kernel for lack of memory.",
            |a| a.usage.oom_kills.map(|n| n.to_string()),
        ),
    ] {
        family(&mut out, name, kind, help);
        for app in &apps {
            if let Some(v) = value(app) {
                sample(&mut out, name, &[("app", &app.name)], v);
            }
        }
    }
    family(
        &mut out,
        "keter_app_memory_limit_bytes",
        "gauge",
        "memory-limit of each process of the serving version that has one.",
    );
    for app in &apps {
        for p in &app.processes {
            if let Some(l) = p.usage.memory_limit_bytes {
                let stanza = p.stanza.to_string();
                sample(
                    &mut out,
                    "keter_app_memory_limit_bytes",
                    &[("app", &app.name), ("kind", p.kind), ("stanza", &stanza)],
                    l,
                );
            }
        }
    }

    let certs = reports.certificates();
    family(
        &mut out,
        "keter_certificate_expiry_timestamp_seconds",
        "gauge",
        "When the certificate over ACME of a host set expires (Unix time); absent until one exists.",
    );
    for c in &certs {
        if let Some(t) = c.valid_until {
            let secs = t
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            sample(
                &mut out,
                "keter_certificate_expiry_timestamp_seconds",
                &[("certificate", &c.name)],
                secs,
            );
        }
    }
    family(
        &mut out,
        "keter_certificate_failures",
        "gauge",
        "Failed ACME attempts of a host set since its last success.",
    );
    for c in &certs {
        sample(
            &mut out,
            "keter_certificate_failures",
            &[("certificate", &c.name)],
            c.failures,
        );
    }

    requests(&mut out, &reports.requests);

    for (name, help, value) in [
        (
            "keter_nginx_reloads_total",
            "Nginx reloads confirmed.",
            nginx.reloads.load(Relaxed),
        ),
        (
            "keter_nginx_reload_failures_total",
            "Nginx reloads that were not confirmed in time.",
            nginx.reload_failures.load(Relaxed),
        ),
        (
            "keter_nginx_test_failures_total",
            "Configurations refused by nginx -t (the previous files were restored).",
            nginx.test_failures.load(Relaxed),
        ),
    ] {
        family(&mut out, name, "counter", help);
        sample(&mut out, name, &[], value);
    }
    out
}

/// Request metrics (README, "Request metrics"), per app and kept release: at most
/// apps × `KEPT_RELEASES` series per family and class or bucket.
fn requests(out: &mut String, requests: &Requests) {
    use std::sync::atomic::Ordering::Relaxed;
    let apps = requests.counters();
    let releases = || {
        apps.iter().flat_map(|(app, _, releases)| {
            releases
                .iter()
                .map(move |(r, c)| (app.as_str(), r.to_string(), c))
        })
    };
    family(
        out,
        "keter_app_requests_total",
        "counter",
        "Requests Nginx answered for an app, by release (deploy number) and status class; \
         upstream_failure: a 502 or 504 of Nginx itself, the app not reached or too slow.",
    );
    for (app, release, c) in releases() {
        for class in Class::ALL {
            sample(
                out,
                "keter_app_requests_total",
                &[
                    ("app", app),
                    ("release", &release),
                    ("class", class.as_str()),
                ],
                c.classes[class as usize],
            );
        }
    }
    family(
        out,
        "keter_app_response_bytes_total",
        "counter",
        "Bytes Nginx sent to clients for an app, headers included, by release.",
    );
    for (app, release, c) in releases() {
        sample(
            out,
            "keter_app_response_bytes_total",
            &[("app", app), ("release", &release)],
            c.bytes,
        );
    }
    let name = "keter_app_upstream_response_seconds";
    family(
        out,
        name,
        "histogram",
        "Time from Nginx connecting to the app to the app's last byte, of requests the app \
         answered, by release.",
    );
    for (app, release, c) in releases() {
        let mut cumulative = 0;
        for (le, n) in LATENCY_BUCKETS.iter().zip(&c.latency) {
            cumulative += n;
            sample(
                out,
                &format!("{name}_bucket"),
                &[("app", app), ("release", &release), ("le", &le.to_string())],
                cumulative,
            );
        }
        let count = c.latency_count();
        let labels = [("app", app), ("release", release.as_str())];
        sample(
            out,
            &format!("{name}_bucket"),
            &[labels[0], labels[1], ("le", "+Inf")],
            count,
        );
        sample(out, &format!("{name}_sum"), &labels, c.latency_sum);
        sample(out, &format!("{name}_count"), &labels, count);
    }
    family(
        out,
        "keter_request_log_lines_total",
        "counter",
        "Lines read from Nginx's request log.",
    );
    sample(
        out,
        "keter_request_log_lines_total",
        &[],
        requests.lines.load(Relaxed),
    );
    family(
        out,
        "keter_request_log_lines_dropped_total",
        "counter",
        "Lines read but not counted: malformed, or of an app beyond the bound on apps.",
    );
    for (reason, n) in [
        ("malformed", &requests.malformed),
        ("too_many_apps", &requests.too_many_apps),
    ] {
        sample(
            out,
            "keter_request_log_lines_dropped_total",
            &[("reason", reason)],
            n.load(Relaxed),
        );
    }
    family(
        out,
        "keter_request_log_skipped_bytes_total",
        "counter",
        "Bytes of Nginx's request log not read: a backlog too large to catch up with.",
    );
    sample(
        out,
        "keter_request_log_skipped_bytes_total",
        &[],
        requests.skipped_bytes.load(Relaxed),
    );
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", label_value(v));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// Escapes a label value as the format requires (app names cannot contain these, but the
/// format must hold whatever reaches it).
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    family(out, name, "histogram", help);
    let (buckets, count, sum) = h.snapshot();
    let bucket = format!("{name}_bucket");
    for (le, n) in BUCKETS.iter().zip(&buckets) {
        sample(out, &bucket, &[("le", &le.to_string())], n);
    }
    sample(out, &bucket, &[("le", "+Inf")], count);
    sample(out, &format!("{name}_sum"), &[], sum);
    sample(out, &format!("{name}_count"), &[], count);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::AppName;
    use crate::report::{AppReport, DeployResult};
    use std::time::Duration;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let reports = Reports::default();
        reports.deploy_finished(DeployResult::Succeeded, Duration::from_millis(80));
        reports.deploy_finished(DeployResult::Succeeded, Duration::from_secs(3));
        reports.deploy_finished(DeployResult::Failed, Duration::from_secs(1));
        let app = AppName::new("hello").unwrap();
        reports.restarted(&app);
        reports.health_replaced(&app);
        let mut r = AppReport::new(&app);
        r.log_lines_dropped = 4;
        let webapp = |health, latency| crate::report::ProcessReport {
            kind: "webapp",
            stanza: 0,
            port: Some(4000),
            pid: Some(42),
            restarts: 0,
            health: Some(health),
            health_latency_ms: latency,
            health_failures: 0,
            health_error: None,
            health_replacements: 1,
            usage: Default::default(),
            group: None,
        };
        r.processes = vec![webapp("replacing", None), webapp("healthy", Some(1500))];
        reports.publish(r);
        let nginx = NginxCounters::default();
        nginx.reloads.store(2, std::sync::atomic::Ordering::Relaxed);
        let line = |m: &'static str| crate::requests::Line::parse(m.as_bytes()).unwrap();
        for m in [
            "k3|hello|2|1970-01-01T00:16:40+00:00|200|100|0.020|0.020",
            "k3|hello|2|1970-01-01T00:16:40+00:00|200|100|0.300|0.300",
            "k3|hello|3|1970-01-01T00:16:40+00:00|502|50|0.000|-",
        ] {
            reports.requests.add(1000, &line(m)).unwrap();
        }
        let text = render(&reports, &nginx);
        for line in [
            "keter_deploys_total{result=\"succeeded\"} 2",
            "keter_deploys_total{result=\"failed\"} 1",
            "keter_deploys_total{result=\"unchanged\"} 0",
            "keter_deploy_duration_seconds_bucket{le=\"0.05\"} 0",
            "keter_deploy_duration_seconds_bucket{le=\"0.1\"} 1",
            "keter_deploy_duration_seconds_bucket{le=\"5\"} 2",
            "keter_deploy_duration_seconds_bucket{le=\"+Inf\"} 2",
            "keter_deploy_duration_seconds_count 2",
            "keter_deploy_duration_seconds_sum 3.08",
            "keter_readiness_wait_seconds_count 0",
            "keter_app_restarts_total{app=\"hello\"} 1",
            "keter_apps{state=\"starting\"} 1",
            "keter_apps{state=\"running\"} 0",
            "keter_app_log_lines_dropped_total{app=\"hello\"} 4",
            "keter_app_health_replacements_total{app=\"hello\"} 1",
            "keter_app_unhealthy{app=\"hello\"} 1",
            "keter_app_health_check_seconds{app=\"hello\",stanza=\"0\"} 1.5",
            "keter_nginx_reloads_total 2",
            "# TYPE keter_deploy_duration_seconds histogram",
            "keter_app_requests_total{app=\"hello\",release=\"2\",class=\"2xx\"} 2",
            "keter_app_requests_total{app=\"hello\",release=\"2\",class=\"5xx\"} 0",
            "keter_app_requests_total{app=\"hello\",release=\"3\",class=\"upstream_failure\"} 1",
            "keter_app_response_bytes_total{app=\"hello\",release=\"2\"} 200",
            "keter_app_upstream_response_seconds_bucket{app=\"hello\",release=\"2\",le=\"0.025\"} 1",
            "keter_app_upstream_response_seconds_bucket{app=\"hello\",release=\"2\",le=\"0.5\"} 2",
            "keter_app_upstream_response_seconds_bucket{app=\"hello\",release=\"2\",le=\"+Inf\"} 2",
            "keter_app_upstream_response_seconds_count{app=\"hello\",release=\"3\"} 0",
            "keter_app_upstream_response_seconds_sum{app=\"hello\",release=\"2\"} 0.32",
            "keter_request_log_lines_dropped_total{reason=\"malformed\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }

    #[test]
    fn escapes_label_values() {
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
