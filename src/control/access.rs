//! Who may use the control socket: root (and keter's own user, when keter does not run as
//! root), and whoever may write `incoming/`, the deployers (the package's `keter` group):
//! what they may ask for (restart an app, ...) is no more than deploying a bundle again. An
//! app's user is refused with the reason, as the status interface refuses it (README
//! "Security").

use std::fmt;

/// What the peer of a connection is, as the kernel tells it (`SO_PEERCRED`,
/// `SO_PEERGROUPS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// The owner, group and mode of `incoming/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Incoming {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

/// Whether a peer may ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed, as what (for the log).
    Allowed(&'static str),
    Refused(String),
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Allowed(what) => f.write_str(what),
            Verdict::Refused(why) => f.write_str(why),
        }
    }
}

/// Decides for `peer`. `own_uid` is keter's own uid; `app` names the app whose user `peer`
/// is, if any; `group_name` names `incoming/`'s group for the messages.
pub fn judge(
    peer: &Peer,
    own_uid: u32,
    app: Option<String>,
    incoming: Option<Incoming>,
    group_name: &str,
) -> Verdict {
    if peer.uid == 0 {
        return Verdict::Allowed("root");
    }
    if peer.uid == own_uid {
        return Verdict::Allowed("keter's own user");
    }
    if let Some(what) = app {
        return Verdict::Refused(format!(
            "keter's control socket answers root and deployers, not apps: uid {} is {what}",
            peer.uid
        ));
    }
    if let Some(inc) = incoming {
        if inc.uid == peer.uid && inc.mode & 0o200 != 0 {
            return Verdict::Allowed("the owner of incoming/");
        }
        let member = peer.gid == inc.gid || peer.groups.contains(&inc.gid);
        if inc.mode & 0o020 != 0 && member {
            return Verdict::Allowed("a deployer (may write incoming/)");
        }
    }
    Verdict::Refused(format!(
        "uid {} may not deploy: keter's control socket answers root and the members of group \
         {group_name}, who may write incoming/",
        peer.uid
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INCOMING: Incoming = Incoming {
        uid: 0,
        gid: 990,
        mode: 0o2770,
    };

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer {
            uid,
            gid,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn root_and_deployers_are_allowed() {
        let j = |p: &Peer| judge(p, 0, None, Some(INCOMING), "keter");
        assert_eq!(j(&peer(0, 0, &[])), Verdict::Allowed("root"));
        assert!(matches!(
            j(&peer(1000, 1000, &[27, 990])),
            Verdict::Allowed(_)
        ));
        assert!(matches!(j(&peer(1000, 990, &[])), Verdict::Allowed(_)));
    }

    #[test]
    fn others_and_apps_are_refused_with_the_reason() {
        let v = judge(&peer(1000, 1000, &[4]), 0, None, Some(INCOMING), "keter");
        assert!(
            matches!(&v, Verdict::Refused(m) if m.contains("uid 1000 may not deploy") && m.contains("group keter")),
            "{v:?}"
        );
        // An app's user is refused even if it were in the group.
        let v = judge(
            &peer(65601, 990, &[990]),
            0,
            Some("the user of the app blog".into()),
            Some(INCOMING),
            "keter",
        );
        assert!(
            matches!(&v, Verdict::Refused(m) if m.contains("not apps: uid 65601 is the user of the app blog")),
            "{v:?}"
        );
    }

    #[test]
    fn a_group_that_may_not_write_incoming_is_no_deployer() {
        let read_only = Incoming {
            mode: 0o2750,
            ..INCOMING
        };
        let v = judge(&peer(1000, 990, &[990]), 0, None, Some(read_only), "keter");
        assert!(matches!(v, Verdict::Refused(_)), "{v:?}");
    }

    #[test]
    fn keters_own_user_is_allowed_when_it_is_not_root() {
        let v = judge(&peer(1000, 1000, &[]), 1000, None, None, "root");
        assert_eq!(v, Verdict::Allowed("keter's own user"));
    }
}
