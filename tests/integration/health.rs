//! Health while serving (README "Supervision"): a webapp that stops answering without exiting
//! (it hangs after some requests, or is stopped with SIGSTOP) is replaced by a fresh process
//! of the same version on a new port, Nginx switched to it, then the hung one stopped. Short
//! intervals from the config keep each test to a few seconds.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::support::*;

const HOST: &str = "hello.example.com";
const WAIT: Duration = Duration::from_secs(30);

/// A daemon that checks every 0.3 s, replaces after 2 failures of 0.5 s each, and gives a
/// stopped process 1 s before SIGKILL.
fn keter(label: &str) -> Keter {
    Keter::start_with(
        label,
        Opts {
            stop_timeout: 1.0,
            extra:
                "health-check-interval: 0.3\nhealth-check-failures: 2\nhealth-check-timeout: 0.5\n"
                    .into(),
            ..Opts::default()
        },
    )
}

/// Waits until the app's webapp is another process than `old`; returns its status then.
/// Waits until the status API reports pid `old` replaced: another pid in its place, and
/// Nginx routing to it (no longer `replacing`).
fn wait_replaced(k: &Keter, old: i32) -> AppStatus {
    k.wait_app("hello", &format!("pid {old} replaced"), WAIT, |s| {
        s.pids().first().is_some_and(|p| *p != old)
            && s.processes[0].health.as_deref() != Some("replacing")
    })
}

/// One request of the client: when it was sent, and what came back (`None`: no answer).
struct Sent {
    at: Instant,
    answer: Option<(u16, String)>,
}

#[test]
fn a_hung_app_is_replaced_and_only_requests_sent_to_it_before_the_switch_fail() {
    let k = keter("health-hang");
    // It answers 12 requests (its readiness check and the health checks among them), then
    // hangs.
    k.deploy_hello("hello", "v1", HOST, &["--hang-after", "12"]);
    let status = k.wait_serving("hello", WAIT);
    let (hung, port) = (status.pids()[0], status.processes[0].port);
    // A client sends a request every 50 ms, each on its own connection, across the hang and
    // the replacement.
    let sent: Arc<Mutex<Vec<Sent>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let (sent, stop, addr) = (sent.clone(), stop.clone(), k.addr());
        std::thread::spawn(move || {
            let mut requests = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let sent = sent.clone();
                requests.push(std::thread::spawn(move || {
                    let at = Instant::now();
                    let answer = keter::probe::get_tcp(addr, HOST, "/pid", Duration::from_secs(20))
                        .ok()
                        .map(|r| (r.status, r.body.trim().to_string()));
                    sent.lock().unwrap().push(Sent { at, answer });
                }));
                std::thread::sleep(Duration::from_millis(50));
            }
            for r in requests {
                r.join().unwrap();
            }
        })
    };
    let status = wait_replaced(&k, hung);
    let switched = Instant::now();
    let fresh = status.pids()[0];
    assert_ne!(status.processes[0].port, port, "{status:?}");
    assert_eq!(status.processes[0].health_replacements, 1, "{status:?}");
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    client.join().unwrap();
    // The hung one is stopped (its requests end with it); the fresh one serves.
    assert!(
        wait_gone(hung, Duration::from_secs(5)),
        "pid {hung} still runs"
    );
    let sent = sent.lock().unwrap();
    // Nginx's workers from before the reload may still accept a connection for a moment
    // after it (`Keter::wait_for`); those are the hung process's too.
    let settle = Duration::from_millis(300);
    let failed: Vec<&Sent> = sent
        .iter()
        .filter(|s| s.answer.as_ref().is_none_or(|(st, _)| *st != 200))
        .collect();
    assert!(!failed.is_empty(), "the app never hung");
    for s in &failed {
        assert!(
            s.at < switched,
            "a request sent {:?} after the switch failed: {:?}\n{}",
            s.at - switched,
            s.answer,
            k.log()
        );
    }
    let after: Vec<&Sent> = sent.iter().filter(|s| s.at > switched + settle).collect();
    assert!(after.len() > 20, "too few requests after the switch");
    for s in after {
        assert_eq!(
            s.answer,
            Some((200, fresh.to_string())),
            "a request after the switch"
        );
    }
    let log = k.log();
    assert!(
        log.contains(&format!(
            "hello: webapp 0 (pid {hung}, port {}) failed 2 health checks in a row (timed out after 0.5 s); replacing it",
            port.unwrap()
        )),
        "{log}"
    );
    assert_eq!(k.wait_state("hello", "running", WAIT).restarts, 0);
}

#[test]
fn a_stopped_webapp_is_replaced_the_same_way() {
    let k = keter("health-sigstop");
    k.deploy_hello("hello", "v1", HOST, &[]);
    k.wait_for(HOST, "v1", WAIT);
    let status = k.wait_app("hello", "a healthy webapp", WAIT, |s| {
        s.processes[0].health.as_deref() == Some("healthy")
    });
    assert!(
        status.processes[0].health_latency_ms.is_some(),
        "{status:?}"
    );
    let stopped = k.pid_of(HOST);
    kill(Pid::from_raw(stopped), Signal::SIGSTOP).unwrap();
    let began = Instant::now();
    let status = wait_replaced(&k, stopped);
    let fresh = status.pids()[0];
    k.wait_for(HOST, "v1", WAIT);
    eprintln!("SIGSTOP to serving again: {:?}", began.elapsed());
    assert_eq!(k.pid_of(HOST), fresh);
    // Stopped by a stage once Nginx routes to the fresh one (its group is sent SIGCONT with
    // the SIGTERM, SIGKILL at stop-timeout).
    assert!(
        wait_gone(stopped, Duration::from_secs(10)),
        "pid {stopped} still runs"
    );
    k.wait_log(&format!("stopped pid {stopped} (replaced)"), WAIT);
    let log = k.log();
    let switched = log.find("Nginx routes to ports").expect("no switch logged");
    let stop = log.find(&format!("stopped pid {stopped}")).unwrap();
    assert!(switched < stop, "stopped before the switch:\n{log}");
}
