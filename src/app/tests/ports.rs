//! A webapp's port taken by someone else while the webapp is down (README "Supervision"):
//! the webapp is never started on it again, moves to a fresh port of the pool, and the
//! serving site is rendered again with it; the old port goes back to the pool, which does not
//! hand it out while it is held.

use super::*;
use crate::app::record::ProcRecordState;

/// Someone else's listener, as the kernel would name it.
fn squatter() -> Holder {
    Holder {
        uid: Some(65538),
        user: Some("keter-other".into()),
        pid: Some(4242),
        command: Some("./squat".into()),
    }
}

/// The port of process `i` of the serving version.
fn port_of(m: &Machine, i: usize) -> u16 {
    let v = m.serving().expect("a version serves");
    match v.procs[i].role {
        Role::Web { port, .. } => port,
        Role::Background { .. } => panic!("process {i} is no webapp"),
    }
}

/// The webapp (process `i`) of version `v` exits.
fn crash(m: &mut Machine, fx: &mut Fake, v: u64, i: usize) {
    let pid = pid_of(fx, v, i);
    m.on(
        Event::Exited {
            version: v,
            proc: i,
            pid,
            status: Some(ExitStatus::from_raw(9)),
        },
        fx,
    );
    m.tick(fx);
}

#[test]
fn a_port_held_at_restart_moves_the_webapp_refreshes_the_site_and_is_not_handed_out_again() {
    let (mut m, mut fx) = (machine(), Fake::new());
    let v = serve(&mut m, &mut fx, 1, WEB);
    let old = port_of(&m, 0);
    crash(&mut m, &mut fx, v, 0);
    assert!(fx.refreshed.is_empty(), "a free port moved nothing");
    // Someone binds the port just before the restart is due (after keter last looked). A
    // look while the webapp waits is a quick one, and changes nothing to publish.
    fx.advance(Duration::from_millis(90));
    assert!(!m.tick(&mut fx), "a look at a free port changed something");
    assert_eq!(fx.port_checks.borrow().last(), Some(&(old, Look::Quick)));
    fx.held.insert(old, squatter());
    let spawned = fx.spawned.len();
    fx.advance(Duration::from_millis(10));
    assert!(m.tick(&mut fx));
    // The look just before the start is a full one.
    assert_eq!(fx.port_checks.borrow().last(), Some(&(old, Look::Full)));
    let new = port_of(&m, 0);
    assert_ne!(new, old, "restarted on a port someone else holds");
    assert_eq!(fx.released, [old], "the old port is given back to the pool");
    // The site routes to the new port, and it was rendered before the webapp started there.
    assert_eq!(fx.refreshed, [v]);
    assert_eq!(fx.refreshed_ports, [vec![(0, new)]]);
    assert_eq!(fx.spawned.len(), spawned + 1);
    assert_eq!(
        fx.spawned_port.last().unwrap().as_deref(),
        Some(&*new.to_string())
    );
    // Only the variables that carry the port changed.
    let Life::Serving(served) = &m.life else {
        panic!("not serving");
    };
    let env = &served.procs[0].spec.env;
    assert!(
        env.contains(&("YESOD_PORT".into(), new.to_string())),
        "{env:?}"
    );
    assert!(env.contains(&("SECRET".into(), old.to_string())), "{env:?}");
    assert!(!m.reroute_due);
    settle(&mut m, &mut fx);

    // Watched until its own process listens there, then no more looks at all.
    assert_eq!(m.next_deadline(fx.now), Some(fx.now + PORT_WATCH));
    fx.advance(PORT_WATCH);
    m.tick(&mut fx);
    assert_eq!(m.next_deadline(fx.now), Some(fx.now + PORT_WATCH));
    fx.listening.push(pid_of(&fx, v, 0));
    fx.advance(PORT_WATCH);
    m.tick(&mut fx);
    assert_eq!(
        m.next_deadline(fx.now),
        None,
        "a listening webapp is still polled"
    );

    // It crashes again while the first squatter still holds the old port and another takes
    // the new one at once: it moves again, never back to a port that is held.
    crash(&mut m, &mut fx, v, 0);
    fx.held.insert(new, squatter());
    fx.advance(PORT_WATCH);
    m.tick(&mut fx);
    let third = port_of(&m, 0);
    assert!(
        third != old && third != new,
        "moved to a held port: {third}"
    );
    assert_eq!(fx.released, [old, new]);
    assert_eq!(fx.refreshed_ports.last().unwrap(), &vec![(0, third)]);
    // The record says the new port, in the shape it always had.
    let record = m.to_record();
    assert_eq!(
        record.versions[0].procs[0].role,
        Role::Web {
            index: 0,
            port: third
        }
        .into()
    );
    let json = serde_json::to_value(&record.versions[0].procs[0]).unwrap();
    assert_eq!(json["role"]["web"]["port"], third, "{json}");
    assert!(matches!(
        record.versions[0].procs[0].state,
        ProcRecordState::Backoff { .. }
    ));
}

#[test]
fn a_restarted_webapp_beaten_to_its_port_is_stopped_and_started_on_a_new_one() {
    let (mut m, mut fx) = (machine(), Fake::new());
    let v = serve(&mut m, &mut fx, 1, WEB);
    let old = port_of(&m, 0);
    crash(&mut m, &mut fx, v, 0);
    fx.advance(Duration::from_millis(100));
    m.tick(&mut fx);
    let restarted = pid_of(&fx, v, 0);
    assert_eq!(
        fx.spawned_port.last().unwrap().as_deref(),
        Some(&*old.to_string())
    );
    // Between keter's look and the webapp's bind, someone else binds it.
    fx.held.insert(old, squatter());
    fx.advance(PORT_WATCH);
    m.tick(&mut fx);
    let new = port_of(&m, 0);
    assert_ne!(new, old);
    assert_eq!(fx.refreshed_ports, [vec![(0, new)]]);
    assert!(
        fx.reaped.contains(&restarted),
        "the beaten process still runs"
    );
    // Started again by the restart policy (its second failure in a row: 200 ms).
    assert_eq!(restart_at(&m, 0), fx.now + Duration::from_millis(200));
    // Its exit, reported late, changes nothing.
    m.on(
        Event::Exited {
            version: v,
            proc: 0,
            pid: restarted,
            status: exit_code(101),
        },
        &mut fx,
    );
    assert_eq!(restart_at(&m, 0), fx.now + Duration::from_millis(200));
    fx.advance(Duration::from_millis(200));
    m.tick(&mut fx);
    assert_eq!(
        fx.spawned_port.last().unwrap().as_deref(),
        Some(&*new.to_string())
    );
}

#[test]
fn a_moved_port_is_routed_at_once_during_a_deploy_and_after_a_switch_in_flight() {
    let (mut m, mut fx) = (machine(), Fake::new());
    let v1 = serve(&mut m, &mut fx, 1, WEB);
    // v2 waits for readiness: v1's site is rendered again and handed to Nginx at once.
    let v2 = to_readiness(&mut m, &mut fx, 2);
    let old = port_of(&m, 0);
    fx.held.insert(old, squatter());
    crash(&mut m, &mut fx, v1, 0);
    assert_eq!(fx.refreshed, [v1]);
    assert_eq!(fx.refreshed_ports, [vec![(0, port_of(&m, 0))]]);
    settle(&mut m, &mut fx);

    // v2 is being switched: v1 crashes and moves again, and its site is not written under
    // the switch. The switch fails: v1 serves on, and now its site is rendered again.
    m.on(
        Event::Ready {
            version: v2,
            result: Ok(()),
        },
        &mut fx,
    );
    fx.advance(Duration::from_secs(1));
    m.tick(&mut fx);
    let second = port_of(&m, 0);
    fx.held.insert(second, squatter());
    crash(&mut m, &mut fx, v1, 0);
    assert_ne!(port_of(&m, 0), second);
    assert_eq!(fx.refreshed, [v1], "a site was rendered during a switch");
    m.on(
        Event::Switched {
            version: v2,
            result: Err(DeployError::Nginx(NginxError::Rejected("bad".into()))),
        },
        &mut fx,
    );
    m.tick(&mut fx);
    assert_eq!(fx.refreshed, [v1, v1]);
    assert_eq!(
        fx.refreshed_ports.last().unwrap(),
        &vec![(0, port_of(&m, 0))]
    );
}

#[test]
fn with_no_free_port_the_site_leaves_nginx_until_a_port_is_free() {
    let (mut m, mut fx) = (machine(), Fake::new());
    let v = serve(&mut m, &mut fx, 1, WEB);
    let old = port_of(&m, 0);
    fx.pool_empty = true;
    fx.held.insert(old, squatter());
    crash(&mut m, &mut fx, v, 0);
    assert_eq!(fx.removed_site, 1, "Nginx still routes to the held port");
    settle(&mut m, &mut fx);
    let spawned = fx.spawned.len();
    // No restart on the held port; the pool is asked again when the restart is due, not at
    // every look.
    let at = restart_at(&m, 0);
    fx.now = at;
    m.tick(&mut fx);
    assert_eq!(fx.spawned.len(), spawned);
    assert_eq!(fx.removed_site, 1);
    fx.pool_empty = false;
    fx.now = restart_at(&m, 0);
    m.tick(&mut fx);
    let new = port_of(&m, 0);
    assert_ne!(new, old);
    assert_eq!(fx.refreshed_ports, [vec![(0, new)]], "the site is not back");
    assert_eq!(fx.spawned.len(), spawned + 1);
}

#[test]
fn nothing_moves_during_a_handover_and_the_thaw_moves_it() {
    let (mut m, mut fx) = (machine(), Fake::new());
    let v = serve(&mut m, &mut fx, 1, WEB);
    let old = port_of(&m, 0);
    m.freeze(&mut fx);
    fx.held.insert(old, squatter());
    crash(&mut m, &mut fx, v, 0);
    let spawned = fx.spawned.len();
    for _ in 0..10 {
        fx.advance(PORT_WATCH);
        m.tick(&mut fx);
    }
    assert_eq!(port_of(&m, 0), old);
    assert_eq!(fx.spawned.len(), spawned, "started on a held port");
    assert!(fx.refreshed.is_empty() && fx.acquired.is_empty());
    m.thaw(&mut fx);
    fx.advance(PORT_WATCH);
    m.tick(&mut fx);
    assert_ne!(port_of(&m, 0), old);
    assert_eq!(fx.refreshed, [v]);
    assert_eq!(fx.spawned.len(), spawned + 1);
}
