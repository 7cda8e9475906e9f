//! Keter's own integration matrix (its `incoming/bundles/run-tests.sh`): four flat bundles
//! made of `static-hosts` only, each serving a file with its name on `NAME.example.com` and on
//! the mid-label wildcards `NAME.*.example.com`, `NAME.*.*.example.com` and
//! `NAME.*.*.*.example.com`, added and removed through all 3^4 steps of Keter's nested loops
//! (each bundle: absent, added, removed) against one keter. After every step every host of
//! every bundle answers that bundle's file, or 404 when the bundle is not deployed.

use std::fs;
use std::time::Duration;

use crate::support::*;

const NAMES: [&str; 4] = ["foo", "bar", "baz", "qux"];
const WAIT: Duration = Duration::from_secs(30);

/// A bundle as Keter's samples write it: only `static-hosts`, a comment naming it.
fn flat_static_bundle(name: &str) -> BundleBuilder {
    let mut yaml = format!("# {name}\nstatic-hosts:\n");
    for wildcards in 0..4 {
        let labels: String = (0..wildcards).map(|_| ".*").collect();
        yaml.push_str(&format!(
            "    - host: {name}{labels}.example.com\n      root: ../static\n"
        ));
    }
    BundleBuilder::new()
        .file("config/keter.yaml", yaml.into_bytes(), 0o644)
        .file("static/test", format!("{name}\n").into_bytes(), 0o644)
}

/// Random lower-case labels of 1 to 20 letters, like the samples' `assert.sh`, from a fixed
/// seed so that a failure can be replayed.
struct Labels(u64);

impl Labels {
    fn next(&mut self) -> String {
        let mut step = || {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) as usize
        };
        let len = 1 + step() % 20;
        (0..len)
            .map(|_| (b'a' + (step() % 26) as u8) as char)
            .collect()
    }
}

#[test]
fn keters_matrix_of_four_static_bundles_added_and_removed_in_every_combination() {
    let k = Keter::start_with(
        "matrix",
        Opts {
            ports: 4,
            ..Opts::default()
        },
    );
    let files: Vec<_> = NAMES
        .iter()
        .map(|name| {
            let path = k.dir.0.join(format!("{name}.keter"));
            flat_static_bundle(name).write(&path);
            let (code, out, _) = crate::status::keter_cmd(&["check", path.to_str().unwrap()]);
            assert_eq!((code, out.contains("warning")), (0, false), "{out}");
            path
        })
        .collect();
    let mut labels = Labels(0x6b65746572);
    let mut present = [false; 4];
    let mut steps = 0;
    for combination in 0..81 {
        // The nested loops' states of foo, bar, baz, qux (outermost first): 0 and 2 absent,
        // 1 added.
        let states = [
            combination / 27,
            combination / 9 % 3,
            combination / 3 % 3,
            combination % 3,
        ];
        for (i, name) in NAMES.iter().enumerate() {
            let want = states[i] == 1;
            if want == present[i] {
                continue;
            }
            if want {
                let before = k.last_deploy(name);
                k.deploy(name, &files[i]);
                k.wait_next_deploy(name, before.as_ref(), DeployResult::Succeeded, WAIT);
            } else {
                fs::remove_file(k.incoming().join(format!("{name}.keter"))).unwrap();
                k.wait_stopped(name, WAIT);
            }
            present[i] = want;
        }
        for (i, name) in NAMES.iter().enumerate() {
            let (x, y, z) = (labels.next(), labels.next(), labels.next());
            let hosts = [
                format!("{name}.example.com"),
                format!("{name}.{x}.example.com"),
                format!("{name}.{x}.{y}.example.com"),
                format!("{name}.{x}.{y}.{z}.example.com"),
            ];
            for host in &hosts {
                let r = k.get(host, "/test").unwrap();
                if present[i] {
                    assert_eq!(
                        (r.status, r.body.trim()),
                        (200, *name),
                        "step {combination} {states:?}: {host}\n{}",
                        k.log()
                    );
                } else {
                    assert_eq!(
                        r.status, 404,
                        "step {combination} {states:?}: {host}: {r:?}"
                    );
                }
            }
            // One label more than any wildcard: nobody's.
            let deep = format!("{name}.{x}.{y}.{z}.{x}.example.com");
            assert_eq!(k.get(&deep, "/test").unwrap().status, 404, "{deep}");
        }
        steps += 1;
    }
    assert_eq!(steps, 81);
    assert_eq!(present, [false; 4]);
}
