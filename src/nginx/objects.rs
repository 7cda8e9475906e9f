//! The names of the Nginx objects keyed by an app: its upstreams, its `limit_req` zones and
//! the `map` variables of its throttles. [`object_name`] alone mints them, so that no two apps
//! ever share one (README, "Generated Nginx files").
//!
//! Nginx loads every app's file into one configuration, and a name two apps share breaks it:
//! two upstreams of one name fail `nginx -t` (so one app's name would block another's
//! deploys), and a second `map` of a variable silently replaces the first (one app's throttle
//! would count by the other app's key). Nginx compares upstream and variable names without
//! case, so `Shop` and `shop` must not give names that differ only in case.
//!
//! A name is `keter_`, the app name encoded, and a suffix saying which object it is:
//!
//! * The encoding keeps lower-case letters and digits and spells every other character as
//!   `_` and one letter: `_h` for `-`, `_d` for `.`, `__` for `_`, `_u` and the letter for a
//!   capital (`Shop` is `_ushop`). That is a prefix code into `[a-z0-9_]`, so a name decodes
//!   to exactly one app name, and an ordinary lower-case name reads as itself.
//! * Suffixes start with what the encoding never writes where a character's code starts: `_`
//!   and a digit (`keter_web_1`, the first of the app's webapps when it has several), or `_r`
//!   (`keter_web_rl1`, the app's first throttle), or `_m` (`keter_web_metrics`, the app's
//!   `log_format` of request metrics). So app and suffix are told apart.
//! * Names written by earlier versions of keter stay apart from these, whatever the case: an
//!   earlier upstream was `keter-NAME` or `keter-NAME-N`, with a `-` where these have a `_`;
//!   an earlier zone or variable ended in `_` and digits only (`keter_Shop_1`,
//!   `keter_rl_Shop_2`), where these end in `_rl` and digits. keter keeps an app's file written
//!   by an earlier version until that app's next deploy (README, "Upgrading keter in place"),
//!   and such a file loads beside the new ones.

use crate::names::AppName;

/// The Nginx object a name is for. Upstreams, zones and variables are separate namespaces in
/// Nginx; a zone and the variable that keys it share their name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Object {
    /// The upstream of the app's only webapp.
    Upstream,
    /// The upstream of the app's `n`-th webapp (from 1) when it has several.
    NthUpstream(usize),
    /// The `limit_req_zone` of the app's `n`-th throttle (from 1, counted across the app).
    Zone(usize),
    /// The `map` variable, without its `$`, that gives the key of the `n`-th throttle when it
    /// counts only requests that carry what it counts by.
    Variable(usize),
    /// The `log_format` of the app's request metrics (README, "Request metrics").
    LogFormat,
}

/// The name of `object` of `app`: lower case, `[a-z0-9_]`, never the name of another object of
/// the same kind, of this app or another, nor a name an earlier keter gave (module
/// documentation).
pub fn object_name(app: &AppName, object: Object) -> String {
    let mut out = String::from("keter_");
    for c in app.as_str().chars() {
        match c {
            'a'..='z' | '0'..='9' => out.push(c),
            'A'..='Z' => {
                out.push_str("_u");
                out.push(c.to_ascii_lowercase());
            }
            '-' => out.push_str("_h"),
            '.' => out.push_str("_d"),
            '_' => out.push_str("__"),
            // An app name has no other character; should one come, its bytes in hex keep the
            // code a prefix code.
            other => {
                let mut buf = [0u8; 4];
                for b in other.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("_x{b:02x}"));
                }
            }
        }
    }
    match object {
        Object::Upstream => {}
        Object::NthUpstream(n) => out.push_str(&format!("_{n}")),
        Object::Zone(n) | Object::Variable(n) => out.push_str(&format!("_rl{n}")),
        Object::LogFormat => out.push_str("_metrics"),
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::*;

    fn app(name: &str) -> AppName {
        AppName::new(name).unwrap()
    }

    /// What a name says, read back: the app name, and the suffix (`""`, `_N` or `_rlN`).
    /// Returns `None` for a string no app's object is named.
    fn decode(name: &str) -> Option<(String, String)> {
        let mut rest = name.strip_prefix("keter_")?.chars().peekable();
        let mut app = String::new();
        loop {
            match rest.peek().copied() {
                None => return Some((app, String::new())),
                Some(c @ ('a'..='z' | '0'..='9')) => {
                    app.push(c);
                    rest.next();
                }
                Some('_') => {
                    let mut ahead = rest.clone();
                    ahead.next();
                    match ahead.next() {
                        Some('h') => app.push('-'),
                        Some('d') => app.push('.'),
                        Some('_') => app.push('_'),
                        Some('u') => match ahead.next() {
                            Some(c) if c.is_ascii_lowercase() => app.push(c.to_ascii_uppercase()),
                            _ => return None,
                        },
                        // Not a character's code: the suffix starts here.
                        _ => {
                            let suffix: String = rest.collect();
                            if suffix == "_metrics" {
                                return Some((app, suffix));
                            }
                            let digits = suffix
                                .strip_prefix("_rl")
                                .or_else(|| suffix.strip_prefix('_'))?;
                            let number = !digits.is_empty()
                                && digits.bytes().all(|b| b.is_ascii_digit())
                                && !digits.starts_with('0');
                            return number.then_some((app, suffix));
                        }
                    }
                    rest = ahead;
                }
                Some(_) => return None,
            }
        }
    }

    /// How keter named the objects before this encoding: upstreams `keter-NAME` and
    /// `keter-NAME-N`, zones `keter_E_N` and variables `keter_rl_E_N`, where `E` kept letters
    /// (in their case) and digits and wrote `__`, `_h`, `_d` for `_`, `-`, `.`.
    fn earlier(app: &str, object: Object) -> String {
        let escaped: String = app
            .chars()
            .map(|c| match c {
                '_' => "__".to_string(),
                '-' => "_h".to_string(),
                '.' => "_d".to_string(),
                c => c.to_string(),
            })
            .collect();
        match object {
            Object::Upstream => format!("keter-{app}"),
            Object::NthUpstream(n) => format!("keter-{app}-{n}"),
            Object::Zone(n) => format!("keter_{escaped}_{n}"),
            Object::Variable(n) => format!("keter_rl_{escaped}_{n}"),
            // No earlier keter wrote one.
            Object::LogFormat => format!("keter_log_format_{escaped}"),
        }
    }

    /// Nginx's namespace of a kind of object: zones and variables are apart from upstreams.
    fn namespace(object: Object) -> &'static str {
        match object {
            Object::Upstream | Object::NthUpstream(_) => "upstream",
            Object::Zone(_) => "zone",
            Object::Variable(_) => "variable",
            Object::LogFormat => "log_format",
        }
    }

    const OBJECTS: [Object; 9] = [
        Object::LogFormat,
        Object::Upstream,
        Object::NthUpstream(1),
        Object::NthUpstream(2),
        Object::NthUpstream(10),
        Object::Zone(1),
        Object::Zone(12),
        Object::Variable(2),
        Object::Variable(21),
    ];

    /// Every name of every app in `apps` for every object, checked against each other and
    /// against every earlier name, case ignored as Nginx ignores it.
    fn check_all(apps: &[String]) {
        let mut seen: HashMap<(&str, String), (String, Object)> = HashMap::new();
        let mut earlier_names: HashSet<(&str, String)> = HashSet::new();
        for a in apps {
            for o in OBJECTS {
                earlier_names.insert((namespace(o), earlier(a, o).to_ascii_lowercase()));
            }
        }
        for a in apps {
            for o in OBJECTS {
                let name = object_name(&app(a), o);
                assert!(
                    name.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                    "{a} {o:?}: {name}"
                );
                let expected = match o {
                    Object::Upstream => String::new(),
                    Object::NthUpstream(n) => format!("_{n}"),
                    Object::Zone(n) | Object::Variable(n) => format!("_rl{n}"),
                    Object::LogFormat => "_metrics".to_string(),
                };
                assert_eq!(
                    decode(&name),
                    Some((a.clone(), expected)),
                    "{a} {o:?}: {name}"
                );
                if let Some(other) = seen.insert((namespace(o), name.clone()), (a.clone(), o)) {
                    // A zone and its variable share a name, in separate namespaces.
                    panic!("{a} {o:?} and {other:?} are both named {name}");
                }
                assert!(
                    !earlier_names.contains(&(namespace(o), name.clone())),
                    "{a} {o:?} is named {name}, as an earlier keter named an object of some app"
                );
            }
        }
    }

    #[test]
    fn alike_app_names_get_names_of_their_own() {
        // An app with two webapps beside the app named like its second upstream was.
        assert_eq!(
            object_name(&app("web"), Object::NthUpstream(1)),
            "keter_web_1"
        );
        assert_eq!(object_name(&app("web-1"), Object::Upstream), "keter_web_h1");
        assert_eq!(object_name(&app("web_1"), Object::Upstream), "keter_web__1");
        assert_eq!(object_name(&app("web.1"), Object::Upstream), "keter_web_d1");
        // Case, which Nginx ignores in upstream and variable names.
        assert_eq!(object_name(&app("shop"), Object::Upstream), "keter_shop");
        assert_eq!(object_name(&app("Shop"), Object::Upstream), "keter__ushop");
        assert_eq!(
            object_name(&app("Shop"), Object::Zone(1)),
            "keter__ushop_rl1"
        );
        assert_eq!(
            object_name(&app("shop"), Object::Variable(2)),
            "keter_shop_rl2"
        );
        let tricky: Vec<String> = [
            "web", "web-1", "web_1", "web.1", "Web", "WEB", "web-2", "web1", "shop", "Shop",
            "SHOP", "sHoP", "a-b", "a_b", "a.b", "a__b", "a_hb", "a_db", "a-hb", "a--b", "a-.b",
            "a.-b", "a_-b", "a-_b", "_u", "U", "u", "_", "__", "_uu", "x_rl1", "x-rl1", "x_1",
            "x-1", "rl1", "r", "R", "9", "0_", "hello", "keter", "keter_", "keter-",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        check_all(&tricky);
    }

    /// Names made of the characters the encoding and its suffixes use, in every mix: a
    /// collision would need two of them.
    #[test]
    fn many_generated_names_never_share_a_name() {
        const ALPHABET: &[u8] = b"abdhlruxz019_-.ABDHLRUZ";
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut names: HashSet<String> = HashSet::new();
        while names.len() < 20_000 {
            let len = match next() % 10 {
                0 => 1 + (next() % 100) as usize,
                _ => 1 + (next() % 8) as usize,
            };
            let name: String = (0..len)
                .map(|_| ALPHABET[(next() % ALPHABET.len() as u64) as usize] as char)
                .collect();
            if AppName::new(&name).is_ok() {
                names.insert(name);
            }
        }
        let names: Vec<String> = names.into_iter().collect();
        check_all(&names);
    }
}
