//! The worker's part of taking over and handing over: its record, freezing for an in-place
//! upgrade, and a version taken over that must be replaced.

use super::*;
use crate::app::record::{AppRecord, ProcRecordState, Standing};

#[test]
fn the_record_says_what_serves_and_what_retires_and_reads_back() {
    let (mut m, mut fx) = (machine(), Fake::new());
    let v1 = serve(&mut m, &mut fx, 1, WEB_AND_WORKER);
    let v2 = serve(&mut m, &mut fx, 2, WEB);
    let record = m.to_record();
    let standing: Vec<(u64, Standing)> =
        record.versions.iter().map(|v| (v.id, v.standing)).collect();
    assert_eq!(
        standing,
        [(v2, Standing::Serving), (v1, Standing::Retiring)]
    );
    let web = &record.versions[0].procs[0];
    assert_eq!(
        web.state,
        ProcRecordState::Running {
            pid: pid_of(&fx, v2, 0),
            ticks: pid_of(&fx, v2, 0) as u64,
            output: 0
        }
    );
    assert_eq!(record.versions[0].config, WEB);
    assert_eq!(record.deploys, 2);
    let json = serde_json::to_string(&record).unwrap();
    let back: AppRecord = serde_json::from_str(&json).unwrap();
    assert_eq!(back, record);
    assert_eq!(
        back.last_deploy.unwrap().report(),
        m.last_deploy.clone().unwrap()
    );
}

#[test]
fn a_restart_that_is_due_is_recorded_on_the_monotonic_clock() {
    let (mut m, mut fx) = (machine(), Fake::new());
    let v = serve(&mut m, &mut fx, 1, WEB);
    let pid = pid_of(&fx, v, 0);
    m.on(
        Event::Exited {
            version: v,
            proc: 0,
            pid,
            status: exit_code(1),
        },
        &mut fx,
    );
    let record = m.to_record();
    let ProcRecordState::Backoff { until } = record.versions[0].procs[0].state else {
        panic!("{:?}", record.versions[0].procs[0].state);
    };
    assert_eq!(until.instant(), fx.now + Duration::from_millis(100));
}

#[test]
fn freezing_stops_a_candidate_waiting_for_readiness_and_the_thaw_deploys_it_again() {
    let (mut m, mut fx) = (machine(), Fake::new());
    let v1 = serve(&mut m, &mut fx, 1, WEB);
    let v2 = to_readiness(&mut m, &mut fx, 2);
    m.freeze(&mut fx);
    assert!(!m.quiet(), "the candidate's stop must be waited for");
    settle(&mut m, &mut fx);
    assert!(m.quiet());
    assert!(fx.discarded.contains(&v2));
    assert!(fx.cancelled.contains(&v2));
    let record = m.to_record();
    assert_eq!(record.versions.len(), 1);
    assert_eq!(record.versions[0].id, v1);
    // Nothing new starts while frozen; the newest command is held.
    let prepares = fx.prepares.len();
    deploy_while_frozen(&mut m, &mut fx, 3);
    assert_eq!(fx.prepares.len(), prepares);
    m.thaw(&mut fx);
    assert_eq!(fx.prepares.len(), prepares + 1);
    let third = fx.bundle(3);
    assert_eq!(fx.prepares.last().unwrap().path, third);
}

fn deploy_while_frozen(m: &mut Machine, fx: &mut Fake, n: u64) {
    let path = fx.bundle(n);
    m.hold(Command::Deploy { path, retry: false });
}

#[test]
fn freezing_drops_an_unpack_and_waits_for_a_switch() {
    let (mut m, mut fx) = (machine(), Fake::new());
    let v1 = serve(&mut m, &mut fx, 1, WEB);
    // An unpack in flight is left to itself; its result is discarded when it comes.
    deploy(&mut m, &mut fx, 2);
    let unpacking = fx.prepares.last().unwrap().id;
    m.freeze(&mut fx);
    assert!(m.quiet());
    m.on(
        Event::Prepared {
            id: unpacking,
            result: Ok(Prepared::Version(Box::new(version(unpacking, 2, WEB)))),
        },
        &mut fx,
    );
    assert!(fx.discarded.contains(&unpacking));
    assert!(matches!(&m.life, Life::Serving(v) if v.id == v1));
    m.thaw(&mut fx);
    // The thaw starts it again; now a switch is in flight when the next freeze comes.
    let v2 = fx.prepares.last().unwrap().id;
    assert_ne!(v2, unpacking);
    m.on(
        Event::Prepared {
            id: v2,
            result: Ok(Prepared::Version(Box::new(version(v2, 2, WEB)))),
        },
        &mut fx,
    );
    m.on(
        Event::Ready {
            version: v2,
            result: Ok(()),
        },
        &mut fx,
    );
    m.freeze(&mut fx);
    assert!(!m.quiet(), "a switch in flight must be waited for");
    m.on(
        Event::Switched {
            version: v2,
            result: Ok(()),
        },
        &mut fx,
    );
    settle(&mut m, &mut fx);
    assert!(m.quiet());
    let record = m.to_record();
    assert_eq!(record.versions[0].id, v2);
    assert_eq!(record.versions[0].standing, Standing::Serving);
}

#[test]
fn a_version_taken_over_that_must_be_replaced_is_deployed_again_from_the_same_file() {
    let (mut m, mut fx) = (machine(), Fake::new());
    serve(&mut m, &mut fx, 1, WEB);
    // The same file again is nothing to do ...
    let prepares = fx.prepares.len();
    deploy(&mut m, &mut fx, 1);
    assert_eq!(fx.prepares.len(), prepares);
    // ... unless the version serving it cannot stay: then even its content is deployed
    // again, and the replacement, once switched, retires it.
    m.replace = true;
    deploy(&mut m, &mut fx, 1);
    assert_eq!(fx.prepares.len(), prepares + 1);
    let job = fx.prepares.last().unwrap();
    assert_eq!(job.serving_sha256, None);
    let id = job.id;
    m.on(
        Event::Prepared {
            id,
            result: Ok(Prepared::Version(Box::new(version(id, 1, WEB)))),
        },
        &mut fx,
    );
    m.on(
        Event::Ready {
            version: id,
            result: Ok(()),
        },
        &mut fx,
    );
    m.on(
        Event::Switched {
            version: id,
            result: Ok(()),
        },
        &mut fx,
    );
    assert!(!m.replace);
    assert_eq!(m.retiring.len(), 1);
}
