//! The formats pinned by `tests/fixtures/formats/`: `records-N/*.json` and `handover-N.json` as
//! the build that introduced format N wrote them in a real run (the ignored integration test
//! `formats::capture_format_fixtures` writes them), and `sample-records-N.json` /
//! `sample-handover-N.json`, fixed values written by this build. Every build reads every
//! format's files; the files of the current format are what this build writes, to the byte
//! of each value.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::handover::{self, Handed, HandedPipe};
use super::records::{self, *};
use super::{Mono, Reads};

/// What to do when the current format's files and this build disagree.
const CHANGED: &str = "the persisted types changed (src/formats/), so this build no longer \
writes the format it names, and another keter would misread it. Raise FORMAT in src/formats/records.rs or \
src/formats/handover.rs, add the row to the history in src/formats/mod.rs, read the previous \
format in read(), capture the new format's files (KETER_BIN=target/debug/keter \
KETER_CAPTURE=tests/fixtures/formats cargo test --test integration capture_format_fixtures -- \
--ignored) and write the samples (KETER_BLESS=1 cargo test --lib formats::); the files of \
earlier formats stay as they are";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/formats")
}

fn json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}; {CHANGED}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The captured records of format `n`, by file.
fn captured_records(n: u32) -> Vec<(PathBuf, serde_json::Value)> {
    let dir = fixtures().join(format!("records-{n}"));
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}; {CHANGED}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no records in {}", dir.display());
    files.into_iter().map(|p| (p.clone(), json(&p))).collect()
}

#[test]
fn every_format_read_has_its_files_and_reads() {
    for n in records::READS.oldest..=records::READS.newest {
        for (path, value) in captured_records(n) {
            let record = records::read(value).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(record.format, records::FORMAT, "{}", path.display());
        }
        let sample = fixtures().join(format!("sample-records-{n}.json"));
        records::read(json(&sample)).unwrap_or_else(|e| panic!("{}: {e}", sample.display()));
    }
    for n in handover::READS.oldest..=handover::READS.newest {
        for name in [
            format!("handover-{n}.json"),
            format!("sample-handover-{n}.json"),
        ] {
            let path = fixtures().join(name);
            let bytes = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("{}: {e}; {CHANGED}", path.display()));
            handover::read(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }
}

#[test]
fn the_captured_records_of_the_current_format_are_what_this_build_writes() {
    for (path, value) in captured_records(records::FORMAT) {
        let record = records::read(value.clone()).unwrap();
        assert_eq!(
            serde_json::to_value(&record).unwrap(),
            value,
            "{} is not what this build writes: {CHANGED}",
            path.display()
        );
        // And through the runtime types that have conversions of their own.
        for v in &record.versions {
            for p in &v.procs {
                let spec = crate::process::Spec::from(p.spec.clone());
                assert_eq!(SpecRecord::from(&spec), p.spec);
                let restarts = crate::restart::Restarts::from(p.restarts.clone());
                assert_eq!(RestartsRecord::from(&restarts), p.restarts);
            }
        }
    }
    let path = fixtures().join(format!("handover-{}.json", handover::FORMAT));
    let value = json(&path);
    let handed = handover::read(value.to_string().as_bytes()).unwrap();
    assert_eq!(
        serde_json::to_value(&handed).unwrap(),
        value,
        "{} is not what this build writes: {CHANGED}",
        path.display()
    );
}

/// A record with what the captured ones may lack: a candidate, every process state, a
/// process with no user, a failed deploy waiting for its retry.
fn sample_record() -> AppRecord {
    let backoff = BackoffRecord {
        first: Duration::from_millis(100),
        max: Duration::from_secs(30),
        healthy: Duration::from_secs(60),
        next: Duration::from_millis(400),
        failures: 2,
    };
    let stamp = FileStampRecord {
        dev: 65024,
        ino: 1234,
        size: 5678,
        mtime_ns: 1_796_635_589_043_441_988,
        ctime_ns: -1,
    };
    let spec = |program: &str, user: bool| SpecRecord {
        program: PathBuf::from(program),
        args: vec!["--port".into(), "ünïcode \"quoted\"".into()],
        cwd: "/var/lib/keter/temp/shop-3".into(),
        env: vec![
            ("PORT".into(), "20001".into()),
            ("APPROOT".into(), String::new()),
        ],
        user: user.then(|| RunAsRecord {
            name: "keter-shop".into(),
            uid: 99904,
            gid: 99904,
            groups: vec![99904, 33],
            home: "/var/lib/keter/home/shop".into(),
        }),
    };
    let proc = |role, state, policy| ProcRecord {
        role,
        spec: spec("/var/lib/keter/temp/shop-3/dist/shop", true),
        state,
        restarts: RestartsRecord {
            policy,
            fixed_failures: 1,
            total: 7,
        },
    };
    let version = |standing, id, procs| VersionRecord {
        standing,
        id,
        dir: format!("/var/lib/keter/temp/shop-{id}").into(),
        sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
        stamp,
        config: "stanzas:\n  - type: webapp\n    exec: ../dist/shop\n    host: shop.example.com\n"
            .into(),
        deploy: id,
        modified: Some(SystemTime::UNIX_EPOCH + Duration::new(1_796_635_589, 43_441_988)),
        live_since: None,
        procs,
    };
    AppRecord {
        format: records::FORMAT,
        versions: vec![
            version(
                Standing::Serving,
                3,
                vec![
                    proc(
                        RoleRecord::Web {
                            index: 0,
                            port: 20001,
                        },
                        ProcRecordState::Backoff {
                            until: Mono(9_660_865_943_131),
                        },
                        PolicyRecord::Backoff(backoff),
                    ),
                    proc(
                        RoleRecord::Background { index: 0 },
                        ProcRecordState::GaveUp,
                        PolicyRecord::Fixed {
                            delay: Duration::from_secs(5),
                            count: Some(3),
                        },
                    ),
                    ProcRecord {
                        spec: spec("/var/lib/keter/temp/shop-3/dist/worker", false),
                        ..proc(
                            RoleRecord::Background { index: 1 },
                            ProcRecordState::Stopped,
                            PolicyRecord::Fixed {
                                delay: Duration::ZERO,
                                count: None,
                            },
                        )
                    },
                ],
            ),
            version(
                Standing::Candidate,
                4,
                vec![proc(
                    RoleRecord::Web {
                        index: 0,
                        port: 20002,
                    },
                    ProcRecordState::Running {
                        pid: 4242,
                        ticks: 966_022,
                        output: 2_563_908,
                    },
                    PolicyRecord::Backoff(backoff),
                )],
            ),
        ],
        deploys: 4,
        failed: Some(FailedRecord {
            path: "/var/lib/keter/incoming/shop.keter".into(),
            stamp: None,
            retry_at: Some(Mono(9_665_865_943_131)),
            backoff,
        }),
        last_deploy: Some(DeployRecord {
            result: DeployResultRecord::Stopped,
            finished: "2026-12-07T09:26:29.094Z".into(),
            duration_ms: 49,
            error: None,
            error_kind: Some("unreachable".into()),
            retry_at: Some("2026-12-07T09:26:34.094Z".into()),
        }),
        last_error: None,
    }
}

fn sample_handover() -> Handed {
    Handed {
        format: handover::FORMAT,
        from: "0.1.0 (git 0123456789, modified)".into(),
        since: Mono(9_660_865_943_131),
        pipes: vec![HandedPipe {
            ino: 2_563_908,
            fd: 22,
            partial: b"half a li\xffne".to_vec(),
        }],
    }
}

/// `value` must equal the golden file `name` of the current format; with `KETER_BLESS=1` a
/// missing one is written (an existing one never is: it pins a released format).
fn golden(name: &str, value: serde_json::Value) {
    let path = fixtures().join(name);
    if !path.exists() && std::env::var_os("KETER_BLESS").is_some() {
        std::fs::write(&path, serde_json::to_string_pretty(&value).unwrap() + "\n").unwrap();
    }
    assert_eq!(
        value,
        json(&path),
        "this build's {name} is not {}: {CHANGED}",
        path.display()
    );
}

#[test]
fn this_build_writes_the_samples_of_the_current_format_exactly() {
    golden(
        &format!("sample-records-{}.json", records::FORMAT),
        serde_json::to_value(sample_record()).unwrap(),
    );
    golden(
        &format!("sample-handover-{}.json", handover::FORMAT),
        serde_json::to_value(sample_handover()).unwrap(),
    );
    // And reads them back as they were.
    let path = fixtures().join(format!("sample-records-{}.json", records::FORMAT));
    assert_eq!(records::read(json(&path)).unwrap(), sample_record());
}

#[test]
fn a_newer_format_is_refused_naming_it() {
    let mut value = serde_json::to_value(sample_record()).unwrap();
    value["format"] = serde_json::json!(records::FORMAT + 1);
    let e = records::read(value).unwrap_err().to_string();
    assert!(
        e.contains(&format!("it has format {}", records::FORMAT + 1))
            && e.contains("reads formats"),
        "{e}"
    );
    let e = records::read(serde_json::json!({"versions": []})).unwrap_err();
    assert!(e.to_string().contains("no \"format\""), "{e}");
    let mut value = serde_json::to_value(sample_handover()).unwrap();
    value["format"] = serde_json::json!(0);
    let e = handover::read(value.to_string().as_bytes()).unwrap_err();
    assert!(e.to_string().contains("it has format 0"), "{e}");
}

#[test]
fn the_answer_reads_as_the_released_build_reads_it() {
    let answer = handover::answer("/var/lib/keter".into(), "managed");
    // The released build compares `handover` and `records` with its formats, 1 and 1.
    assert_eq!(answer.handover, handover::RANGELESS);
    assert_eq!(answer.records, handover::RANGELESS);
    assert_eq!(answer.reads_records(), records::READS);
    // And an answer of a build before the ranges reads as its own formats alone.
    let old: handover::Answer = serde_json::from_str(
        r#"{"keter":"0.1.0","handover":1,"records":1,"root":"/var/lib/keter","nginx_mode":"managed"}"#,
    )
    .unwrap();
    assert_eq!(old.reads_handover(), Reads::only(1));
    assert_eq!(old.reads_records(), Reads::only(1));
}

/// The two files the releases and maintenance keep for a later keter
/// (`src/app/releases.rs`, `src/app/maintenance.rs`), of their first format, pinned the same
/// way: this build writes the samples exactly and reads them back.
#[test]
fn the_release_list_and_the_maintenance_state_are_pinned() {
    use crate::app::maintenance::Maintenance;
    use crate::app::releases::{self, Ended, Release, Releases};
    let list = Releases {
        format: releases::FORMAT,
        releases: vec![
            Release {
                number: 1,
                sha256: "ab".repeat(32),
                size: 4096,
                deployed_at: "2026-12-07T10:00:00.000Z".into(),
                deployed_by: 1001,
                deployed_by_user: Some("alice".into()),
                rollback_of: None,
                ended: Some(Ended::RolledBack),
                ended_at: Some("2026-12-07T10:05:00.000Z".into()),
                reason: Some("rolled back by uid 1001".into()),
            },
            Release {
                number: 2,
                sha256: "cd".repeat(32),
                size: 8192,
                deployed_at: "2026-12-07T10:05:00.000Z".into(),
                deployed_by: 0,
                deployed_by_user: None,
                rollback_of: Some(1),
                ended: None,
                ended_at: None,
                reason: None,
            },
        ],
        next: 3,
    };
    let name = format!("sample-releases-{}.json", releases::FORMAT);
    golden(&name, serde_json::to_value(&list).unwrap());
    let read: Releases = serde_json::from_value(json(&fixtures().join(&name))).unwrap();
    assert_eq!(read, list);

    let on = Maintenance {
        message: Some("Back at 14:00 <b>UTC</b>".into()),
        since: "2026-12-07T10:00:00.000Z".into(),
        by: 1001,
    };
    golden(
        "sample-maintenance-1.json",
        serde_json::to_value(&on).unwrap(),
    );
    let read: Maintenance =
        serde_json::from_value(json(&fixtures().join("sample-maintenance-1.json"))).unwrap();
    assert_eq!(read, on);
}
