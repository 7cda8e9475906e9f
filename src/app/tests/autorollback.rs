//! Automatic rollback (README "Releases and rollback"; `autorollback.rs`): within
//! `rollback-window` of its switch, a release that crash-loops, stays unhealthy or fails its
//! users is rolled back to the release before it through `keter rollback`'s path; never an
//! app without an earlier release, never a release that is itself a rollback, never while
//! frozen for an upgrade.

use super::*;
use crate::app::releases::{Arrival, Ended};
use crate::requests::{Errors, ErrorsBeside};

const SECOND: Duration = Duration::from_secs(1);

/// Bundle file `n` (content `sha-n`) through every stage to serving, as a release.
pub(super) fn release(m: &mut Machine, fx: &mut Fake, n: u64, yaml: &str) -> u64 {
    deploy(m, fx, n);
    switch_release(m, fx, n, yaml)
}

/// The deploy under way (of bundle file `n`) unpacked, ready and switched.
fn switch_release(m: &mut Machine, fx: &mut Fake, n: u64, yaml: &str) -> u64 {
    let mut v = version(fx.prepares.last().unwrap().id, n, yaml);
    v.sha256 = format!("sha-{n}");
    v.arrival = Some(Arrival {
        sha256: v.sha256.clone(),
        size: 10,
        owner: 1000,
        owner_name: None,
        rollback: None,
    });
    let id = switch_in(m, fx, v);
    // The previous version drains at once.
    fx.drained = true;
    m.tick(fx);
    settle(m, fx);
    id
}

/// The webapp of version `id` exits with status 1 after a second, and is restarted.
fn crash(m: &mut Machine, fx: &mut Fake, id: u64) {
    fx.advance(SECOND);
    let pid = pid_of(fx, id, 0);
    m.step(
        vec![Event::Exited {
            version: id,
            proc: 0,
            pid,
            status: exit_code(1),
        }],
        fx,
    );
    settle(m, fx);
    fx.advance(SECOND);
    m.step(vec![Event::Tick], fx);
}

/// The rollback under way, if a deploy is one.
fn rolling_back(m: &Machine) -> Option<&crate::app::releases::Rollback> {
    match &m.life {
        Life::Deploying { deploy, .. } => deploy.rollback.as_ref(),
        _ => None,
    }
}

fn releases(fx: &Fake) -> &crate::app::releases::Releases {
    fx.releases.as_ref().expect("a release list was written")
}

#[test]
fn a_release_that_crash_loops_in_its_window_is_rolled_back_to_the_one_before() {
    let (mut m, mut fx) = (machine(), Fake::new());
    release(&mut m, &mut fx, 1, WEB);
    let bad = release(&mut m, &mut fx, 2, WEB);
    assert_eq!(
        m.report(0, fx.wall).auto_rollback.map(|r| r.state),
        Some("watching")
    );
    crash(&mut m, &mut fx, bad);
    crash(&mut m, &mut fx, bad);
    assert!(fx.placed.is_empty(), "two crashes are no crash loop");
    crash(&mut m, &mut fx, bad);
    // Release 1's kept bundle is put into incoming/ and deployed from there.
    assert_eq!(fx.placed, ["sha-1"]);
    let r = rolling_back(&m).expect("a rollback is under way");
    assert_eq!((r.to, r.how), (1, Ended::FailedAfterSwitch));
    assert!(r.reason.contains("crash-looping"), "{}", r.reason);
    let report = m.report(0, fx.wall);
    assert_eq!(
        report.auto_rollback.as_ref().map(|r| (r.state, r.to)),
        Some(("rolled-back", Some(1)))
    );
    assert!(report.last_error.unwrap().contains("automatically"));
    switch_release(&mut m, &mut fx, 1, WEB);
    let list = &releases(&fx).releases;
    assert_eq!(list[1].ended, Some(Ended::FailedAfterSwitch));
    assert!(
        list[1]
            .reason
            .as_ref()
            .unwrap()
            .contains("rolled back to 1 automatically")
    );
    assert_eq!(list[2].rollback_of, Some(1));
    assert!(list[2].ended.is_none());
}

#[test]
fn crashes_after_the_window_roll_nothing_back() {
    let (mut m, mut fx) = (machine(), Fake::new());
    fx.rollback.window = Duration::from_secs(60);
    release(&mut m, &mut fx, 1, WEB);
    let v = release(&mut m, &mut fx, 2, WEB);
    fx.advance(Duration::from_secs(60));
    m.step(vec![Event::Tick], &mut fx);
    assert!(m.report(0, fx.wall).auto_rollback.is_none());
    for _ in 0..5 {
        crash(&mut m, &mut fx, v);
    }
    assert!(fx.placed.is_empty());
    assert!(rolling_back(&m).is_none());
}

#[test]
fn an_app_without_an_earlier_release_is_not_watched() {
    let (mut m, mut fx) = (machine(), Fake::new());
    let v = release(&mut m, &mut fx, 1, WEB);
    assert!(m.watch.is_none());
    for _ in 0..5 {
        crash(&mut m, &mut fx, v);
    }
    assert!(fx.placed.is_empty());
}

#[test]
fn a_rollback_target_that_fails_is_not_rolled_back_again() {
    let (mut m, mut fx) = (machine(), Fake::new());
    release(&mut m, &mut fx, 1, WEB);
    release(&mut m, &mut fx, 2, WEB);
    let bad = release(&mut m, &mut fx, 3, WEB);
    for _ in 0..3 {
        crash(&mut m, &mut fx, bad);
    }
    assert_eq!(fx.placed, ["sha-2"]);
    let back = switch_release(&mut m, &mut fx, 2, WEB);
    assert!(m.watch.is_none(), "a rollback is not watched");
    for _ in 0..5 {
        crash(&mut m, &mut fx, back);
    }
    assert_eq!(fx.placed, ["sha-2"], "rolled back again");
    assert!(rolling_back(&m).is_none());
}

#[test]
fn no_rollback_while_frozen_for_an_upgrade_but_after_a_thaw() {
    let (mut m, mut fx) = (machine(), Fake::new());
    release(&mut m, &mut fx, 1, WEB);
    let bad = release(&mut m, &mut fx, 2, WEB);
    let (tx, _rx) = crossbeam_channel::bounded(1);
    m.step(vec![Event::Handover(Handover::Freeze(tx))], &mut fx);
    for _ in 0..3 {
        crash(&mut m, &mut fx, bad);
    }
    assert!(fx.placed.is_empty(), "rolled back while frozen");
    assert_eq!(
        m.report(0, fx.wall).auto_rollback.map(|r| r.state),
        Some("due")
    );
    m.step(vec![Event::Handover(Handover::Thaw)], &mut fx);
    assert_eq!(fx.placed, ["sha-1"]);
    assert!(rolling_back(&m).is_some());
}

#[test]
fn a_window_of_zero_in_the_bundle_turns_it_off() {
    let (mut m, mut fx) = (machine(), Fake::new());
    release(&mut m, &mut fx, 1, WEB);
    let v = release(&mut m, &mut fx, 2, &format!("rollback-window: 0\n{WEB}"));
    assert!(m.watch.is_none());
    for _ in 0..3 {
        crash(&mut m, &mut fx, v);
    }
    assert!(fx.placed.is_empty());
}

#[test]
fn a_restart_policy_that_gives_up_rolls_back_at_once() {
    let (mut m, mut fx) = (machine(), Fake::new());
    release(&mut m, &mut fx, 1, WEB_AND_WORKER);
    let v = release(&mut m, &mut fx, 2, WEB_AND_WORKER);
    // The background stanza has restart-count 2: its third exit gives up. Exits of the
    // webapp and the worker count together; here only the worker's.
    for _ in 0..3 {
        fx.advance(SECOND);
        let pid = pid_of(&fx, v, 0);
        m.step(
            vec![Event::Exited {
                version: v,
                proc: 0,
                pid,
                status: exit_code(1),
            }],
            &mut fx,
        );
        settle(&mut m, &mut fx);
        fx.advance(Duration::from_secs(2));
        m.step(vec![Event::Tick], &mut fx);
        if !fx.placed.is_empty() {
            break;
        }
    }
    assert_eq!(fx.placed, ["sha-1"]);
}

fn errors(requests: u64, failed: u64, before: u64, before_failed: u64) -> ErrorsBeside {
    ErrorsBeside {
        release: Errors {
            requests,
            errors: failed,
        },
        before: Errors {
            requests: before,
            errors: before_failed,
        },
    }
}

#[test]
fn a_release_that_fails_its_users_is_rolled_back_on_its_error_ratio() {
    let (mut m, mut fx) = (machine(), Fake::new());
    release(&mut m, &mut fx, 1, WEB);
    release(&mut m, &mut fx, 2, WEB);
    // Looked at every 10 s: not before.
    fx.errors = Some(errors(200, 100, 200, 1));
    fx.advance(Duration::from_secs(5));
    m.step(vec![Event::Tick], &mut fx);
    assert!(fx.placed.is_empty());
    let due = m.next_deadline(fx.now).unwrap();
    fx.advance(due - fx.now);
    m.step(vec![Event::Tick], &mut fx);
    assert_eq!(fx.placed, ["sha-1"]);
    let r = rolling_back(&m).unwrap();
    assert!(
        r.reason.contains("100 of its 200 requests failed"),
        "{}",
        r.reason
    );
}

#[test]
fn too_few_requests_or_no_worse_than_before_roll_nothing_back() {
    for e in [
        // Below rollback-min-requests (100).
        errors(99, 99, 1000, 0),
        // Under 5 %.
        errors(1000, 40, 1000, 0),
        // 10 %, but not twice the predecessor's 6 %.
        errors(1000, 100, 1000, 60),
    ] {
        let (mut m, mut fx) = (machine(), Fake::new());
        release(&mut m, &mut fx, 1, WEB);
        release(&mut m, &mut fx, 2, WEB);
        fx.errors = Some(e);
        for _ in 0..10 {
            fx.advance(Duration::from_secs(10));
            m.step(vec![Event::Tick], &mut fx);
        }
        assert!(fx.placed.is_empty(), "rolled back on {e:?}");
    }
}

#[test]
fn an_apps_own_keep_releases_bounds_its_list() {
    let (mut m, mut fx) = (machine(), Fake::new());
    let yaml = format!("keep-releases: 1\n{WEB}");
    release(&mut m, &mut fx, 1, &yaml);
    release(&mut m, &mut fx, 2, &yaml);
    let numbers: Vec<u64> = releases(&fx).releases.iter().map(|r| r.number).collect();
    assert_eq!(numbers, [2], "the fake's global keep-releases is 3");
}

#[test]
fn a_rollback_whose_deploy_fails_leaves_the_release_serving_and_says_so() {
    let (mut m, mut fx) = (machine(), Fake::new());
    release(&mut m, &mut fx, 1, WEB);
    let bad = release(&mut m, &mut fx, 2, WEB);
    for _ in 0..3 {
        crash(&mut m, &mut fx, bad);
    }
    assert!(rolling_back(&m).is_some());
    let id = fx.prepares.last().unwrap().id;
    m.step(
        vec![Event::Prepared {
            id,
            result: Err(DeployError::Config(crate::problem::Invalid(Vec::new()))),
        }],
        &mut fx,
    );
    assert!(matches!(m.life, Life::Serving(ref v) if v.id == bad));
    assert_eq!(
        m.report(0, fx.wall).auto_rollback.map(|r| r.state),
        Some("failed")
    );
    assert!(m.watch.is_none(), "not tried again");
}
