use super::*;

fn line(app: &str, release: u64, status: u16, upstream_ms: Option<u64>) -> Line {
    let (s, t, h) = match upstream_ms {
        Some(ms) => {
            let t = format!("{:.3}", ms as f64 / 1000.0);
            (status.to_string(), t.clone(), t)
        }
        None => ("-".into(), "-".into(), "-".into()),
    };
    Line::parse(format!("k2|{app}|{release}|1000000.000|{status}|100|{s}|{t}|{h}").as_bytes())
        .unwrap()
}

#[test]
fn counts_by_class_release_and_time() {
    let r = Requests::default();
    let now = 1_000_000;
    for _ in 0..8 {
        r.add(now, &line("shop", 1, 200, Some(20))).unwrap();
    }
    r.add(now, &line("shop", 1, 404, None)).unwrap();
    r.add(now + 10, &line("shop", 2, 500, Some(200))).unwrap();
    let s = r.summary("shop", now + 20).unwrap();
    assert_eq!(s.total.requests, 10);
    assert_eq!(s.total.by_class["2xx"], 8);
    assert_eq!(s.total.by_class["4xx"], 1);
    assert_eq!(s.total.by_class["5xx"], 1);
    assert_eq!(s.total.response_bytes, 1000);
    assert_eq!(
        s.releases
            .iter()
            .map(|r| (r.release, r.counters.requests))
            .collect::<Vec<_>>(),
        [(2, 1), (1, 9)]
    );
    // 9 of 10 latencies at 20 ms: p50 in the 10-25 ms bucket, p99 in 100-250 ms.
    let p50 = s.total.upstream_seconds_p50.unwrap();
    assert!((0.01..=0.025).contains(&p50), "{p50}");
    let p99 = s.total.upstream_seconds_p99.unwrap();
    assert!((0.1..=0.25).contains(&p99), "{p99}");
    let hour = r.series("shop", HOUR, now + 20).unwrap();
    assert_eq!(hour.len(), HOUR.slots);
    let at = |t: u64| hour.iter().find(|p| p.start == t / 10 * 10).unwrap();
    assert_eq!(at(now).requests_per_second, 0.9);
    assert_eq!(at(now + 10).errors_per_second, 0.1);
    // A slot an hour later is a new one: the ring does not keep stale counts.
    let later = r.series("shop", HOUR, now + 3700).unwrap();
    assert!(later.iter().all(|p| p.requests_per_second == 0.0));
    assert_eq!(r.series("shop", DAY, now).unwrap().len(), DAY.slots);
}

#[test]
fn releases_are_bounded() {
    let r = Requests::default();
    for release in 1..=10 {
        r.add(1000, &line("shop", release, 200, Some(1))).unwrap();
    }
    // A draining old release still counts in the app's total.
    r.add(1000, &line("shop", 2, 200, Some(1))).unwrap();
    let (_, total, releases) = r.counters().pop().unwrap();
    assert_eq!(total.requests(), 11);
    assert_eq!(
        releases.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        [7, 8, 9, 10]
    );
}

#[test]
fn quantiles_interpolate_within_their_bucket() {
    let mut b = [0u64; LATENCY_BUCKETS.len() + 1];
    assert_eq!(quantile(&b, 0.5), None);
    b[bucket(0.2)] = 100;
    let q = quantile(&b, 0.5).unwrap();
    assert!((0.1..=0.25).contains(&q), "{q}");
    b[LATENCY_BUCKETS.len()] = 1000;
    assert_eq!(quantile(&b, 0.99), Some(60.0));
}

#[test]
fn a_releases_errors_beside_as_long_before_its_switch() {
    let r = Requests::default();
    let switched = 1_000_000;
    // Before the switch, release 1: 100 requests over the minute, 2 failed; and older ones.
    for i in 0..100 {
        let status = if i < 2 { 500 } else { 200 };
        r.add(switched - 60 + i % 60, &line("shop", 1, status, Some(5)))
            .unwrap();
    }
    for _ in 0..50 {
        r.add(switched - 600, &line("shop", 1, 502, None)).unwrap();
    }
    // After it, release 2: 40 requests, 10 answered 500 and 2 upstream failures.
    for i in 0..40 {
        let status = match i {
            0..10 => 500,
            10..12 => 504,
            _ => 200,
        };
        r.add(switched + i, &line("shop", 2, status, None)).unwrap();
    }
    let e = r
        .errors_since_switch("shop", 2, switched, switched + 60)
        .unwrap();
    assert_eq!(
        e.release,
        Errors {
            requests: 40,
            errors: 12
        }
    );
    // The minute before the switch, not the older failures.
    assert_eq!(
        e.before,
        Errors {
            requests: 100,
            errors: 2
        }
    );
    assert!((e.release.ratio() - 0.3).abs() < 1e-9);
    assert!(
        r.errors_since_switch("other", 2, switched, switched)
            .is_none()
    );
}
