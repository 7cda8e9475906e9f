//! Automatic rollback time: from a release's first crash to the previous release serving
//! again. The bad release serves, then exits at a request (`/exit`) and at once on every
//! restart (`--crash-after-first-run`), so the three exits that make a crash loop come as
//! fast as the restart policy allows (0.1 s, then 0.2 s); keter then puts the previous bundle
//! into `incoming/` and deploys it (unpack, readiness, switch). Beside it, the same
//! previous release deployed by copying its bundle in (what an operator would do), from the
//! copy to serving. Prints medians of 5.
//!
//! Run: `cargo bench --bench autorollback` (real Nginx; as root).

#[path = "../tests/integration/support.rs"]
mod support;

use std::time::{Duration, Instant};

use support::*;

const RUNS: usize = 5;
const HOST: &str = "shop.example.com";
const WAIT: Duration = Duration::from_secs(60);

fn main() {
    let k = Keter::start_with(
        "bench-autorollback",
        Opts {
            extra: "rollback-window: 120\n".into(),
            drain_time: 0.3,
            ..Opts::default()
        },
    );
    let good = k.deploy_hello("shop", "good", HOST, &[]);
    k.wait_for(HOST, "good", WAIT);
    let (mut automatic, mut by_hand) = (Vec::new(), Vec::new());
    for run in 0..RUNS {
        let bad = format!("bad{run}");
        k.deploy_hello("shop", &bad, HOST, &["--crash-after-first-run"]);
        k.wait_for(HOST, &bad, WAIT);
        let t = Instant::now();
        let _ = k.get(HOST, "/exit");
        automatic.push(until_serving(&k, "good", t));
        settle(&k);

        // The same way back by hand: the good bundle copied in once the bad one serves.
        let bad = format!("bad{run}-again");
        k.deploy_hello("shop", &bad, HOST, &[]);
        k.wait_for(HOST, &bad, WAIT);
        let t = Instant::now();
        k.deploy("shop", &good);
        by_hand.push(until_serving(&k, "good", t));
        settle(&k);
    }
    println!("automatic rollback, first crash to the previous release serving (median of {RUNS}):");
    println!("  {:>8.0} ms", median(&mut automatic));
    println!("the previous bundle copied in by hand, copy to serving (median of {RUNS}):");
    println!("  {:>8.0} ms", median(&mut by_hand));
}

/// How long after `t` the host first answers `body`.
fn until_serving(k: &Keter, body: &str, t: Instant) -> Duration {
    loop {
        if k.get(HOST, "/")
            .is_ok_and(|r| r.status == 200 && r.body.trim() == body)
        {
            return t.elapsed();
        }
        assert!(t.elapsed() < WAIT, "{body} never served:\n{}", k.log());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Lets the previous version drain before the next run.
fn settle(k: &Keter) {
    k.wait_app("shop", "settled", WAIT, |a| {
        a.draining == 0 && a.deploy_stage.is_none()
    });
    std::thread::sleep(Duration::from_millis(300));
}

fn median(v: &mut [Duration]) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1000.0
}
