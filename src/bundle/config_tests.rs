//! Unit tests of reading a `keter.yaml` (`bundle::config`): both formats, errors with their
//! file and key, and the forms Keter accepts as real bundles write them (a flat bundle without
//! an app, hosts with ports or `_`, one host in two stanzas, the port and APPROOT variables,
//! `yesod keter`'s keys, numbers where host names belong).

use std::path::PathBuf;
use std::time::Duration;

use super::Tls;
use super::config::{BundleConfig, from_tree};
use crate::problem::Problems;
use crate::yaml;

fn read(text: &str) -> (Option<BundleConfig>, Problems) {
    let tree = yaml::parse(text).unwrap();
    let mut p = Problems::new("hello.keter: config/keter.yaml");
    let c = from_tree(&tree, &mut p);
    (c, p)
}

fn keys(p: &[crate::problem::Problem]) -> Vec<&str> {
    p.iter().map(|e| e.key.as_str()).collect()
}

#[test]
fn a_flat_bundle_of_static_hosts_and_redirects_only() {
    let (c, p) = read(
        "static-hosts:\n  - host: Docs.Example.com\n    root: ../public\nredirects:\n  - from: example.com\n    to: WWW.Example.com\n",
    );
    assert!(
        p.errors.is_empty() && p.warnings.is_empty(),
        "{:?} {:?}",
        p.errors,
        p.warnings
    );
    let c = c.unwrap();
    assert!(c.webapps.is_empty());
    assert!(
        c.statics[0].directory_listing,
        "Keter lists flat static hosts"
    );
    let super::RedirectTo::Host { host, .. } = &c.redirects[0].actions[0].target else {
        panic!()
    };
    assert_eq!(host.original(), "WWW.Example.com");
    // `exec` without `host` (Keter drops the app silently) is an error.
    let (c, p) = read("exec: ../app\nstatic-hosts: [{host: a.example.com, root: ../x}]\n");
    assert!(c.is_none());
    assert_eq!(keys(&p.errors), ["host"]);
    let (c, p) = read("# nothing\nuser-edited: false\n");
    assert!(c.is_none());
    assert!(
        p.errors[0].message.contains("nothing would be served"),
        "{:?}",
        p.errors
    );
}

#[test]
fn the_port_is_keters_and_approot_may_be_the_bundles() {
    let (c, p) = read(
        "stanzas:\n  - type: webapp\n    exec: ../a\n    host: a.example.com\n    env: {APPROOT: \"https://a.example.com\", YESOD_APPROOT: x}\n    port-env-vars: [YESOD_PORT, PORT, HTTP_PORT]\n",
    );
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    assert_eq!(
        c.unwrap().webapps[0].port_env_vars,
        ["YESOD_PORT", "PORT", "HTTP_PORT"]
    );
    let (c, p) = read(
        "stanzas:\n  - type: webapp\n    exec: ../a\n    host: a.example.com\n    env: {YESOD_PORT: \"3000\"}\n    forward-env: [PORT]\n",
    );
    assert!(c.is_none());
    assert_eq!(
        keys(&p.errors),
        ["stanzas[0].env.YESOD_PORT", "stanzas[0].forward-env[0]"]
    );
    // A port variable cannot also be set in env; APPROOT holds a URL, not a port.
    let (c, p) = read(
        "stanzas:\n  - type: webapp\n    exec: ../a\n    host: a.example.com\n    env: {HTTP_PORT: \"1\"}\n    port-env-vars: [HTTP_PORT, APPROOT]\n",
    );
    assert!(c.is_none());
    assert_eq!(
        keys(&p.errors),
        ["stanzas[0].port-env-vars[0]", "stanzas[0].port-env-vars[1]"]
    );
}

#[test]
fn one_host_in_two_stanzas_goes_where_keter_sends_it() {
    let (c, p) = read(
        "stanzas:\n  - type: webapp\n    exec: ../a\n    hosts: [a.example.com, Shared.example.com]\n  - type: static-files\n    root: ../s\n    hosts: [shared.example.com, s.example.com]\n  - type: reverse-proxy\n    reversing-host: s.example.com\n    reversed-host: 127.0.0.1\n    reversed-port: 9000\n",
    );
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    let c = c.unwrap();
    let routed = |hosts: &[crate::names::Host]| -> Vec<String> {
        hosts.iter().map(|h| h.to_string()).collect()
    };
    // The first stanza keeps its host; a reverse proxy takes the host over, as Keter's
    // Map.insert does.
    assert_eq!(
        routed(&c.webapps[0].routed),
        ["a.example.com", "shared.example.com"]
    );
    assert!(c.statics[0].served.routed.is_empty());
    assert_eq!(routed(&c.proxies[0].served.routed), ["s.example.com"]);
    assert_eq!(p.warnings.len(), 2, "{:?}", p.warnings);
    assert!(
        p.warnings[1]
            .message
            .contains("as in Keter, stanzas[2] serves it"),
        "{:?}",
        p.warnings
    );
    // The same name with another port in another stanza cannot be routed by Nginx.
    let (c, p) = read(
        "stanzas:\n  - type: webapp\n    exec: ../a\n    hosts: [\"localhost:8000\"]\n  - type: webapp\n    exec: ../b\n    hosts: [\"localhost:8001\"]\n",
    );
    assert!(c.is_none());
    assert_eq!(keys(&p.errors), ["stanzas[1].hosts"]);
}

#[test]
fn host_forms_keter_accepts_and_refuses() {
    let (c, p) = read(
        "exec: ../a\nhost: keter1_0\nextra-hosts: [\"127.0.0.1:8000\", pong1_0, \"*.Example.com\"]\n",
    );
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    let w = &c.unwrap().webapps[0];
    let hosts: Vec<String> = w.hosts.iter().map(|h| h.to_string()).collect();
    assert_eq!(
        hosts,
        ["keter1_0", "127.0.0.1:8000", "pong1_0", "*.example.com"]
    );
    assert_eq!(w.hosts[1].port, Some(8000));
    for (yaml, key) in [
        ("exec: ../a\nhost: 12\n", "host"),
        (
            "stanzas: [{type: webapp, exec: ../a, hosts: 12}]\n",
            "stanzas[0].hosts",
        ),
        (
            "stanzas: [{type: redirect, hosts: [a.b, true], actions: [{host: c.d}]}]\n",
            "stanzas[0].hosts[1]",
        ),
        ("exec: ../a\nhost: _\n", "host"),
    ] {
        let (c, p) = read(yaml);
        assert!(c.is_none(), "{yaml}");
        assert_eq!(keys(&p.errors), [key], "{yaml}");
    }
}

#[test]
fn yesod_keters_keys_and_a_leftover_exec_are_not_unknown() {
    let (c, p) = read(
        "exec: ../dist/bin/app\nextraFiles: [messages/en.msg]\nuser-edited: false\ncopy-to: a@b:/opt/keter/incoming\ncopy-to-port: 2222\ncopy-to-args: [-i, key]\nstanzas:\n  - type: webapp\n    exec: ../dist/bin/app\n    host: a.example.com\n",
    );
    assert!(c.is_some());
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
}

#[test]
fn middleware_and_time_bounds_on_every_stanza_keter_allows_them_on() {
    let (c, p) = read(
        "stanzas:\n  - type: static-files\n    root: ../s\n    host: s.example.com\n    connection-time-bound: 0\n    client-max-body-size: 0\n    middleware: [autohead, {headers: {X-A: b}}]\n  - type: reverse-proxy\n    reversing-host: p.example.com\n    reversed-host: 127.0.0.1\n    reversed-port: 9000\n    reversed-ssl: false\n    connection-time-bound: 60000\n    timeout: 30000000\n    client-max-body-size: 10m\n    middleware: [{basic-auth: {creds: {a: b}}}]\n",
    );
    assert!(
        p.errors.is_empty() && p.warnings.is_empty(),
        "{:?} {:?}",
        p.errors,
        p.warnings
    );
    let c = c.unwrap();
    assert_eq!(c.statics[0].time_bound, Some(None));
    assert!(c.statics[0].middleware.autohead);
    assert_eq!(c.statics[0].served.max_body, Some(0));
    let proxy = &c.proxies[0];
    assert_eq!(
        proxy.timeout,
        Some(Some(std::time::Duration::from_secs(30)))
    );
    assert_eq!(proxy.served.max_body, Some(10 << 20));
    assert!(proxy.middleware.basic_auth.is_some());
}

#[test]
fn a_remote_postgres_server_per_bundle_is_refused_with_the_replacement() {
    let (c, p) = read(
        "stanzas: [{type: webapp, exec: ../a, host: a.b}]\nplugins:\n  postgres:\n    - server: db.example.com\n      port: 5432\n",
    );
    assert!(c.is_none());
    assert_eq!(keys(&p.errors), ["plugins.postgres"]);
    assert!(
        p.errors[0].message.contains("global `postgres` section"),
        "{:?}",
        p.errors
    );
}

#[test]
fn seed_flat_format() {
    let (c, p) = read(
        "exec: ../dist/build/yesodweb/yesodweb\nargs:\n  - production\nhost: www.yesodweb.com\nssl: false\n",
    );
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    let w = &c.unwrap().webapps[0];
    assert_eq!(
        w.program.exec,
        PathBuf::from("../dist/build/yesodweb/yesodweb")
    );
    assert_eq!(w.program.args, vec!["production"]);
    assert_eq!(w.program.key("exec"), "exec");
    assert_eq!(w.hosts[0].as_str(), "www.yesodweb.com");
    assert_eq!(w.tls, Tls::Off);
    assert_eq!(w.health_check_path.as_str(), "/");
}

#[test]
fn flat_extra_hosts_and_env() {
    let (c, p) = read(
        "exec: ../app\nhost: A.example.com\nextra-hosts: [b.example.com]\nenv: {GREETING: hi}\n",
    );
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    let w = &c.unwrap().webapps[0];
    let hosts: Vec<&str> = w.hosts.iter().map(|h| h.as_str()).collect();
    assert_eq!(hosts, ["a.example.com", "b.example.com"]);
    assert_eq!(w.program.env["GREETING"], "hi");
}

#[test]
fn stanza_format_webapp() {
    let (c, p) = read(
        "stanzas:\n  - type: webapp\n    exec: ../dist/bin/app\n    args: [production]\n    env: {KEY: value}\n    forward-env: [LANG]\n    hosts: [www.example.com, example.com]\n    health-check-path: /up\n    ensure-alive-time-bound: 5000000\n",
    );
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    let w = &c.unwrap().webapps[0];
    assert_eq!(w.hosts.len(), 2);
    assert_eq!(w.program.forward_env, ["LANG"]);
    assert_eq!(w.program.key("exec"), "stanzas[0].exec");
    assert_eq!(w.health_check_path.as_str(), "/up");
    assert_eq!(w.readiness_timeout, Some(Duration::from_secs(5)));
}

#[test]
fn errors_name_file_and_key() {
    let (c, p) = read(
        "stanzas:\n  - type: webapp\n    hosts: [\"evil.com;}\"]\n    env: {PORT: \"1\"}\n  - type: static-files\n    root: ../static\n  - type: teleport\n  - type: background\n    exec: ../w\n    restart-count: often\n",
    );
    assert!(c.is_none());
    let msgs: Vec<String> = p.errors.iter().map(|e| e.to_string()).collect();
    for expected in [
        "hello.keter: config/keter.yaml: stanzas[0].exec: required",
        "hello.keter: config/keter.yaml: stanzas[0].env.PORT: PORT is set by keter to the port it gives the app",
        "hello.keter: config/keter.yaml: stanzas[0].hosts[0]: the host name \"evil.com;}\" is not valid",
        "hello.keter: config/keter.yaml: stanzas[1].hosts: required: at least one host name",
        "hello.keter: config/keter.yaml: stanzas[3].restart-count: expected a whole number",
        "hello.keter: config/keter.yaml: stanzas[2].type: unknown stanza type \"teleport\"",
    ] {
        assert!(
            msgs.iter().any(|m| m.starts_with(expected)),
            "missing {expected:?} in {msgs:#?}"
        );
    }
}

#[test]
fn missing_host_and_wrong_types() {
    let (c, p) = read("exec: 5\nargs: {a: 1}\nhost: []\n");
    assert!(c.is_none());
    let keys: Vec<&str> = p.errors.iter().map(|e| e.key.as_str()).collect();
    assert!(keys.contains(&"args"), "{keys:?}");
    assert!(keys.contains(&"host"), "{keys:?}");
}

#[test]
fn background_stanzas() {
    let (c, p) = read(
        "stanzas:\n  - type: webapp\n    exec: ../a\n    host: a.b\n  - type: background\n    exec: ../dist/bin/worker\n    args: [--queue, q]\n    restart-count: 3\n    restart-delay-seconds: 1\n  - type: background\n    exec: ../w2\n    restart-count: unlimited\n",
    );
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    let c = c.unwrap();
    assert_eq!(c.background.len(), 2);
    assert_eq!(c.background[0].restart_count, Some(3));
    assert_eq!(c.background[0].restart_delay, Duration::from_secs(1));
    assert_eq!(c.background[0].program.key("exec"), "stanzas[1].exec");
    assert_eq!(c.background[1].restart_count, None);
    assert_eq!(c.background[1].restart_delay, Duration::from_secs(5));
}

#[test]
fn unknown_keys_warn() {
    let (c, p) = read("exec: ../app\nhost: a.example.com\ncolour: blue\n");
    assert!(c.is_some());
    assert_eq!(p.warnings[0].key, "colour");
}

#[test]
fn postgres_plugin_in_both_formats() {
    let (c, p) =
        read("stanzas: [{type: webapp, exec: ../a, host: a.b}]\nplugins: {postgres: true}\n");
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    assert!(c.unwrap().postgres);
    let (c, p) = read("exec: ../a\nhost: a.b\npostgres: yes\n");
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    assert!(c.unwrap().postgres);
    let (c, _) = read("exec: ../a\nhost: a.b\n");
    assert!(!c.unwrap().postgres);
    let (c, _) = read("stanzas: [{type: webapp, exec: ../a, host: a.b}]\nplugins: {}\n");
    assert!(!c.unwrap().postgres);
}

#[test]
fn postgres_plugin_wrong_type_is_an_error() {
    let (c, p) =
        read("stanzas: [{type: webapp, exec: ../a, host: a.b}]\nplugins: {postgres: maybe}\n");
    assert!(c.is_none());
    assert_eq!(p.errors[0].key, "plugins.postgres");
}

#[test]
fn health_checks_per_stanza_and_their_bad_values() {
    let (c, p) = read(
        "exec: ../dist/app\nhost: a.example.com\nhealth-check-interval: 0.5\nhealth-check-failures: 2\nhealth-check-timeout: 1\n",
    );
    assert!(p.errors.is_empty() && p.warnings.is_empty(), "{p:?}");
    let w = &c.unwrap().webapps[0];
    assert_eq!(w.health_check_interval, Some(Duration::from_millis(500)));
    assert_eq!(w.health_check_failures, Some(2));
    assert_eq!(w.health_check_timeout, Some(Duration::from_secs(1)));
    let (c, _) = read("exec: ../dist/app\nhost: a.example.com\nhealth-check-interval: 0\n");
    assert_eq!(
        c.unwrap().webapps[0].health_check_interval,
        Some(Duration::ZERO)
    );
    let (c, p) = read(
        "exec: ../dist/app\nhost: a.example.com\nhealth-check-interval: soon\nhealth-check-failures: 0\nhealth-check-timeout: 0\n",
    );
    assert!(c.is_none());
    assert_eq!(
        keys(&p.errors),
        [
            "health-check-interval",
            "health-check-timeout",
            "health-check-failures"
        ]
    );
}
