//! The command line: parses the arguments and hands over to a mode —
//! `aion-connector [CONFIG]` serves push mode (the Node original's CLI,
//! [`crate::serve`]), `poll` runs poll mode ([`crate::poll`]), `lease` wraps a
//! command in Aion leases ([`crate::lease::wrap`]), `mcp` is the agents' MCP
//! server ([`crate::mcp`]), `doctor` checks the machine ([`crate::doctor`]);
//! `check [CONFIG]` validates a config here.

use crate::config::{self, DEFAULT_CONFIG};
use crate::doctor::Level;
use crate::error::Error;
use crate::version::VERSION;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

const HELP: &str = "\
aion-connector — serve AI coding agents from this machine (Channel Protocol v1)

Usage:
  aion-connector [CONFIG]          serve push mode (HTTP on the config's host:port)
  aion-connector check [CONFIG]    validate CONFIG and name every problem
  aion-connector check --dirs [CONFIG]
                                   print each project's directory (absolute;
                                   relative ones from here), one a line
  aion-connector fingerprint [CONFIG]
                                   print the SHA-256 fingerprint of the TLS
                                   certificate CONFIG serves (generating the
                                   self-signed one if needed)
  aion-connector doctor [--unit FILE] [CONFIG]
                                   check this machine for serving CONFIG: one
                                   line per check, OK/WARN/FAIL and the fix
  aion-connector status [CONFIG] [--json]
                                   the running connector's runs, terminals,
                                   background processes (poll mode: sessions),
                                   outbox backlog and leases (exit 3: none runs
                                   on CONFIG's state dir); CONFIG may be poll
                                   mode's config file
  aion-connector poll [--config FILE]
                                   poll mode: take instructions from a server
  aion-connector lease --app KEY [--app KEY…] [--seconds N] [--socket PATH]
                       [--holder ID] [--name NAME] -- CMD [ARGS…]
                                   hold Aion leases on apps while CMD runs
  aion-connector mcp               MCP server on stdio for an agent of a run
                                   (started by acpx through .acpxrc.json)
  aion-connector --help | --version

CONFIG defaults to ./aion.config.json. If it is not given and that file does
not exist, a starter config (fresh token, mode 0600) is written there and
served on 127.0.0.1:7777.

Options:
  -h, --help       print this help and exit
  -V, --version    print the version and exit

Exit status: 0 ok (or stopped by SIGINT/SIGTERM), 1 runtime error,
2 usage or config error, 3 (status) no connector running. See aion-connector(1).
";

const POLL_HELP: &str = "\
aion-connector poll — run agent sessions for a server that cannot reach this machine

Usage:
  aion-connector poll [--config FILE]

Options:
  -c, --config FILE   JSON config (default ./config.json; optional if the
                      environment has SERVER_URL and AGENT_TOKEN)
  -h, --help          print this help and exit
  -V, --version       print the version and exit

Settings (file key / environment variable, the environment wins):
  serverUrl / SERVER_URL                          required
  agentToken / AGENT_TOKEN                        required
  pollInterval / POLL_INTERVAL                    ms, default 5000
  outputFlushInterval / OUTPUT_FLUSH_INTERVAL     ms, default 1000
  maxConcurrentSessions / MAX_CONCURRENT_SESSIONS default 5
  statusInterval / STATUS_INTERVAL                ms, default 30000
  sessionCommand / AION_SESSION_COMMAND           argv as a JSON array, default
      [\"claude\",\"-p\",\"--input-format\",\"stream-json\",\"--output-format\",\"stream-json\",\"--verbose\"]
  stateDir / AION_STATE_DIR                       undelivered output waits here;
                                                  poll.sock answers `status`
  deliverySeconds / DELIVERY_SECONDS              retry window, default 86400

See aion-connector(1), POLL MODE.
";

const MCP_HELP: &str = "\
aion-connector mcp — the MCP server of an agent run (stdio, JSON-RPC 2.0 lines)

Usage:
  aion-connector mcp

acpx starts it for the agent from the `aion` entry the connector writes into
the project's .acpxrc.json. Tools: run_background, check_background,
stop_background, display_set, display_clear. Each tool call goes to the
connector on its local socket; the background processes are the connector's.

Environment (set by the .acpxrc.json entry):
  AION_CONNECTOR_SOCKET   the connector's socket (<stateDir>/mcp.sock)
  AION_PROJECT            the project id
  AION_MCP_KEY            the project's MCP key
  AION_SESSION_ID, AION_CALLBACK, AION_TOKEN
                          the run's session, callback URL and callback token
                          (display_set, display_clear)

See aion-connector(1), MCP SERVER.
";

pub fn run(args: Vec<OsString>) -> Result<i32, Error> {
    let args: Vec<String> = args
        .into_iter()
        .map(|a| a.into_string().map_err(|a| Error::Usage(format!("argument {a:?} is not UTF-8"))))
        .collect::<Result<_, _>>()?;
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["-h" | "--help" | "help", ..] => {
            print!("{HELP}");
            Ok(0)
        }
        ["-V" | "--version", ..] => {
            println!("aion-connector {}", VERSION);
            Ok(0)
        }
        ["check"] => check(Path::new(DEFAULT_CONFIG)),
        ["check", path] if !path.starts_with('-') => check(Path::new(path)),
        ["check", "--dirs"] => dirs(Path::new(DEFAULT_CONFIG)),
        ["check", "--dirs", path] if !path.starts_with('-') => dirs(Path::new(path)),
        ["check", ..] => Err(Error::Usage("usage: aion-connector check [--dirs] [CONFIG]".into())),
        ["fingerprint"] => fingerprint(Path::new(DEFAULT_CONFIG)),
        ["fingerprint", path] if !path.starts_with('-') => fingerprint(Path::new(path)),
        ["fingerprint", ..] => Err(Error::Usage("usage: aion-connector fingerprint [CONFIG]".into())),
        ["doctor", rest @ ..] => crate::doctor::run(rest),
        ["status", rest @ ..] => crate::report::run(rest),
        ["poll", rest @ ..] => poll(rest),
        ["lease", rest @ ..] => crate::lease::wrap::run(rest),
        ["mcp", "-h" | "--help"] => {
            print!("{MCP_HELP}");
            Ok(0)
        }
        ["mcp"] => crate::mcp::run(),
        ["mcp", ..] => Err(Error::Usage("usage: aion-connector mcp (it takes no arguments)".into())),
        [] => crate::serve::run(None),
        [path] if !path.starts_with('-') => crate::serve::run(Some(PathBuf::from(path))),
        [flag] => Err(Error::Usage(format!("unknown option {flag}"))),
        _ => Err(Error::Usage("too many arguments".into())),
    }
}

fn poll(args: &[&str]) -> Result<i32, Error> {
    let mut config: Option<PathBuf> = None;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match *arg {
            "-h" | "--help" => {
                print!("{POLL_HELP}");
                return Ok(0);
            }
            "-V" | "--version" => {
                println!("aion-connector {}", VERSION);
                return Ok(0);
            }
            "-c" | "--config" => match rest.next() {
                Some(path) => config = Some(PathBuf::from(path)),
                None => return Err(Error::Usage("--config needs a FILE".into())),
            },
            other => match other.strip_prefix("--config=") {
                Some(path) => config = Some(PathBuf::from(path)),
                None => return Err(Error::Usage(format!("poll: unknown argument {other}"))),
            },
        }
    }
    let shutdown = crate::shutdown::install().map_err(|source| Error::Io { what: "signal setup", source })?;
    let config = crate::poll::config::load(config.as_deref(), &|k| std::env::var(k).ok())?;
    crate::poll::run(config, shutdown)
}

/// `check --dirs`: each project's directory, as serving resolves it, one a
/// line on stdout (for install.sh, which finds those the service must be
/// allowed to write); a directory whose name has a line break is refused.
fn dirs(path: &Path) -> Result<i32, Error> {
    let (config, _) = config::load(path)?;
    let mut out = String::new();
    for p in &config.projects {
        let dir = p.dir.to_str().filter(|d| !d.contains(['\n', '\r'])).ok_or_else(|| Error::Config {
            path: path.to_path_buf(),
            problems: vec![format!("projects.{}.dir: not one line of UTF-8", p.id)],
        })?;
        out.push_str(dir);
        out.push('\n');
    }
    print!("{out}");
    Ok(0)
}

/// `tls fingerprint sha256:<hex>`, as serving prints it.
fn fingerprint(path: &Path) -> Result<i32, Error> {
    let (config, _) = config::load(path)?;
    let state = crate::serve::state_dir(&config)?;
    match crate::serve::tls(&config, path, &state)? {
        Some(tls) => {
            println!("tls fingerprint {}", tls.fingerprint());
            Ok(0)
        }
        None => Err(Error::Config {
            path: path.to_path_buf(),
            problems: vec!["tls: missing (the port serves plain HTTP: no fingerprint)".into()],
        }),
    }
}

fn check(path: &Path) -> Result<i32, Error> {
    let (config, warnings) = config::load(path)?;
    for w in &warnings {
        eprintln!("warning: {}: {w}", path.display());
    }
    for w in config::advice(path, &config) {
        eprintln!("warning: {w}");
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    for f in crate::doctor::tools::findings(&config, &path_var) {
        match (f.level, f.topic) {
            (Level::Ok, "acpx") => eprintln!("note: {}", f.text),
            (Level::Ok | Level::Skip, _) => {}
            (_, _) => eprintln!("note: {} ({})", f.text, f.fix.as_deref().unwrap_or("")),
        }
    }
    println!("ok: {}: {} project(s)", path.display(), config.projects.len());
    Ok(0)
}
