//! The environment an app's process starts with (README "Environment of an app").
//!
//! Keter merges, highest precedence first: the stanza's `env`, `forward-env`, the plugins'
//! variables, the global `env`, then `PORT` (and `port-env-vars`) and `APPROOT`. keter keeps
//! that order, with one difference that configuration checks enforce: `PORT`, `YESOD_PORT`
//! and the `port-env-vars` names always carry the port keter gives the app, because its
//! readiness check connects there. `APPROOT` set by any of the sources wins over the one keter
//! builds, as in Keter, and `YESOD_APPROOT` (keter's addition for newer Yesod scaffolds)
//! follows the `APPROOT` the app gets unless it is set too.

use std::collections::BTreeMap;

use super::config::{Program, WebApp};
use crate::config::Config;

/// The variables of one process, sorted by name. `web` is the webapp and its port (none for a
/// background stanza); `home` the home of the user it runs as (`crate::isolation`). A
/// bundle-given `APPROOT` is logged, once per process start-up plan.
pub fn environment(
    config: &Config,
    plugin_env: &BTreeMap<String, String>,
    program: &Program,
    web: Option<(&WebApp, u16)>,
    home: &str,
) -> Vec<(String, String)> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into());
    env.insert("HOME".into(), home.into());
    let mut given: BTreeMap<String, String> = BTreeMap::new();
    given.extend(config.env.clone());
    given.extend(plugin_env.clone());
    for name in &program.forward_env {
        if let Ok(v) = std::env::var(name) {
            given.insert(name.clone(), v);
        }
    }
    given.extend(program.env.clone());
    if let Some((webapp, port)) = web {
        let built = approot(config, webapp);
        let approot = match given.get("APPROOT") {
            Some(v) => {
                if *v != built {
                    log::info!(
                        "{}: APPROOT is {v} as the configuration sets it, not {built} as keter would build it",
                        program.key("env.APPROOT")
                    );
                }
                v.clone()
            }
            None => built,
        };
        env.extend(given);
        env.entry("APPROOT".into())
            .or_insert_with(|| approot.clone());
        env.entry("YESOD_APPROOT".into()).or_insert(approot);
        for name in webapp
            .port_env_vars
            .iter()
            .map(String::as_str)
            .chain(["PORT", "YESOD_PORT"])
        {
            env.insert(name.to_string(), port.to_string());
        }
    } else {
        env.extend(given);
    }
    env.into_iter().collect()
}

/// `APPROOT` as Keter builds it: `http://` (or `https://` with `ssl`) and the first host as
/// written, with the external port when it is not the scheme's default. A first host that
/// names its own port (`127.0.0.1:8000`) keeps that port alone.
pub fn approot(config: &Config, webapp: &WebApp) -> String {
    let (scheme, external, default) = if webapp.https() {
        ("https", config.external_https_port, 443)
    } else {
        ("http", config.external_http_port, 80)
    };
    let host = &webapp.hosts[0];
    if host.port.is_some() || external == default {
        format!("{scheme}://{}", host.original())
    } else {
        format!("{scheme}://{}:{external}", host.original())
    }
}
