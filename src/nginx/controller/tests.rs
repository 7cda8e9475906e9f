//! Unit tests of the controller's planner (`plan.rs`) with a fake Nginx and a fake clock: what
//! it writes, tests, signals and starts is recorded, and each requester's answer checked. The
//! integration tests (`tests/integration/nginx.rs` and every test that deploys) drive the real
//! Nginx.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use super::plan::{Answer, Found, Plan, Request};
use super::{
    Actor, Answered, Change, Effects, Msg, NginxCounters, NginxError, NginxHandle, RenderError,
    Unconfirmed,
};
use crate::config::{NginxConfig, NginxMode};
use crate::names::AppName;
use crate::nginx::system::NotRunning;
use crate::nginx::{Site, SiteFile};

const RELOAD_TIMEOUT: Duration = Duration::from_secs(3);

/// Keter's files and an Nginx that loads them, as far as the planner can tell. `nginx -t`
/// refuses an app file that says `BROKEN`; a master loads the files in place when it starts
/// and at SIGHUP (unless `stuck`), and its worker answers the generation it loaded.
struct Fake {
    now: Instant,
    /// What is on disk: the app files, `generation.conf`, the main configuration's writes.
    apps: BTreeMap<AppName, String>,
    generation_file: u64,
    /// The generation the running master's workers loaded.
    loaded: u64,
    alive: BTreeSet<i32>,
    next_pid: i32,
    /// A master that does not act on SIGHUP.
    stuck: bool,
    /// Starts that fail from now on, counted down.
    failing_starts: usize,
    /// Apps whose worker files cannot be written.
    unwritable: BTreeSet<AppName>,
    /// A master an earlier keter left running.
    adoptable: Option<i32>,
    /// The master dies right after a SIGHUP, leaving its workers on the old generation.
    die_on_hup: bool,
    /// Nothing listens on the control socket (system mode: `http.conf` not included).
    no_socket: bool,
    /// Everything done to the world, in order: `test`, `hup PID`, `start PID`, `stop PID`,
    /// `write APP`, `remove APP`, `generation N`, `main`.
    log: Vec<String>,
    pruned: Vec<(AppName, Vec<String>)>,
}

impl Fake {
    fn new() -> Fake {
        Fake {
            now: Instant::now(),
            apps: BTreeMap::new(),
            generation_file: 1,
            loaded: 0,
            alive: BTreeSet::new(),
            next_pid: 100,
            stuck: false,
            failing_starts: 0,
            unwritable: BTreeSet::new(),
            adoptable: None,
            die_on_hup: false,
            no_socket: false,
            log: Vec::new(),
            pruned: Vec::new(),
        }
    }

    fn count(&self, what: &str) -> usize {
        self.log.iter().filter(|l| l.starts_with(what)).count()
    }

    fn take_log(&mut self) -> Vec<String> {
        std::mem::take(&mut self.log)
    }

    fn file(&self, app: &str) -> Option<&str> {
        self.apps.get(&name(app)).map(String::as_str)
    }
}

impl Effects for Fake {
    fn now(&self) -> Instant {
        self.now
    }
    fn sleep(&mut self, d: Duration) {
        self.now += d;
    }
    fn render(&self, site: &Site, generation: u64) -> Result<String, RenderError> {
        if site.bundle == "unrenderable" {
            return Err(RenderError::NoPasswordFile(site.app.clone()));
        }
        Ok(format!(
            "# deploy {} of this app, Nginx configuration generation {generation}\nserver {};\n",
            site.deploy, site.sha256
        ))
    }
    fn write_site_files(&mut self, app: &AppName, _files: &[SiteFile]) -> Result<(), NginxError> {
        if self.unwritable.contains(app) {
            return Err(NginxError::file(
                format!("/r/nginx/worker-files/apps/{app}"),
                std::io::Error::from_raw_os_error(libc::ENOSPC),
            ));
        }
        Ok(())
    }
    fn prune_site_files(&mut self, app: &AppName, keep: &[String]) {
        self.pruned.push((app.clone(), keep.to_vec()));
    }
    fn write_generation(&mut self, generation: u64) -> Result<(), NginxError> {
        self.generation_file = generation;
        self.log.push(format!("generation {generation}"));
        Ok(())
    }
    fn write_main(&mut self, _apps: &BTreeMap<AppName, String>) -> Result<bool, NginxError> {
        self.log.push("main".into());
        Ok(false)
    }
    fn write_app(&mut self, app: &AppName, text: &str) -> Result<(), NginxError> {
        self.apps.insert(app.clone(), text.to_string());
        self.log.push(format!("write {app}"));
        Ok(())
    }
    fn remove_app(&mut self, app: &AppName) -> Result<(), NginxError> {
        self.apps.remove(app);
        self.log.push(format!("remove {app}"));
        Ok(())
    }
    fn remove_all(&mut self) {
        self.apps.clear();
        self.log.push("remove all".into());
    }
    fn test(&mut self) -> Result<(), NginxError> {
        self.log.push("test".into());
        match self.apps.iter().find(|(_, text)| text.contains("BROKEN")) {
            Some((app, _)) => Err(NginxError::Rejected(format!(
                "unknown directive \"BROKEN\" in /r/nginx/apps/{app}.conf:2"
            ))),
            None => Ok(()),
        }
    }
    fn system_master(&self) -> Result<i32, NotRunning> {
        self.alive
            .first()
            .copied()
            .ok_or_else(|| NotRunning::Garbled(PathBuf::from("/run/nginx.pid")))
    }
    fn hangup(&mut self, pid: i32) -> Result<(), NginxError> {
        self.log.push(format!("hup {pid}"));
        if !self.alive.contains(&pid) {
            return Err(Unconfirmed::Signal {
                pid,
                source: nix::errno::Errno::ESRCH,
            }
            .into());
        }
        if self.die_on_hup {
            self.alive.remove(&pid);
        } else if !self.stuck {
            self.loaded = self.generation_file;
        }
        Ok(())
    }
    fn reopen_logs(&mut self, pid: i32) -> Result<(), NginxError> {
        self.log.push(format!("usr1 {pid}"));
        Ok(())
    }
    fn adopt_master(&mut self) -> Option<(i32, Duration)> {
        let pid = self.adoptable.take()?;
        self.alive.insert(pid);
        Some((pid, Duration::from_secs(600)))
    }
    fn start_master(&mut self) -> Result<i32, NginxError> {
        if self.failing_starts > 0 {
            self.failing_starts -= 1;
            self.log.push("start failed".into());
            return Err(Unconfirmed::Start {
                binary: "/usr/sbin/nginx".into(),
                source: Arc::new(std::io::Error::from_raw_os_error(libc::EADDRINUSE)),
            }
            .into());
        }
        let pid = self.next_pid;
        self.next_pid += 10;
        self.alive.insert(pid);
        self.loaded = self.generation_file;
        self.log.push(format!("start {pid}"));
        Ok(pid)
    }
    fn is_alive(&self, pid: i32) -> bool {
        self.alive.contains(&pid)
    }
    fn stop_group(&mut self, pid: i32, _timeout: Duration) {
        self.alive.remove(&pid);
        self.log.push(format!("stop {pid}"));
    }
    fn remove_control_socket(&mut self) {}
    fn ask_generation(&self) -> Result<(u64, i32), Answered> {
        match self.alive.last().filter(|_| !self.no_socket) {
            // Its worker's pid is the master's plus one.
            Some(master) => Ok((self.loaded, master + 1)),
            None => Err(Answered::Nothing(Arc::new(
                std::io::ErrorKind::ConnectionRefused.into(),
            ))),
        }
    }
    fn parent_of(&self, pid: i32) -> Option<i32> {
        Some(pid - 1).filter(|m| self.alive.contains(m))
    }
    fn control_socket_exists(&self) -> bool {
        !self.no_socket
    }
    fn http_conf(&self) -> PathBuf {
        "/r/nginx/http.conf".into()
    }
    fn accepting_workers(&self, master: i32) -> Vec<i32> {
        vec![master + 1]
    }
    fn wait_retired(&mut self, _old: &[i32]) {}
    fn share_with_workers(&mut self, _master: i32) {}
}

fn name(app: &str) -> AppName {
    AppName::new(app).unwrap()
}

/// A site whose file says `body` (`BROKEN` fails `nginx -t`).
fn site(app: &str, body: &str, deploy: u64) -> Site {
    Site {
        app: name(app),
        bundle: format!("{app}.keter"),
        sha256: body.into(),
        deploy,
        blocks: Vec::new(),
        files: vec![SiteFile::new(body.as_bytes().to_vec(), "htpasswd")],
        maintenance: None,
    }
}

fn set(app: &str, body: &str) -> Request {
    Request {
        app: name(app),
        site: Some(site(app, body, 1)),
        unless_same: false,
    }
}

fn remove(app: &str) -> Request {
    Request {
        app: name(app),
        site: None,
        unless_same: false,
    }
}

struct Setup {
    plan: Plan,
    fx: Fake,
    counters: Arc<NginxCounters>,
    master_pid: Arc<AtomicI32>,
}

fn plan(mode: NginxMode) -> Setup {
    let counters = Arc::new(NginxCounters::default());
    let master_pid = Arc::new(AtomicI32::new(0));
    let config = NginxConfig {
        mode,
        binary: "/usr/sbin/nginx".into(),
        pid_file: "/run/nginx.pid".into(),
        reload_timeout: RELOAD_TIMEOUT,
        user: None,
    };
    let plan = Plan::new(
        &config,
        Duration::from_secs(5),
        counters.clone(),
        master_pid.clone(),
    );
    Setup {
        plan,
        fx: Fake::new(),
        counters,
        master_pid,
    }
}

/// A managed Nginx started afresh, its start forgotten.
fn started() -> Setup {
    let mut s = plan(NginxMode::Managed);
    s.plan
        .start(&mut s.fx, found(BTreeMap::new(), true))
        .unwrap();
    s.fx.take_log();
    s
}

fn found(live: BTreeMap<AppName, String>, changed: bool) -> Found {
    Found {
        live,
        generation: 1,
        changed,
    }
}

fn generations(answers: &[(usize, Answer)]) -> Vec<(usize, Option<u64>)> {
    answers
        .iter()
        .map(|(i, a)| (*i, a.as_ref().ok().copied()))
        .collect()
}

#[test]
fn a_fresh_start_tests_the_files_and_starts_a_master_that_confirms() {
    let mut s = plan(NginxMode::Managed);
    s.plan
        .start(&mut s.fx, found(BTreeMap::new(), true))
        .unwrap();
    assert_eq!(s.fx.log, ["main", "test", "start 100"]);
    assert_eq!(s.master_pid.load(Ordering::Relaxed), 100);
}

#[test]
fn a_master_taken_over_with_nothing_changed_is_neither_tested_nor_reloaded() {
    let mut s = plan(NginxMode::Managed);
    s.fx.adoptable = Some(50);
    s.fx.loaded = 1;
    let live = BTreeMap::from([(name("a"), "server a;\n".to_string())]);
    s.plan.start(&mut s.fx, found(live.clone(), false)).unwrap();
    assert_eq!(s.fx.log, ["main"]);
    assert_eq!(s.plan.master(), Some(50));

    // Changed files: tested and loaded by the master taken over, at a new generation.
    let mut s = plan(NginxMode::Managed);
    s.fx.adoptable = Some(50);
    s.plan.start(&mut s.fx, found(live, true)).unwrap();
    assert_eq!(s.fx.log, ["main", "test", "generation 2", "hup 50"]);
    assert_eq!(s.fx.loaded, 2);
}

#[test]
fn a_master_taken_over_that_does_not_confirm_is_replaced() {
    let mut s = plan(NginxMode::Managed);
    s.fx.adoptable = Some(50);
    s.fx.stuck = true;
    s.plan
        .start(&mut s.fx, found(BTreeMap::new(), true))
        .unwrap();
    assert_eq!(
        s.fx.log,
        [
            "main",
            "test",
            "generation 2",
            "hup 50",
            "stop 50",
            "start 100"
        ]
    );
    assert_eq!(s.master_pid.load(Ordering::Relaxed), 100);
}

#[test]
fn concurrent_changes_share_one_test_and_one_reload() {
    let mut s = started();
    let answers = s.plan.apply(
        &mut s.fx,
        vec![set("a", "a1"), set("b", "b1"), set("c", "c1")],
    );
    assert_eq!(
        generations(&answers),
        [(0, Some(2)), (1, Some(2)), (2, Some(2))]
    );
    assert_eq!(
        s.fx.log,
        [
            "generation 2",
            "main",
            "write a",
            "write b",
            "write c",
            "test",
            "hup 100"
        ]
    );
    assert_eq!(s.counters.reloads.load(Ordering::Relaxed), 1);
    assert_eq!(s.fx.loaded, 2);
}

#[test]
fn a_batch_nginx_refuses_puts_back_only_the_bad_file_and_the_others_go_in() {
    let mut s = started();
    s.plan.apply(&mut s.fx, vec![set("b", "b1")]);
    s.fx.take_log();
    let answers = s.plan.apply(
        &mut s.fx,
        vec![set("a", "a1"), set("b", "BROKEN"), set("c", "c1")],
    );
    // The batch fails once, then each change is tried on its own, in order.
    assert_eq!(
        generations(&answers),
        [(0, Some(5)), (1, None), (2, Some(8))]
    );
    let Err(NginxError::Rejected(why)) = &answers[1].1 else {
        panic!("{:?}", answers[1]);
    };
    assert!(why.contains("b.conf"), "{why}");
    assert_eq!(s.fx.count("test"), 4);
    assert_eq!(s.fx.count("hup"), 2);
    assert_eq!(s.counters.test_failures.load(Ordering::Relaxed), 2);
    // b keeps its live file; a and c are live.
    assert!(s.fx.file("b").unwrap().contains("server b1;"));
    assert!(s.fx.file("a").unwrap().contains("server a1;"));
    assert!(s.fx.file("c").unwrap().contains("server c1;"));
    assert_eq!(s.fx.loaded, 8);
}

#[test]
fn a_reload_nginx_does_not_confirm_fails_after_the_timeout_and_restores_the_files() {
    let mut s = started();
    s.plan.apply(&mut s.fx, vec![set("a", "a1")]);
    s.fx.stuck = true;
    let t0 = s.fx.now;
    let answers = s
        .plan
        .apply(&mut s.fx, vec![set("a", "a2"), set("b", "b1")]);
    // The timeout, once for the new files and once for the previous ones put back.
    let waited = s.fx.now - t0;
    assert!(
        waited >= 2 * RELOAD_TIMEOUT && waited < 2 * RELOAD_TIMEOUT + Duration::from_millis(20),
        "{waited:?}"
    );
    for (_, a) in &answers {
        let Err(NginxError::Unconfirmed(Unconfirmed::Timeout {
            generation, last, ..
        })) = a
        else {
            panic!("{a:?}");
        };
        assert_eq!(*generation, 3);
        assert!(matches!(last, Answered::Older(2)), "{last}");
        assert!(a.as_ref().unwrap_err().transient());
    }
    assert_eq!(answers.len(), 2);
    // Not tried one at a time: the change is not at fault.
    assert_eq!(s.fx.count("test"), 2);
    assert!(s.fx.file("a").unwrap().contains("server a1;"));
    assert_eq!(s.fx.file("b"), None);
    assert_eq!(s.counters.reload_failures.load(Ordering::Relaxed), 1);

    // Nginx acts again: the next change goes in.
    s.fx.stuck = false;
    let answers = s.plan.apply(&mut s.fx, vec![set("b", "b1")]);
    assert!(answers[0].1.is_ok(), "{answers:?}");
}

#[test]
fn a_site_rendered_again_as_it_is_live_reloads_nothing() {
    let mut s = started();
    s.plan.apply(&mut s.fx, vec![set("a", "a1")]);
    s.fx.take_log();
    let same = Request {
        app: name("a"),
        site: Some(site("a", "a1", 7)),
        unless_same: true,
    };
    let answers = s.plan.apply(&mut s.fx, vec![same]);
    assert_eq!(generations(&answers), [(0, Some(2))]);
    assert!(s.fx.log.is_empty(), "{:?}", s.fx.log);
    assert_eq!(s.plan.generation(), 2);

    // Otherwise than live: it goes in.
    let other = Request {
        app: name("a"),
        site: Some(site("a", "a2", 7)),
        unless_same: true,
    };
    let answers = s.plan.apply(&mut s.fx, vec![other]);
    assert_eq!(generations(&answers), [(0, Some(3))]);
    assert_eq!(s.fx.count("hup"), 1);

    // The same text without `unless_same` (a certificate renewed into the same file) reloads.
    s.fx.take_log();
    let answers = s.plan.apply(&mut s.fx, vec![set("a", "a2")]);
    assert_eq!(generations(&answers), [(0, Some(4))]);
    assert_eq!(s.fx.count("hup"), 1);
}

#[test]
fn a_removed_site_leaves_nginx_and_one_nginx_did_not_take_goes_with_the_next_change() {
    let mut s = started();
    s.plan
        .apply(&mut s.fx, vec![set("a", "a1"), set("b", "b1")]);
    s.fx.take_log();
    let answers = s.plan.apply(&mut s.fx, vec![remove("a")]);
    assert_eq!(generations(&answers), [(0, Some(3))]);
    assert_eq!(
        s.fx.log,
        ["generation 3", "main", "remove a", "test", "hup 100"]
    );
    assert_eq!(s.fx.file("a"), None);
    assert!(s.fx.pruned.contains(&(name("a"), Vec::new())));

    // Nginx does not take b's removal: its file is back, and the next change takes it out.
    s.fx.stuck = true;
    let answers = s.plan.apply(&mut s.fx, vec![remove("b")]);
    assert!(answers[0].1.is_err());
    assert!(s.fx.file("b").is_some());
    s.fx.stuck = false;
    let answers = s.plan.apply(&mut s.fx, vec![set("c", "c1")]);
    assert!(answers[0].1.is_ok(), "{answers:?}");
    assert_eq!(s.fx.file("b"), None);
    assert!(s.fx.file("c").is_some());
}

#[test]
fn answers_come_as_decided_those_without_a_reload_first() {
    let mut s = started();
    s.fx.unwritable.insert(name("c"));
    let unrenderable = Request {
        app: name("b"),
        site: Some(Site {
            bundle: "unrenderable".into(),
            ..site("b", "b1", 1)
        }),
        unless_same: false,
    };
    let answers = s.plan.apply(
        &mut s.fx,
        vec![set("a", "a1"), unrenderable, set("c", "c1"), set("d", "d1")],
    );
    assert_eq!(
        generations(&answers),
        [(1, None), (2, None), (0, Some(2)), (3, Some(2))]
    );
    assert!(matches!(
        answers[0].1,
        Err(NginxError::Render(RenderError::NoPasswordFile(_)))
    ));
    assert!(!answers[0].1.as_ref().unwrap_err().transient());
    assert!(matches!(answers[1].1, Err(NginxError::File { .. })));
    assert_eq!(s.fx.file("b"), None);
    assert_eq!(s.fx.file("c"), None);
    assert_eq!(s.fx.count("hup"), 1);
}

#[test]
fn a_master_that_dies_is_restarted_with_backoff() {
    let mut s = started();
    s.fx.now += Duration::from_secs(1);
    s.fx.alive.remove(&100);
    s.plan.exited(&mut s.fx, 100, None);
    assert_eq!(s.master_pid.load(Ordering::Relaxed), 0);
    assert_eq!(s.fx.log, ["stop 100"]);
    assert_eq!(
        s.plan.restart_at(),
        Some(s.fx.now + Duration::from_millis(100))
    );
    // An exit of another process is not the master's.
    s.plan.exited(&mut s.fx, 555, None);
    assert_eq!(s.fx.log, ["stop 100"]);

    // The first restart fails: the next is later.
    s.fx.failing_starts = 1;
    s.fx.now += Duration::from_millis(100);
    s.plan.restart_master(&mut s.fx);
    assert_eq!(
        s.plan.restart_at(),
        Some(s.fx.now + Duration::from_millis(200))
    );
    s.fx.now += Duration::from_millis(200);
    s.plan.restart_master(&mut s.fx);
    assert_eq!(s.plan.restart_at(), None);
    assert_eq!(s.master_pid.load(Ordering::Relaxed), 110);
    assert_eq!(s.fx.log, ["stop 100", "start failed", "start 110"]);
}

#[test]
fn logs_are_reopened_by_the_running_master_and_by_none_while_it_is_down() {
    let mut s = started();
    s.plan.reopen_logs(&mut s.fx);
    assert_eq!(s.fx.take_log(), ["usr1 100"]);
    s.fx.alive.remove(&100);
    s.plan.exited(&mut s.fx, 100, None);
    s.fx.take_log();
    s.plan.reopen_logs(&mut s.fx);
    assert!(s.fx.log.is_empty(), "{:?}", s.fx.log);

    // System mode: the host's master.
    let mut s = plan(NginxMode::System);
    s.fx.alive.insert(7);
    s.plan.reopen_logs(&mut s.fx);
    assert_eq!(s.fx.log, ["usr1 7"]);
}

#[test]
fn a_change_while_the_master_is_down_starts_it_with_the_new_files() {
    let mut s = started();
    s.fx.alive.remove(&100);
    s.plan.exited(&mut s.fx, 100, None);
    s.fx.take_log();
    let answers = s.plan.apply(&mut s.fx, vec![set("a", "a1")]);
    assert_eq!(generations(&answers), [(0, Some(2))]);
    assert_eq!(
        s.fx.log,
        ["generation 2", "main", "write a", "test", "start 110"]
    );
    assert_eq!(s.plan.restart_at(), None);
}

#[test]
fn a_master_that_dies_during_a_reload_is_replaced_at_once() {
    let mut s = started();
    // SIGHUP reaches it, then it dies before its workers answer the new generation.
    s.fx.die_on_hup = true;
    let t0 = s.fx.now;
    let answers = s.plan.apply(&mut s.fx, vec![set("a", "a1")]);
    // Replaced at once, not after the reload timeout.
    assert!(s.fx.now - t0 < RELOAD_TIMEOUT, "{:?}", s.fx.now - t0);
    assert_eq!(generations(&answers), [(0, Some(2))]);
    assert_eq!(
        s.fx.log,
        [
            "generation 2",
            "main",
            "write a",
            "test",
            "hup 100",
            "stop 100",
            "start 110"
        ]
    );
    assert_eq!(s.master_pid.load(Ordering::Relaxed), 110);
}

#[test]
fn system_mode_names_the_missing_include_when_the_control_socket_is_absent() {
    let mut s = plan(NginxMode::System);
    s.fx.alive.insert(7);
    s.fx.loaded = 1;
    s.plan
        .start(&mut s.fx, found(BTreeMap::new(), false))
        .unwrap();
    // The host's master runs, but nothing answers on the control socket.
    s.fx.no_socket = true;
    let answers = s.plan.apply(&mut s.fx, vec![set("a", "a1")]);
    let Err(e) = &answers[0].1 else {
        panic!("{answers:?}")
    };
    assert!(e.to_string().contains("generation 2 not confirmed"), "{e}");
    assert!(
        e.to_string()
            .contains("is /r/nginx/http.conf included by Nginx's main configuration?"),
        "{e}"
    );
    assert_eq!(s.fx.file("a"), None);
    // No main configuration of keter's in system mode.
    assert_eq!(s.fx.count("main"), 0);
    // At exit keter's files leave the host's Nginx.
    s.fx.no_socket = false;
    s.fx.take_log();
    s.plan.stop(&mut s.fx);
    assert_eq!(s.fx.log, ["remove all", "test", "hup 7"]);
}

#[test]
fn the_thread_puts_every_waiting_request_into_one_reload_and_answers_each() {
    let s = started();
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut answers = Vec::new();
    for request in [set("a", "a1"), set("b", "BROKEN"), remove("c")] {
        let (reply, answer) = crossbeam_channel::bounded(1);
        tx.send(Msg::Apply(Change { request, reply })).unwrap();
        answers.push(answer);
    }
    // The master's exit, queued behind the requests, is seen before the batch is applied:
    // the batch starts a new master rather than signalling the dead one.
    tx.send(Msg::Exited {
        pid: 100,
        status: None,
    })
    .unwrap();
    tx.send(Msg::Shutdown).unwrap();
    let mut actor = Actor {
        plan: s.plan,
        world: s.fx,
    };
    actor.world.alive.remove(&100);
    actor.run(rx);
    let got: Vec<Option<u64>> = answers.iter().map(|a| a.try_recv().unwrap().ok()).collect();
    assert_eq!(got, [Some(4), None, Some(7)]);
    // One batch refused, then each change alone; the exit stopped the group; the shutdown
    // stopped the master started meanwhile.
    assert_eq!(actor.world.count("test"), 4);
    assert_eq!(
        actor.world.log.first().map(String::as_str),
        Some("stop 100")
    );
    assert_eq!(actor.world.log.last().map(String::as_str), Some("stop 110"));
    assert_eq!(actor.world.count("start"), 1);
}

#[test]
fn a_request_after_the_controller_stopped_is_answered_so() {
    let (tx, rx) = crossbeam_channel::unbounded();
    drop(rx);
    let handle = NginxHandle {
        tx,
        master_pid: Arc::new(AtomicI32::new(0)),
        mode: NginxMode::Managed,
        pid_file: "/run/nginx.pid".into(),
    };
    let e = handle.apply(&name("a"), None).unwrap_err();
    assert!(matches!(e, NginxError::Unconfirmed(Unconfirmed::Stopped)));
    assert_eq!(
        e.to_string(),
        "Nginx did not take the new configuration: the nginx controller has stopped"
    );
    assert_eq!(handle.master_pid(), None);
}
