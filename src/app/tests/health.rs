//! Health while serving (README "Supervision"; `health.rs`): a webapp that fails its health
//! check `health-check-failures` times in a row is replaced by a fresh process of the same
//! version on a new port, Nginx switched to it, then the hung one stopped; a fresh process
//! that is not ready leaves the hung one in service and is tried again with backoff; nothing
//! counts during a deploy, a freeze, or when keter itself was late.

use super::*;

const SECOND: Duration = Duration::from_secs(1);

/// The fake world with the default checks: every 10 s, 3 failures, 5 s each.
fn fake() -> Fake {
    let mut fx = Fake::new();
    fx.health = crate::config::HealthChecks::default();
    fx
}

/// The serving version's process `i`.
fn proc_of(m: &Machine, i: usize) -> &Proc {
    &m.serving().expect("a version serves").procs[i]
}

/// Moves the clock to the next check and ticks: the check started, as the machine asked.
fn start_check(m: &mut Machine, fx: &mut Fake) -> HealthCheck {
    let due = m.next_deadline(fx.now).expect("a check is due some time");
    if due > fx.now {
        fx.advance(due - fx.now);
    }
    let before = fx.checks.len();
    m.tick(fx);
    assert_eq!(fx.checks.len(), before + 1, "no check started at its time");
    fx.checks.last().unwrap().clone()
}

/// Check `c` comes back after `took`, having started at `started`.
fn finish(
    m: &mut Machine,
    fx: &mut Fake,
    c: &HealthCheck,
    started: Instant,
    result: Result<(), CheckFailure>,
) {
    let outcome = Outcome {
        started,
        finished: fx.now,
        result,
        ran: true,
    };
    m.step(
        vec![Event::Checked {
            version: c.version,
            proc: c.proc,
            seq: c.seq,
            outcome,
        }],
        fx,
    );
}

/// One check that times out (5 s, the default timeout), started on time.
fn time_out(m: &mut Machine, fx: &mut Fake) {
    let c = start_check(m, fx);
    let started = fx.now;
    fx.advance(c.timeout);
    finish(
        m,
        fx,
        &c,
        started,
        Err(CheckFailure::TimedOut { timeout: c.timeout }),
    );
}

/// One check that answers on time.
fn answer(m: &mut Machine, fx: &mut Fake) {
    let c = start_check(m, fx);
    let started = fx.now;
    fx.advance(Duration::from_millis(3));
    finish(m, fx, &c, started, Ok(()));
}

/// Serves WEB and makes it fail three checks in a row: a fresh process is started.
fn to_replacement(m: &mut Machine, fx: &mut Fake) -> (u64, i32) {
    let v = serve(m, fx, 1, WEB);
    m.tick(fx);
    let hung = pid_of(fx, v, 0);
    answer(m, fx);
    assert_eq!(proc_of(m, 0).health.state(), "healthy");
    time_out(m, fx);
    time_out(m, fx);
    assert_eq!(proc_of(m, 0).health.state(), "failing");
    assert_eq!(fx.spawned.len(), 1, "replaced before the third failure");
    time_out(m, fx);
    (v, hung)
}

#[test]
fn an_unhealthy_webapp_is_replaced_switched_to_and_then_stopped() {
    let (mut m, mut fx) = (machine(), fake());
    let (v, hung) = to_replacement(&mut m, &mut fx);
    // A fresh process of the same version on a new port, with its readiness check.
    let fresh = pid_of(&fx, v, 0);
    assert_ne!(fresh, hung);
    assert_eq!(fx.spawned_port.last().unwrap().as_deref(), Some("5000"));
    let (rid, checks) = fx.readiness.last().unwrap().clone();
    assert_eq!((checks[0].port, checks[0].pid), (5000, fresh));
    // Until it is ready the hung one serves, and nothing was switched or stopped.
    assert_eq!(proc_of(&m, 0).running().unwrap().pid, hung);
    assert!(fx.refreshed.is_empty() && fx.stopped_pids.is_empty());
    let report = m.report(0, fx.wall);
    assert_eq!(report.processes[0].health, Some("replacing"));
    assert_eq!(report.processes[0].health_failures, 3);
    assert!(m.last_error.as_deref().unwrap().contains(&format!(
        "webapp 0 (pid {hung}, port 4001) failed 3 health checks in a row (timed out after 5 s); replacing it"
    )));
    // Ready: Nginx routes to the new port, then the hung one is stopped (a stage).
    m.step(
        vec![Event::Ready {
            version: rid,
            result: Ok(()),
        }],
        &mut fx,
    );
    assert_eq!(fx.refreshed_ports.last().unwrap(), &vec![(0, 5000)]);
    assert!(
        fx.stopped_pids.is_empty(),
        "the hung process was stopped before Nginx answered"
    );
    assert_eq!(
        m.report(0, fx.wall).processes[0].health,
        Some("replacing"),
        "reported replaced before Nginx routes to the fresh one"
    );
    settle(&mut m, &mut fx);
    assert_eq!(fx.stopped_pids, [hung]);
    assert_eq!(m.report(0, fx.wall).processes[0].health, Some("unchecked"));
    assert!(fx.released.contains(&4001));
    let p = proc_of(&m, 0);
    assert_eq!(p.running().unwrap().pid, fresh);
    assert_eq!(p.port(), Some(5000));
    assert_eq!(fx.replaced, 1);
    let report = m.report(0, fx.wall);
    assert_eq!(report.processes[0].health, Some("unchecked"));
    assert_eq!(report.processes[0].health_replacements, 1);
    assert_eq!(report.processes[0].port, Some(5000));
    // The hung one's exit, when its stop ends it, restarts nothing.
    m.on(
        Event::Exited {
            version: v,
            proc: 0,
            pid: hung,
            status: Some(ExitStatus::from_raw(9)),
        },
        &mut fx,
    );
    settle(&mut m, &mut fx);
    assert_eq!(proc_of(&m, 0).running().unwrap().pid, fresh);
    assert_eq!(fx.restarted, 0);
    // The new process is checked in turn.
    answer(&mut m, &mut fx);
    assert_eq!(fx.checks.last().unwrap().port, 5000);
    assert_eq!(proc_of(&m, 0).health.state(), "healthy");
}

#[test]
fn the_hung_webapp_serves_on_until_nginx_takes_the_switch_to_the_fresh_one() {
    let (mut m, mut fx) = (machine(), fake());
    let (v, hung) = to_replacement(&mut m, &mut fx);
    let fresh = pid_of(&fx, v, 0);
    let (rid, _) = fx.readiness.last().unwrap().clone();
    // Ready, but Nginx does not take the site with the fresh one's port: it still routes to
    // the hung one's, which serves on, its port held.
    fx.failing_refreshes = 1;
    m.step(
        vec![Event::Ready {
            version: rid,
            result: Ok(()),
        }],
        &mut fx,
    );
    assert_eq!(fx.refreshed_ports, [vec![(0, 5000)]]);
    settle(&mut m, &mut fx);
    assert!(
        fx.stopped_pids.is_empty(),
        "the hung process was stopped while Nginx routes to it"
    );
    assert!(!fx.released.contains(&4001));
    assert_eq!(proc_of(&m, 0).running().unwrap().pid, fresh);
    // The reroute is tried again after REROUTE_RETRY; once Nginx has it, the hung one goes.
    fx.advance(super::super::machine::REROUTE_RETRY - Duration::from_millis(1));
    m.tick(&mut fx);
    assert_eq!(fx.refreshed_ports.len(), 1, "tried again too soon");
    assert!(fx.stopped_pids.is_empty());
    fx.advance(Duration::from_millis(1));
    m.tick(&mut fx);
    assert_eq!(fx.refreshed_ports, [vec![(0, 5000)], vec![(0, 5000)]]);
    settle(&mut m, &mut fx);
    assert_eq!(fx.stopped_pids, [hung]);
    assert!(fx.released.contains(&4001));
}

#[test]
fn a_hung_webapp_that_exits_before_the_reroute_is_forgotten_and_a_stop_stops_it_otherwise() {
    let (mut m, mut fx) = (machine(), fake());
    let (v, hung) = to_replacement(&mut m, &mut fx);
    let (rid, _) = fx.readiness.last().unwrap().clone();
    fx.failing_refreshes = 1;
    m.step(
        vec![Event::Ready {
            version: rid,
            result: Ok(()),
        }],
        &mut fx,
    );
    settle(&mut m, &mut fx);
    // It exits by itself: its group is reaped, its port given back, and nothing is left
    // to stop once the reroute succeeds.
    m.step(
        vec![Event::Exited {
            version: v,
            proc: 0,
            pid: hung,
            status: Some(ExitStatus::from_raw(9)),
        }],
        &mut fx,
    );
    assert!(fx.reaped.contains(&hung));
    assert!(fx.released.contains(&4001));
    assert!(proc_of(&m, 0).health.superseded.is_empty());
    assert_eq!(fx.restarted, 0);
    fx.advance(super::super::machine::REROUTE_RETRY);
    m.tick(&mut fx);
    assert_eq!(fx.refreshed_ports.len(), 2);
    assert!(fx.stopped_pids.is_empty());

    // Another app: the hung one still waits for the reroute when the app stops; it is
    // stopped with its version (whose stop stage knows only its running processes).
    let (mut m, mut fx) = (machine(), fake());
    let (_, hung) = to_replacement(&mut m, &mut fx);
    let (rid, _) = fx.readiness.last().unwrap().clone();
    fx.failing_refreshes = 1;
    m.step(
        vec![Event::Ready {
            version: rid,
            result: Ok(()),
        }],
        &mut fx,
    );
    m.step(vec![Event::Command(Command::Stop)], &mut fx);
    settle(&mut m, &mut fx);
    assert_eq!(fx.stopped_pids, [hung]);
    assert!(fx.released.contains(&4001));
}

#[test]
fn a_fresh_process_that_is_not_ready_leaves_the_hung_one_and_is_retried_with_backoff() {
    let (mut m, mut fx) = (machine(), fake());
    let (v, hung) = to_replacement(&mut m, &mut fx);
    let fresh = pid_of(&fx, v, 0);
    let (rid, _) = fx.readiness.last().unwrap().clone();
    m.step(
        vec![Event::Ready {
            version: rid,
            result: Err(DeployError::NotReady(super::super::NotReady::Timeout {
                timeout: Duration::from_secs(90),
                last: String::new(),
                output: String::new(),
            })),
        }],
        &mut fx,
    );
    // The fresh one is stopped and its port given back; the hung one stays in service.
    assert_eq!(fx.stopped_pids, [fresh]);
    assert!(fx.released.contains(&5000));
    assert!(fx.refreshed.is_empty());
    assert_eq!(proc_of(&m, 0).running().unwrap().pid, hung);
    assert_eq!(m.report(0, fx.wall).processes[0].health, Some("unhealthy"));
    assert!(
        m.last_error
            .as_deref()
            .unwrap()
            .contains("tried again in 10 s")
    );
    // Tried again after 10 s...
    fx.advance(9 * SECOND);
    m.tick(&mut fx);
    assert_eq!(fx.spawned.len(), 2, "tried again before its backoff");
    fx.advance(SECOND);
    m.tick(&mut fx);
    assert_eq!(fx.spawned.len(), 3, "not tried again after its backoff");
    // ... and that one exits before it is ready: next time after 20 s.
    let second = pid_of(&fx, v, 0);
    m.step(
        vec![Event::Exited {
            version: v,
            proc: 0,
            pid: second,
            status: exit_code(1),
        }],
        &mut fx,
    );
    assert_eq!(proc_of(&m, 0).running().unwrap().pid, hung);
    assert!(
        m.last_error
            .as_deref()
            .unwrap()
            .contains("tried again in 20 s")
    );
    assert_eq!(fx.restarted, 0);
    // The hung one recovers (the check that was due meanwhile answers): no more
    // replacements.
    assert!(proc_of(&m, 0).health.in_flight.is_some());
    let c = fx.checks.last().unwrap().clone();
    let started = fx.now;
    finish(&mut m, &mut fx, &c, started, Ok(()));
    assert_eq!(proc_of(&m, 0).health.state(), "healthy");
    fx.advance(60 * SECOND);
    m.tick(&mut fx);
    assert_eq!(fx.spawned.len(), 3, "a healthy process was replaced");
}

#[test]
fn nothing_is_checked_during_a_deploy_or_a_freeze() {
    let (mut m, mut fx) = (machine(), fake());
    serve(&mut m, &mut fx, 1, WEB);
    m.tick(&mut fx);
    // A check in flight when a deploy begins does not count.
    let c = start_check(&mut m, &mut fx);
    let started = fx.now;
    to_readiness(&mut m, &mut fx, 2);
    fx.advance(5 * SECOND);
    finish(
        &mut m,
        &mut fx,
        &c,
        started,
        Err(CheckFailure::TimedOut {
            timeout: Duration::from_secs(5),
        }),
    );
    assert_eq!(proc_of(&m, 0).health.failures, 0);
    // Nor is anything checked while it runs.
    let checks = fx.checks.len();
    for _ in 0..10 {
        fx.advance(10 * SECOND);
        m.tick(&mut fx);
    }
    assert_eq!(fx.checks.len(), checks, "checked during a deploy");
    assert_eq!(proc_of(&m, 0).health.next_at, None);
    // The deploy fails for good; checks come back one interval later.
    let (id, _) = fx.readiness.last().unwrap().clone();
    m.step(
        vec![Event::Ready {
            version: id,
            result: Err(DeployError::Config(crate::problem::Invalid(Vec::new()))),
        }],
        &mut fx,
    );
    settle(&mut m, &mut fx);
    m.tick(&mut fx);
    assert_eq!(proc_of(&m, 0).health.next_at, Some(fx.now + 10 * SECOND));
    // Frozen for an upgrade: nothing checked either.
    let (tx, _rx) = crossbeam_channel::bounded(1);
    m.step(vec![Event::Handover(Handover::Freeze(tx))], &mut fx);
    for _ in 0..10 {
        fx.advance(10 * SECOND);
        m.step(vec![Event::Tick], &mut fx);
    }
    assert_eq!(fx.checks.len(), checks, "checked while frozen");
    m.step(vec![Event::Handover(Handover::Thaw)], &mut fx);
    assert_eq!(proc_of(&m, 0).health.next_at, Some(fx.now + 10 * SECOND));
}

#[test]
fn a_deploy_stops_a_replacement_under_way() {
    let (mut m, mut fx) = (machine(), fake());
    let (v, hung) = to_replacement(&mut m, &mut fx);
    let fresh = pid_of(&fx, v, 0);
    let (rid, _) = fx.readiness.last().unwrap().clone();
    deploy(&mut m, &mut fx, 2);
    m.tick(&mut fx);
    assert_eq!(fx.stopped_pids, [fresh]);
    assert!(fx.cancelled.contains(&rid));
    // Its readiness, if it comes, is stale.
    m.step(
        vec![Event::Ready {
            version: rid,
            result: Ok(()),
        }],
        &mut fx,
    );
    assert_eq!(proc_of(&m, 0).running().unwrap().pid, hung);
    assert!(fx.refreshed.is_empty());
}

#[test]
fn checks_that_keter_ran_late_do_not_count() {
    let (mut m, mut fx) = (machine(), fake());
    serve(&mut m, &mut fx, 1, WEB);
    m.tick(&mut fx);
    for _ in 0..5 {
        // The worker's tick comes 6 s after the check was due (timeout 5 s): it fails, but
        // says more about keter than about the app.
        let due = m.next_deadline(fx.now).unwrap();
        fx.advance(due - fx.now + 6 * SECOND);
        m.tick(&mut fx);
        let c = fx.checks.last().unwrap().clone();
        let started = fx.now;
        fx.advance(5 * SECOND);
        finish(
            &mut m,
            &mut fx,
            &c,
            started,
            Err(CheckFailure::TimedOut {
                timeout: Duration::from_secs(5),
            }),
        );
        // A check on time whose timeout came 11 s after it started: its thread was not run.
        let c = start_check(&mut m, &mut fx);
        let started = fx.now;
        fx.advance(11 * SECOND);
        finish(
            &mut m,
            &mut fx,
            &c,
            started,
            Err(CheckFailure::TimedOut {
                timeout: Duration::from_secs(5),
            }),
        );
    }
    assert_eq!(proc_of(&m, 0).health.failures, 0);
    assert_eq!(fx.spawned.len(), 1, "replaced after late checks");
    // One on time counts.
    time_out(&mut m, &mut fx);
    assert_eq!(proc_of(&m, 0).health.failures, 1);
}

#[test]
fn an_interval_of_zero_turns_the_checks_off() {
    let (mut m, mut fx) = (machine(), fake());
    fx.health.interval = Duration::ZERO;
    serve(&mut m, &mut fx, 1, WEB);
    m.tick(&mut fx);
    assert_eq!(m.next_deadline(fx.now), None);
    // A stanza's own interval wins over the global one.
    let (mut m, mut fx) = (machine(), fake());
    serve(
        &mut m,
        &mut fx,
        1,
        "exec: ../dist/app\nhost: app.example.com\nhealth-check-interval: 0\n",
    );
    m.tick(&mut fx);
    assert_eq!(m.next_deadline(fx.now), None);
    assert_eq!(m.report(0, fx.wall).processes[0].health, Some("unchecked"));
}
