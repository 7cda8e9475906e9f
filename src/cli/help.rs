//! The `--help` texts: one overview and one per command, each with examples.

/// `keter --help`.
pub const MAIN: &str = "\
keter: deploys web application bundles behind Nginx, with zero-downtime redeploys.

Usage:
  keter CONFIG                       run the daemon in the foreground (CONFIG: keter-config.yaml
                                     or a root folder)
  keter run [CONFIG]                 the same; CONFIG defaults to /etc/keter/keter-config.yaml
  keter check PATH [-c CONFIG]       validate a global config, a bundle (NAME.keter) or a bundle
                                     folder; print every problem with its file and key
  keter render BUNDLE [-c CONFIG]    print the Nginx file a bundle would get, without deploying
  keter bundle DIR [-o OUT.keter]    validate a bundle folder and pack it
  keter status [-c CONFIG] [--json]  show the apps of the running daemon
  keter restart NAME [-c CONFIG]     fresh processes of an app's serving version, switched in
                                     as a deploy is (root and deployers)
  keter rollback NAME [RELEASE]      deploy the previous (or the named) release again
  keter rollback NAME [SHA256] --hosts HOST[,HOST...] [--parallel N] [--json]
                                     the same on several keter hosts over SSH, one after another
  keter releases NAME [--json]       list an app's releases
  keter maintenance NAME on|off      answer an app's hosts with 503 and a page, or stop
  keter deploy BUNDLE --hosts HOST[,HOST...] [--parallel N] [--json]
                                     roll a bundle out to several keter hosts over SSH
  keter help COMMAND                 help on one command (also: keter COMMAND --help)
  keter --version                    print the version

Deploy an app by copying NAME.keter into ROOT/incoming/; copy a new version over it to
redeploy; delete it to stop the app. SIGHUP rescans incoming/, SIGTERM or SIGINT stops
every app and exits. RUST_LOG sets the log level (default info). The status web interface
listens on the config's `status` address (default http://127.0.0.1:4080/).

Examples:
  keter /opt/keter/etc/keter-config.yaml
  keter check myapp.keter
  keter bundle ./myapp -o /opt/keter/incoming/myapp.keter
  keter status
  keter restart myapp
";

/// `keter run --help`.
pub const RUN: &str = "\
keter run [CONFIG]: run the daemon in the foreground.

CONFIG is a keter-config.yaml (default /etc/keter/keter-config.yaml) or a root folder, in
which case every default applies. `keter CONFIG` is the same (Keter's form). keter logs to
stderr; SIGHUP rescans incoming/, SIGTERM or SIGINT stops every app and Nginx and exits.

Examples:
  keter run
  keter run /opt/keter/etc/keter-config.yaml
  RUST_LOG=debug keter /srv/keter
";

/// `keter check --help`.
pub const CHECK: &str = "\
keter check PATH [-c CONFIG]: validate without running anything.

PATH is a global configuration (keter-config.yaml), a bundle file (NAME.keter) or a bundle
folder (one holding config/keter.yaml). Every problem is printed with its file and key, for
example:
  error: hello.keter: config/keter.yaml: stanzas[0].hosts[1]: the host name \"evil.com;}\" is not valid ...
Warnings (unknown keys, keys keter reads differently from Keter) are printed too but do not
fail.

A bundle is checked as a deploy on this host checks it, against CONFIG (default
/etc/keter/keter-config.yaml when it exists, else keter's defaults): executables,
certificates (the files exist and the key belongs to the certificate) and static roots (in
the bundle or under allowed-static-roots). Run it where the bundle will be deployed, as the
user keter runs as, for the same verdict.

Exit status: 0 when there is no error, 1 when there is any.

Examples:
  keter check /etc/keter/keter-config.yaml
  keter check myapp.keter
  keter check ./myapp -c /opt/keter/etc/keter-config.yaml
";

/// `keter render --help`.
pub const RENDER: &str = "\
keter render BUNDLE [-c CONFIG]: print the Nginx file BUNDLE would get, without deploying.

BUNDLE is a NAME.keter file (unpacked into a temporary folder, with the same checks as a
deploy) or a bundle folder. The listeners, timeouts and health check path come from CONFIG
(default /etc/keter/keter-config.yaml when it exists, else keter's defaults). The upstream
ports are placeholders taken from the start of port-range, since keter picks free ports only
when it deploys; a comment at the top of the output says so.

Exit status: 0 when the file was rendered, 1 when the bundle or the config has errors.

Examples:
  keter render myapp.keter
  keter render ./myapp -c /etc/keter/keter-config.yaml
";

/// `keter bundle --help`.
pub const BUNDLE: &str = "\
keter bundle DIR [-o OUT.keter]: validate a bundle folder and pack it into a bundle file.

DIR must hold config/keter.yaml. It is checked like `keter check DIR` first, and a folder
with any error is not packed; what only the deployment host has (absolute executables and
certificate paths, static roots outside the bundle) is left to that host, with a warning. The bundle is a gzip-compressed tar of DIR's files, folders and
symlinks (sorted, owned by root, so the same folder gives the same bundle); OUT defaults to
DIRNAME.keter in the current folder and must be named NAME.keter with a valid app name. The
file is written under a hidden name and renamed into place, so OUT may be in incoming/.

Exit status: 0 when the bundle was written, 1 otherwise.

Examples:
  keter bundle ./myapp
  keter bundle ./myapp -o /opt/keter/incoming/myapp.keter
";

/// `keter status --help`.
pub const STATUS: &str = "\
keter status [-c CONFIG] [--json]: show the apps of the running daemon.

Reads the daemon's JSON API (/api/apps) at the `status` address of CONFIG (default
/etc/keter/keter-config.yaml; a TCP address or a unix socket) and prints one line per app:
state, sha256 of the serving bundle, ports, pids, uptime, restarts, last deploy and hosts,
then each app's last error. --json prints the API's answer instead.

Exit status: 0 when the daemon answered, 1 when it could not be reached.

Examples:
  keter status
  keter status -c /opt/keter/etc/keter-config.yaml --json
";

/// `keter restart --help`.
pub const RESTART: &str = "\
keter restart NAME [-c CONFIG]: restart an app without a failed request.

Asks the daemon running on the root of CONFIG (default /etc/keter/keter-config.yaml) over its
control socket ROOT/control.sock to deploy the app's serving bundle again: fresh processes
of every webapp and background stanza start on new ports, answer their health checks, and
Nginx switches to them; the old ones drain and stop, as at any deploy. Waits until the new
processes serve (or the restart failed, and the old ones go on serving) and prints how it
ended. Touching the bundle in incoming/ does not restart an app (the same content is not
deployed again); this command does.

Root and the deployers (the members of the group that may write ROOT/incoming/, the
package's `keter` group) may use it; apps are refused. The daemon logs each request with the
uid that asked.

Exit status: 0 restarted; 1 not restarted (no such app, nothing serves, a deploy is under
way, the new processes failed their check) or the daemon could not be reached.

Examples:
  keter restart blog
  keter restart blog -c /opt/keter/etc/keter-config.yaml
";

/// `keter rollback --help`.
pub const ROLLBACK: &str = "\
keter rollback NAME [RELEASE] [-c CONFIG]: deploy an earlier release of an app again.

Asks the daemon running on the root of CONFIG (default /etc/keter/keter-config.yaml) over its
control socket to put the kept bundle of RELEASE (a number keter releases shows; by default
the release before the serving one, skipping releases that were rolled back) in
ROOT/incoming/NAME.keter and deploy it, with the same readiness check and switch as any
deploy: no request fails. incoming/ stays the source of truth, so a SIGHUP or keter started
again keeps the rolled-back release; the release it replaced is marked rolled-back, and
copying that bundle in again deploys it again. Waits until the release serves (or the deploy
failed, and the serving one goes on) and prints how it ended.

Root and the deployers may use it; apps are refused. Exit status: 0 rolled back; 1 not.

keter rollback NAME [SHA256] --hosts HOST[,HOST...] [--parallel N] [--timeout SECONDS]
               [-c CONFIG] [--json]: the same on several keter hosts, one after another.

As keter deploy --hosts (same hosts, options, KETER_SSH_COMMAND, progress, table, --json and
exit status; see keter deploy --help): for each host in the order given, ssh reads the
app's releases there (keter releases NAME --json -c CONFIG) and runs the host's keter
rollback NAME N with the release chosen by that host's own list: the release before the one
it serves, as keter rollback NAME there would choose. Across hosts a release is named by its
bundle's sha256, or its first 8 or more hex digits (as keter releases shows it), never by
its number, which differs from host to host: each host goes to its newest release of that
bundle, and a host already serving it is left as it is (so a rollback that stopped can be
run again with the sha256 the first hosts went to). Then waits until the host's keter
status reports that bundle serving, then the next host. A host with no earlier release (or
none of that sha256), whose rollback fails, that does not serve it within --timeout, or
that SSH cannot reach stops the rollback: no later host is touched.

Exit status: 0 when every host serves its release, 3 when a host failed and the rollback
stopped.

Examples:
  keter rollback blog
  keter rollback blog 3
  keter rollback shop --hosts web1,web2,web3
  keter rollback shop 1a2b3c4d5e6f --hosts web1,web2,web3 --json
";

/// `keter maintenance --help`.
pub const MAINTENANCE: &str = "\
keter maintenance NAME on [--message TEXT] | off [-c CONFIG]: put an app in maintenance.

On: Nginx answers every request for the app's hosts (but ACME's challenges) with 503
Service Unavailable, Retry-After: 60 and a page with TEXT (shown as text, HTML-escaped);
the app keeps running, so a database migration can run meanwhile. Off: Nginx routes to the
app again. Kept across keter restarts and upgrades, and across deploys until turned off;
shown in keter status and /api/apps/NAME (maintenance). Waits until Nginx runs the change.

Root and the deployers may use it; apps are refused. Exit status: 0 done; 1 not.

Examples:
  keter maintenance blog on --message 'Back at 14:00 UTC'
  keter maintenance blog off
";

/// `keter releases --help`.
pub const RELEASES: &str = "\
keter releases NAME [--json] [-c CONFIG]: list an app's releases.

Every version switched to is a release: its number, the sha256 and size of its bundle (kept
under ROOT/releases/NAME/ for the last keep-releases), when it was deployed and by whom (the
owner of the file in incoming/), and how it ended (replaced, rolled-back,
failed-after-switch). Newest first, then the disk the kept bundles take. --json prints them as
/api/apps/NAME has them.

Root and the deployers may use it; apps are refused.

Examples:
  keter releases blog
  keter releases blog --json
";

/// `keter deploy --help`.
pub const DEPLOY: &str = "\
keter deploy BUNDLE --hosts HOST[,HOST...] [--parallel N] [--timeout SECONDS] [-c CONFIG]
             [--json]: roll a bundle out to several keter hosts over SSH, one after another.

BUNDLE (NAME.keter) is checked here first, as `keter bundle` checks a folder (what only the
hosts have is left to them); with an error nothing is copied. Then, for each host in the
order given: the system's `ssh` (your keys, your ~/.ssh/config; no password prompts) reads
CONFIG on the host (default /etc/keter/keter-config.yaml) for its root, copies the bundle
into ROOT/incoming/ under a hidden name, checks its sha256 there and renames it to
NAME.keter; then waits until the host's `keter status --json` reports that sha256 serving.
A host whose keter fails the deploy, that does not serve it within --timeout (default 300
seconds) or that SSH cannot reach stops the rollout: no later host is touched.

HOST is what ssh takes: NAME, USER@NAME, an alias of ~/.ssh/config or
ssh://[USER@]NAME[:PORT]; repeat --hosts or separate hosts with commas. The user on the host
must be root, or may write incoming/ (the keter group) and read the status interface (adm).
--parallel N deploys to N hosts at a time. KETER_SSH_COMMAND replaces `ssh` (program and
arguments, split on spaces: KETER_SSH_COMMAND='ssh -F deploy-ssh-config').

Progress goes to stderr, one line per host and step, with times; then a table, one line per
host: serving, failed, unreachable or not reached. --json prints the result as JSON instead.

Exit status: 0 when every host serves the bundle, 1 when the bundle has errors (nothing was
copied), 3 when a host failed and the rollout stopped.

keter rollback NAME --hosts ... rolls an app back on the same hosts the same way (keter
rollback --help).

Examples:
  keter deploy shop.keter --hosts web1,web2,web3
  keter deploy shop.keter --hosts deploy@10.0.0.11,deploy@10.0.0.12 --parallel 2 --json
";
