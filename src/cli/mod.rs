//! The command line in two stages: what the user typed becomes a [`Command`] ([`parse`]), and
//! the commands other than the daemon itself run here ([`run`]); `main` only chooses the exit
//! code's source. The README's "Running keter" lists the commands.

mod commands;
pub mod help;
pub mod rollout;

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::DEFAULT_CONFIG_PATH;

/// A command line, understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Run the daemon with this configuration (or root folder).
    Run(PathBuf),
    Check {
        path: PathBuf,
        config: Option<PathBuf>,
    },
    Render {
        bundle: PathBuf,
        config: Option<PathBuf>,
    },
    Bundle {
        dir: PathBuf,
        out: Option<PathBuf>,
    },
    Status {
        config: PathBuf,
        json: bool,
    },
    /// Deploy a bundle, or roll an app back, on several hosts over SSH.
    Rollout(rollout::Plan),
    /// Ask the running daemon over its control socket (`keter restart`, `rollback`,
    /// `releases`).
    Ask {
        request: crate::control::Request,
        config: PathBuf,
        json: bool,
    },
    /// Print a help text (on stdout) and exit 0.
    Help(&'static str),
    Version,
}

/// A command line that does not parse: the message and the help text to show with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub message: String,
    pub help: &'static str,
}

impl Usage {
    fn new(message: impl Into<String>, help: &'static str) -> Usage {
        Usage {
            message: message.into(),
            help,
        }
    }
}

fn help_of(command: &str) -> Option<&'static str> {
    Some(match command {
        "run" => help::RUN,
        "check" => help::CHECK,
        "render" => help::RENDER,
        "bundle" => help::BUNDLE,
        "status" => help::STATUS,
        "deploy" => help::DEPLOY,
        "restart" => help::RESTART,
        "rollback" => help::ROLLBACK,
        "releases" => help::RELEASES,
        "maintenance" => help::MAINTENANCE,
        "help" => help::MAIN,
        _ => return None,
    })
}

/// Understands the arguments after the program name.
pub fn parse(args: &[String]) -> Result<Command, Usage> {
    let Some((first, rest)) = args.split_first() else {
        return Err(Usage::new("keter needs a command or a config", help::MAIN));
    };
    match first.as_str() {
        "-h" | "--help" => return Ok(Command::Help(help::MAIN)),
        "-V" | "--version" => return Ok(Command::Version),
        "help" => {
            return match rest {
                [] => Ok(Command::Help(help::MAIN)),
                [topic] => help_of(topic)
                    .map(Command::Help)
                    .ok_or_else(|| Usage::new(format!("no command {topic:?}"), help::MAIN)),
                _ => Err(Usage::new("keter help takes one command", help::MAIN)),
            };
        }
        _ => {}
    }
    let Some(help) = help_of(first) else {
        return match rest {
            [] if !first.starts_with('-') => Ok(Command::Run(PathBuf::from(first))),
            _ => Err(Usage::new(
                format!("unrecognised arguments: {}", args.join(" ")),
                help::MAIN,
            )),
        };
    };
    if first == "deploy" {
        return match rollout::parse_deploy(rest) {
            Ok(Some(plan)) => Ok(Command::Rollout(plan)),
            Ok(None) => Ok(Command::Help(help)),
            Err(message) => Err(Usage::new(message, help)),
        };
    }
    // `keter rollback NAME [RELEASE] --hosts ...`: the same engine and options as `keter
    // deploy`; without them, the one-host command below.
    if first == "rollback" && rest.iter().any(|a| rollout::is_hosts_option(a)) {
        return match rollout::parse_rollback(rest) {
            Ok(Some(plan)) => Ok(Command::Rollout(plan)),
            Ok(None) => Ok(Command::Help(help)),
            Err(message) => Err(Usage::new(message, help)),
        };
    }
    if first == "maintenance" {
        return parse_maintenance(rest, help);
    }
    let opts = Options::parse(rest, help)?;
    if opts.help {
        return Ok(Command::Help(help));
    }
    let usage = |m: &str| Err(Usage::new(m, help));
    let one = |opts: &Options| match opts.positional.as_slice() {
        [p] => Some(PathBuf::from(p)),
        _ => None,
    };
    match first.as_str() {
        "run" => match (opts.positional.as_slice(), opts.any_option()) {
            ([], false) => Ok(Command::Run(PathBuf::from(DEFAULT_CONFIG_PATH))),
            ([path], false) => Ok(Command::Run(PathBuf::from(path))),
            _ => usage("keter run takes at most one CONFIG"),
        },
        "check" => match (one(&opts), opts.out.is_some() || opts.json) {
            (Some(path), false) => Ok(Command::Check {
                path,
                config: opts.config,
            }),
            _ => usage("keter check takes one PATH and optionally -c CONFIG"),
        },
        "render" => match (one(&opts), opts.out.is_some() || opts.json) {
            (Some(bundle), false) => Ok(Command::Render {
                bundle,
                config: opts.config,
            }),
            _ => usage("keter render takes one BUNDLE and optionally -c CONFIG"),
        },
        "bundle" => match (one(&opts), opts.config.is_some() || opts.json) {
            (Some(dir), false) => Ok(Command::Bundle { dir, out: opts.out }),
            _ => usage("keter bundle takes one DIR and optionally -o OUT.keter"),
        },
        "status" => match (opts.positional.is_empty(), opts.out.is_some()) {
            (true, false) => Ok(Command::Status {
                config: opts
                    .config
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH)),
                json: opts.json,
            }),
            _ => usage("keter status takes only -c CONFIG and --json"),
        },
        "restart" | "rollback" | "releases" => {
            use crate::control::Request;
            let config = opts
                .config
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
            let ask = |request| {
                Ok(Command::Ask {
                    request,
                    config: config.clone(),
                    json: opts.json,
                })
            };
            match (
                first.as_str(),
                opts.positional.as_slice(),
                opts.out.is_some(),
            ) {
                ("restart", [app], false) if !opts.json => {
                    ask(Request::Restart { app: app.clone() })
                }
                ("restart", ..) => usage("keter restart takes one NAME and optionally -c CONFIG"),
                ("rollback", [app], false) if !opts.json => ask(Request::Rollback {
                    app: app.clone(),
                    release: None,
                }),
                ("rollback", [app, n], false) if !opts.json => match n.parse() {
                    Ok(n) => ask(Request::Rollback {
                        app: app.clone(),
                        release: Some(n),
                    }),
                    Err(_) => usage(
                        "RELEASE is a release's number, as keter releases shows it (a sha256 \
                         with --hosts)",
                    ),
                },
                ("rollback", ..) => {
                    usage("keter rollback takes one NAME, optionally a RELEASE and -c CONFIG")
                }
                ("releases", [app], false) => ask(Request::Releases { app: app.clone() }),
                _ => usage("keter releases takes one NAME, optionally --json and -c CONFIG"),
            }
        }
        _ => usage("unknown command"),
    }
}

/// `keter maintenance NAME on [--message TEXT] | off [-c CONFIG]`.
fn parse_maintenance(args: &[String], help: &'static str) -> Result<Command, Usage> {
    let usage = || {
        Err(Usage::new(
            "keter maintenance takes NAME on [--message TEXT] or NAME off, and optionally -c CONFIG",
            help,
        ))
    };
    let mut positional = Vec::new();
    let (mut message, mut config) = (None, None);
    let mut args = args.iter();
    while let Some(a) = args.next() {
        match a.as_str() {
            "-h" | "--help" => return Ok(Command::Help(help)),
            "-m" | "--message" => match args.next() {
                Some(m) => message = Some(m.clone()),
                None => return usage(),
            },
            "-c" | "--config" => match args.next() {
                Some(c) => config = Some(PathBuf::from(c)),
                None => return usage(),
            },
            _ if a.starts_with("--message=") => message = Some(a["--message=".len()..].into()),
            _ if a.starts_with('-') => return usage(),
            _ => positional.push(a.clone()),
        }
    }
    let on = match positional.as_slice() {
        [_, s] if s == "on" => true,
        [_, s] if s == "off" && message.is_none() => false,
        _ => return usage(),
    };
    Ok(Command::Ask {
        request: crate::control::Request::Maintenance {
            app: positional[0].clone(),
            on,
            message,
        },
        config: config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH)),
        json: false,
    })
}

/// Runs a command other than the daemon; returns the exit code.
pub fn run(command: Command) -> ExitCode {
    match command {
        Command::Check { path, config } => commands::check(&path, config.as_deref()),
        Command::Render { bundle, config } => commands::render(&bundle, config.as_deref()),
        Command::Bundle { dir, out } => commands::bundle(&dir, out.as_deref()),
        Command::Status { config, json } => commands::status(&config, json),
        Command::Rollout(plan) => rollout::run(&plan),
        Command::Ask {
            request,
            config,
            json,
        } => commands::ask(&config, &request, json),
        Command::Help(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Command::Version => {
            println!("keter {}", crate::build::VERSION);
            ExitCode::SUCCESS
        }
        Command::Run(_) => {
            eprintln!("keter: the daemon is started by main");
            ExitCode::from(2)
        }
    }
}

/// The options every command may be given; each command says which it accepts.
#[derive(Debug, Default)]
struct Options {
    positional: Vec<String>,
    config: Option<PathBuf>,
    out: Option<PathBuf>,
    json: bool,
    help: bool,
}

impl Options {
    fn parse(args: &[String], help: &'static str) -> Result<Options, Usage> {
        let mut o = Options::default();
        let mut args = args.iter();
        while let Some(a) = args.next() {
            let mut value = |name: &str| {
                args.next()
                    .map(PathBuf::from)
                    .ok_or_else(|| Usage::new(format!("{name} needs a value"), help))
            };
            match a.as_str() {
                "-h" | "--help" => o.help = true,
                "--json" => o.json = true,
                "-c" | "--config" => o.config = Some(value(a)?),
                "-o" | "--output" => o.out = Some(value(a)?),
                _ if a.starts_with("--config=") => {
                    o.config = Some(PathBuf::from(&a["--config=".len()..]))
                }
                _ if a.starts_with("--output=") => {
                    o.out = Some(PathBuf::from(&a["--output=".len()..]))
                }
                "--" => o.positional.extend(args.by_ref().cloned()),
                _ if a.starts_with('-') && a.len() > 1 => {
                    return Err(Usage::new(format!("unknown option {a}"), help));
                }
                _ => o.positional.push(a.clone()),
            }
        }
        Ok(o)
    }

    fn any_option(&self) -> bool {
        self.config.is_some() || self.out.is_some() || self.json
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(line: &str) -> Result<Command, Usage> {
        let args: Vec<String> = line.split_whitespace().map(String::from).collect();
        parse(&args)
    }

    #[test]
    fn parses_every_command() {
        assert_eq!(p("/etc/k.yaml"), Ok(Command::Run("/etc/k.yaml".into())));
        assert_eq!(p("run"), Ok(Command::Run(DEFAULT_CONFIG_PATH.into())));
        assert_eq!(
            p("check a.keter"),
            Ok(Command::Check {
                path: "a.keter".into(),
                config: None
            })
        );
        assert_eq!(
            p("check ./app -c k.yaml"),
            Ok(Command::Check {
                path: "./app".into(),
                config: Some("k.yaml".into())
            })
        );
        assert_eq!(
            p("render a.keter -c k.yaml"),
            Ok(Command::Render {
                bundle: "a.keter".into(),
                config: Some("k.yaml".into())
            })
        );
        assert_eq!(
            p("bundle dir --output=x.keter"),
            Ok(Command::Bundle {
                dir: "dir".into(),
                out: Some("x.keter".into())
            })
        );
        assert_eq!(
            p("status --json"),
            Ok(Command::Status {
                config: DEFAULT_CONFIG_PATH.into(),
                json: true
            })
        );
        assert_eq!(p("--version"), Ok(Command::Version));
    }

    #[test]
    fn help_for_each_command() {
        assert_eq!(p("help render"), Ok(Command::Help(help::RENDER)));
        assert_eq!(p("bundle --help"), Ok(Command::Help(help::BUNDLE)));
        assert_eq!(p("status -h"), Ok(Command::Help(help::STATUS)));
        assert_eq!(p("--help"), Ok(Command::Help(help::MAIN)));
        for text in [
            help::RUN,
            help::CHECK,
            help::RENDER,
            help::BUNDLE,
            help::STATUS,
            help::DEPLOY,
        ] {
            assert!(text.contains("Examples:"), "{text}");
        }
    }

    #[test]
    fn refuses_what_it_does_not_understand() {
        assert!(p("").is_err());
        assert!(p("check").is_err());
        assert!(p("check a b").is_err());
        assert!(p("render a.keter -o x").is_err());
        assert_eq!(p("status -x").unwrap_err().help, help::STATUS);
        assert!(p("bundle dir -o").is_err());
        assert!(p("help nothing").is_err());
        assert!(p("-q").is_err());
    }

    #[test]
    fn rollback_on_one_host_or_on_several() {
        use crate::control::Request;
        assert_eq!(
            p("rollback shop 3"),
            Ok(Command::Ask {
                request: Request::Rollback {
                    app: "shop".into(),
                    release: Some(3),
                },
                config: DEFAULT_CONFIG_PATH.into(),
                json: false,
            })
        );
        let Ok(Command::Rollout(plan)) = p("rollback shop --hosts web1,web2 --json") else {
            panic!("not a rollout")
        };
        assert_eq!(
            plan.action,
            rollout::Action::Rollback {
                app: "shop".into(),
                sha256: None
            }
        );
        assert_eq!(plan.hosts, ["web1", "web2"]);
        assert!(plan.json);
        // Across hosts RELEASE is a sha256 prefix, never a number that differs per host.
        let Ok(Command::Rollout(plan)) = p("rollback shop 1A2B3C4D5E --hosts=web1") else {
            panic!("not a rollout")
        };
        assert_eq!(
            plan.action,
            rollout::Action::Rollback {
                app: "shop".into(),
                sha256: Some("1a2b3c4d5e".into())
            }
        );
        let e = p("rollback shop 3 --hosts web1").unwrap_err();
        assert!(
            e.message.contains("sha256") && e.message.contains("host to host"),
            "{e:?}"
        );
        assert_eq!(e.help, help::ROLLBACK);
        assert!(
            p("rollback shop --parallel 2")
                .unwrap_err()
                .message
                .contains("--hosts")
        );
        assert!(p("rollback ../x --hosts web1").is_err());
        assert!(p("rollback shop 1a2b3c4d web1 --hosts web2").is_err());
        assert_eq!(
            p("rollback --hosts web1 --help"),
            Ok(Command::Help(help::ROLLBACK))
        );
    }
}
