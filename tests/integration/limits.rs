//! Limits and accounting (README "Limits and accounting"): each app version in its own control
//! groups, held to its `memory-limit` and `tasks-limit` by the kernel, its costs in the status
//! API, and removed with every process in it. These run on the development machines' hybrid
//! layout (v1 controllers, a cgroup2 tree without controllers) as on cgroup v2; the package
//! test runs the memory case under a booted systemd (`scripts/test-package`).

use std::fs;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(30);

/// Pids whose command line is exactly `argv`.
fn pids_running(argv: &[&str]) -> Vec<i32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .collect();
        if args.len() == argv.len() && args.iter().zip(argv).all(|(a, b)| *a == b.as_bytes()) {
            out.push(pid);
        }
    }
    out
}

/// The first pid running `argv`, waited for.
fn wait_running(argv: &[&str]) -> i32 {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(pid) = pids_running(argv).first() {
            return *pid;
        }
        assert!(Instant::now() < deadline, "{argv:?} never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The cgroup2 path of `pid` (`0::/...`).
fn cgroup_v2_of(pid: i32) -> String {
    fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        .unwrap()
}

/// `usage.KEY` of app `app` in the status API.
fn usage(k: &Keter, app: &str, key: &str) -> serde_json::Value {
    k.app_json(app).unwrap()["usage"][key].clone()
}

/// An app whose process calls `setsid()` into a session of its own: before, that process
/// outlived the app's deletion (it left the app's process group, which keter stops). Its
/// control group holds it through a crash of keter and the takeover after it, and goes with
/// the app.
#[test]
fn a_setsid_child_goes_with_its_app_even_after_a_takeover() {
    let mut k = Keter::start("limits-setsid");
    k.deploy_hello("hello", "v1", "hello.example.com", &["--setsid-child"]);
    k.wait_for("hello.example.com", "v1", WAIT);
    let app = k.pid_of("hello.example.com");
    let argv = ["sleep".to_string(), format!("3600.{app}")];
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let child = wait_running(&argv);
    assert_ne!(
        nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(child))).unwrap(),
        nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(app))).unwrap(),
        "the child should have a session of its own"
    );
    let group = cgroup_v2_of(app);
    let base = cgroup_of(&k.dir.0);
    assert!(
        group.starts_with(&format!("{base}/apps/hello-")),
        "{group} is not under {base}/apps"
    );
    assert_eq!(
        cgroup_v2_of(child),
        group,
        "the child is in the app's group"
    );

    // keter dies; the next one takes the app over, in the same groups.
    let _ = k.signal_and_wait(Signal::SIGKILL);
    k.launch();
    k.wait_serving("hello", WAIT);
    assert_eq!(
        k.pid_of("hello.example.com"),
        app,
        "taken over, not restarted"
    );
    assert_eq!(cgroup_v2_of(app), group);

    fs::remove_file(k.incoming().join("hello.keter")).unwrap();
    k.wait_stopped("hello", WAIT);
    assert!(
        wait_gone(child, Duration::from_secs(5)),
        "the setsid child outlived its app"
    );
    let version = group.rsplit_once('/').unwrap().0.to_string();
    for dir in cgroup_dirs(&version) {
        assert!(!dir.exists(), "{} is left", dir.display());
    }
}

/// The extended attribute `name` of `path`.
fn xattr(path: &std::path::Path, name: &str) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let len = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (len >= 0).then(|| String::from_utf8_lossy(&buf[..len as usize]).into_owned())
}

/// Under keter's systemd unit on cgroup v2, the unit's `keter --release-cgroup` disables the
/// controllers once keter has died, so that systemd can start the next one, and the kernel
/// drops every limit with them (README "Limits and accounting"). keter keeps each group's
/// limits in the attribute `user.keter.limits` of its folder in the cgroup2 tree, and the
/// keter that takes over writes them again. Here the kernel's loss is made by hand: the limit
/// files set to no limit while no keter runs.
#[test]
fn limits_lost_while_no_keter_ran_are_written_again_by_the_next() {
    let mut k = Keter::start("limits-restore");
    let yaml = "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    args: [--version-string, v1]\n    hosts: [kept.example.com]\n    memory-limit: 256m\n    tasks-limit: 50\n";
    let bundle = k.dir.0.join("kept.keter");
    BundleBuilder::hello(yaml).write(&bundle);
    k.deploy("kept", &bundle);
    k.wait_for("kept.example.com", "v1", WAIT);
    let pid = k.pid_of("kept.example.com");
    let dirs = cgroup_dirs(&cgroup_v2_of(pid));
    let v2 = dirs
        .iter()
        .find(|d| d.join("cgroup.controllers").exists())
        .unwrap();
    assert_eq!(
        xattr(v2, "user.keter.limits").as_deref(),
        Some("memory=268435456 tasks=50"),
        "{}",
        v2.display()
    );
    let existing = |names: &[&str]| {
        dirs.iter()
            .flat_map(|d| names.iter().map(move |n| d.join(n)))
            .find(|f| f.exists())
            .unwrap()
    };
    let pids_max = existing(&["pids.max"]);
    let memory = existing(&["memory.max", "memory.limit_in_bytes"]);
    let read = |f: &std::path::Path| fs::read_to_string(f).unwrap().trim().to_string();
    assert_eq!(read(&pids_max), "50");

    let _ = k.signal_and_wait(Signal::SIGKILL);
    fs::write(&pids_max, "max").unwrap();
    fs::write(
        &memory,
        if memory.ends_with("memory.max") {
            "max"
        } else {
            "-1"
        },
    )
    .unwrap();
    assert_eq!(read(&pids_max), "max");
    k.launch();
    k.wait_serving("kept", WAIT);
    assert_eq!(
        k.pid_of("kept.example.com"),
        pid,
        "taken over, not restarted"
    );
    k.wait_log(
        "wrote the limits of 1 process groups taken over again",
        WAIT,
    );
    assert_eq!(read(&pids_max), "50");
    assert_eq!(read(&memory), (256u64 << 20).to_string());
}

/// An app that allocates past its `memory-limit` is killed by the kernel inside its own group,
/// reported as out of memory and restarted by its policy; its webapp and a neighbour serve
/// on.
#[test]
fn an_app_over_its_memory_limit_is_killed_reported_and_restarted_while_others_serve() {
    let mut k = Keter::start("limits-memory");
    k.deploy_hello("neighbour", "n1", "neighbour.example.com", &[]);
    let yaml = "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    args: [--version-string, web]\n    hosts: [leaky.example.com]\n  - type: background\n    exec: ../dist/hello\n    args: [--version-string, leak, --never-listen, --allocate-mb, \"200\"]\n    memory-limit: 64m\n    restart-delay-seconds: 0\n";
    let bundle = k.dir.0.join("leaky.keter");
    BundleBuilder::hello(yaml).write(&bundle);
    k.deploy("leaky", &bundle);
    k.wait_log("exited with out of memory (limit 64 MiB)", WAIT);
    // Restarted (and killed again) by its policy.
    k.wait_log_count("exited with out of memory (limit 64 MiB)", 2, WAIT);
    k.wait_for("leaky.example.com", "web", WAIT);
    k.wait_for("neighbour.example.com", "n1", WAIT);
    let report = k.app_json("leaky").unwrap();
    let leak = &report["processes"][0];
    assert_eq!(leak["kind"], "background", "{report}");
    assert!(
        leak["usage"]["oom_kills"].as_u64().unwrap() >= 2,
        "{report}"
    );
    assert_eq!(
        leak["usage"]["memory_limit_bytes"].as_u64(),
        Some(64 << 20),
        "{report}"
    );
    assert!(
        report["last_error"]
            .as_str()
            .unwrap()
            .contains("out of memory (limit 64 MiB)"),
        "{report}"
    );
    // keter and its Nginx were not what the kernel killed.
    assert!(!k.exited());
}

/// A fork bomb under `tasks-limit` stops at the limit; its neighbours serve on.
#[test]
fn a_fork_bomb_under_a_tasks_limit_leaves_the_others_serving() {
    let k = Keter::start("limits-forkbomb");
    k.deploy_hello("neighbour", "n1", "neighbour.example.com", &[]);
    let yaml = "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    args: [--version-string, web]\n    hosts: [bomb.example.com]\n  - type: background\n    exec: ../dist/hello\n    args: [--version-string, bomb, --never-listen, --fork-bomb]\n    tasks-limit: 40\n";
    let bundle = k.dir.0.join("bomb.keter");
    BundleBuilder::hello(yaml).write(&bundle);
    k.deploy("bomb", &bundle);
    let log = k.root.join("log/app-bomb.log");
    let deadline = Instant::now() + WAIT;
    while !fs::read_to_string(&log).is_ok_and(|l| l.contains("hello bomb: fork bomb: ")) {
        assert!(Instant::now() < deadline, "the bomb never hit its limit");
        std::thread::sleep(Duration::from_millis(20));
    }
    k.wait_for("bomb.example.com", "web", WAIT);
    k.wait_for("neighbour.example.com", "n1", WAIT);
    let report = k.app_json("bomb").unwrap();
    let bomb = &report["processes"][0];
    assert_eq!(bomb["usage"]["tasks_limit"].as_u64(), Some(40), "{report}");
    assert_eq!(bomb["usage"]["tasks"].as_u64(), Some(40), "{report}");
    // The app's delete takes every child of the bomb with it.
    let pid = bomb["pid"].as_i64().unwrap() as i32;
    let group = cgroup_v2_of(pid);
    fs::remove_file(k.incoming().join("bomb.keter")).unwrap();
    k.wait_stopped("bomb", WAIT);
    let version = group.rsplit_once('/').unwrap().0.to_string();
    for dir in cgroup_dirs(&version) {
        assert!(!dir.exists(), "{} is left", dir.display());
    }
}

/// CPU time, memory and tasks are in the status API without any limit, and move when the app
/// works; `/metrics` has them too.
#[test]
fn accounting_figures_move_when_the_app_works() {
    let k = Keter::start("limits-accounting");
    k.deploy_hello("hello", "v1", "hello.example.com", &[]);
    k.wait_for("hello.example.com", "v1", WAIT);
    let cpu = || usage(&k, "hello", "cpu_seconds").as_f64().unwrap();
    let before = cpu();
    assert!(usage(&k, "hello", "memory_bytes").as_u64().unwrap() > 0);
    assert!(usage(&k, "hello", "tasks").as_u64().unwrap() >= 1);
    assert_eq!(usage(&k, "hello", "oom_kills").as_u64(), Some(0));
    // Work: lines printed cost the app CPU time.
    for _ in 0..20 {
        k.get("hello.example.com", "/print?n=5000").unwrap();
    }
    let after = cpu();
    assert!(after > before, "CPU time {before} -> {after}");
    let metrics = keter_get(&k, "/metrics");
    assert!(
        metrics.contains("keter_app_cpu_seconds_total{app=\"hello\"} ")
            && metrics.contains("keter_app_memory_bytes{app=\"hello\"} ")
            && metrics.contains("keter_app_tasks{app=\"hello\"} "),
        "{metrics}"
    );
}

/// A background stanza that exits at once with `restart-delay-seconds: 0` is restarted after
/// a floor of 0.1 s doubling to 1 s (README "Supervision"), not in a hot loop.
#[test]
fn restarts_have_a_floor_even_without_a_delay() {
    let k = Keter::start("limits-floor");
    let yaml = "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    args: [--version-string, web]\n    hosts: [floor.example.com]\n  - type: background\n    exec: ../dist/hello\n    args: [--crash]\n    restart-delay-seconds: 0\n";
    let bundle = k.dir.0.join("floor.keter");
    BundleBuilder::hello(yaml).write(&bundle);
    k.deploy("floor", &bundle);
    k.wait_for("floor.example.com", "web", WAIT);
    k.wait_log("exited with exit code 3", WAIT);
    let start = k.log_count("exited with exit code 3");
    std::thread::sleep(Duration::from_secs(3));
    let exits = k.log_count("exited with exit code 3") - start;
    // 0.1 + 0.2 + 0.4 + 0.8 + 1 s...: at most 6 in 3 s, however the restarts fall.
    assert!((1..=6).contains(&exits), "{exits} exits in 3 s");
}

/// The status interface's answer at `path`.
fn keter_get(k: &Keter, path: &str) -> String {
    let timeout = Duration::from_secs(5);
    match k.status.as_ref().unwrap() {
        keter::status::StatusAddress::Tcp(a) => {
            keter::probe::get_tcp(*a, "keter-status", path, timeout)
        }
        keter::status::StatusAddress::Unix(p) => keter::probe::get_unix(p, path, timeout),
    }
    .unwrap()
    .body
}
