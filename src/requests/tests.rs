use super::*;

/// A line as Nginx logs it (kept for the test's length: a line borrows its text).
fn line(app: &str, release: u64, status: u16, upstream_ms: Option<u64>) -> Line<'static> {
    let (t, h) = match upstream_ms {
        Some(ms) => {
            let t = format!("{:.3}", ms as f64 / 1000.0);
            (t.clone(), t)
        }
        None => ("-".into(), "-".into()),
    };
    let time = line::iso8601_utc(1_000_000);
    let text = format!("k3|{app}|{release}|{time}|{status}|100|{t}|{h}").into_bytes();
    Line::parse(text.leak()).unwrap()
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

/// A slot keeps its requests, errors and quantiles once a later slot has begun and its
/// histogram is gone.
#[test]
fn a_closed_slot_shows_what_it_showed_open() {
    let r = Requests::default();
    let now = 1_000_000;
    for i in 0..100 {
        let status = if i % 10 == 0 { 500 } else { 200 };
        r.add(now, &line("shop", 1, status, Some(1 + i % 40)))
            .unwrap();
    }
    let open: Vec<Point> = [HOUR, DAY]
        .map(|span| r.series("shop", span, now).unwrap().pop().unwrap())
        .into();
    assert!(open[0].p50.is_some());
    // Five minutes later: the slots of both rings are over.
    r.add(now + 300, &line("shop", 1, 200, None)).unwrap();
    for (span, open) in [HOUR, DAY].into_iter().zip(open) {
        let points = r.series("shop", span, now + 300).unwrap();
        let closed = points.iter().find(|p| p.start == open.start).unwrap();
        assert_eq!(closed.requests_per_second, open.requests_per_second);
        assert_eq!(closed.errors_per_second, open.errors_per_second);
        for (c, o) in [
            (closed.p50, open.p50),
            (closed.p95, open.p95),
            (closed.p99, open.p99),
        ] {
            let (c, o) = (c.unwrap(), o.unwrap());
            assert!((c - o).abs() <= o * 1e-6, "{c} against {o}");
        }
    }
    let e = r
        .errors_since_switch("shop", 2, now + 10, now + 20)
        .unwrap();
    assert_eq!(
        e.before,
        Errors {
            requests: 100,
            errors: 10
        }
    );
}

/// A ring takes memory for the stretches of time that had traffic, and gives it back once
/// they are older than the ring.
#[test]
fn a_ring_keeps_chunks_only_for_recent_traffic() {
    let taken = |ring: &Ring| ring.chunks.iter().filter(|c| c.is_some()).count();
    let mut ring = Ring::new(HOUR);
    let now = 1_000_000;
    assert_eq!(taken(&ring), 0);
    // Traffic in one slot only: nothing closed yet, nothing taken.
    ring.add(now, &line("shop", 1, 200, Some(5)));
    assert_eq!(taken(&ring), 0);
    // Each 10 s for 20 minutes: five chunks of four minutes.
    for t in (now..now + 1200).step_by(10) {
        ring.add(t, &line("shop", 1, 200, Some(5)));
    }
    let four_minutes = (CHUNK as u64 * HOUR.seconds) as usize;
    assert!((1200 / four_minutes..=1200 / four_minutes + 1).contains(&taken(&ring)));
    // Quiet for an hour and more: a new request gives back every chunk of the old traffic.
    ring.add(now + 1200 + 3700, &line("shop", 1, 200, Some(5)));
    assert_eq!(taken(&ring), 0);
    assert!(
        ring.points(now + 1200 + 3700)
            .iter()
            .rev()
            .skip(1)
            .all(|p| p.requests_per_second == 0.0)
    );
    // A whole hour of traffic takes the whole ring and no more.
    let from = now + 10_000;
    for t in (from..from + 2 * 3600).step_by(10) {
        ring.add(t, &line("shop", 1, 200, Some(5)));
    }
    assert_eq!(taken(&ring), HOUR.slots / CHUNK);
    let points = ring.points(from + 2 * 3600 - 10);
    assert!(
        points.iter().all(|p| p.requests_per_second == 0.1),
        "{points:?}"
    );
}

/// The log's thread counts a read of the log at once: each line at its own time (the time of
/// the line before is reused only when the field is the same), the same as one by one.
#[test]
fn a_read_of_the_log_counts_as_its_lines_one_by_one() {
    let at = |unix: u64| line::iso8601_utc(unix);
    let now = 1_000_100;
    let text = [
        format!("k3|shop|1|{}|200|10|0.001|0.001", at(1_000_000)),
        format!("k3|shop|1|{}|200|10|0.020|0.020", at(1_000_000)),
        format!("k3|blog|4|{}|404|10|-|-", at(1_000_000)),
        // The next second, then one before it (a worker that flushed late).
        format!("k3|shop|1|{}|500|10|0.300|0.300", at(1_000_015)),
        format!("k3|shop|1|{}|502|10|0.000|-", at(1_000_000)),
        "not keter's".to_string(),
        String::new(),
        // Ahead of the clock: counted now.
        format!("k3|shop|2|{}|200|10|0.002|0.002", at(now + 500)),
        format!("k2|shop|2|{}.250|200|10|200|0.002|0.002", 1_000_020),
    ]
    .map(|l| l + "\n")
    .concat()
        + "k3|shop|1|cut";
    let batch = Requests::default();
    batch.count_lines(text.as_bytes(), now);
    let single = Requests::default();
    for l in text.lines().take(9) {
        if let Some(l) = Line::parse(l.as_bytes()) {
            single.add(l.time.min(now), &l).unwrap();
        }
    }
    let lines = |r: &Requests| {
        (
            r.lines.load(Ordering::Relaxed),
            r.malformed.load(Ordering::Relaxed),
        )
    };
    assert_eq!(lines(&batch), (9, 2), "the cut line is not read");
    for app in ["shop", "blog"] {
        let json = |r: &Requests, span| {
            serde_json::to_value((r.summary(app, now), r.series(app, span, now))).unwrap()
        };
        assert_eq!(json(&batch, HOUR), json(&single, HOUR), "{app}");
        assert_eq!(json(&batch, DAY), json(&single, DAY), "{app}");
    }
    let s = batch.summary("shop", now).unwrap();
    assert_eq!(s.total.requests, 6);
    assert_eq!(s.total.by_class["upstream_failure"], 1);
    let hour = batch.series("shop", HOUR, now).unwrap();
    let slot = |t: u64| {
        hour.iter()
            .find(|p| p.start == t / 10 * 10)
            .unwrap()
            .requests_per_second
    };
    assert_eq!(
        (slot(1_000_000), slot(1_000_010), slot(1_000_020), slot(now)),
        (0.3, 0.1, 0.1, 0.1)
    );
}
