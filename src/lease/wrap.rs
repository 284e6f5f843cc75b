//! `aion-connector lease --app KEY … -- CMD [ARGS…]`: holds Aion leases on
//! the apps while CMD runs, so anyone's local automation can keep Aion from
//! closing the browser it drives. CMD runs in its own process group (made the
//! terminal's foreground group when we own the terminal, so job control and
//! Ctrl-C reach it as usual); SIGINT, SIGTERM and SIGHUP sent to the wrapper
//! are forwarded to that group; the exit status is CMD's (128+N if killed by
//! signal N). Without an Aion socket CMD still runs, after one warning.
//!
//! Threads: `signals`, the forwarder, started once CMD runs; owner: the
//! wrapper's main thread (which waits for CMD). It takes SIGINT, SIGTERM and
//! SIGHUP with `sigwait` and sends each to CMD's process group. It is never
//! joined: it ends with the process, when the main thread returns CMD's
//! status. If it cannot be started, CMD is sent SIGTERM (the signals would
//! otherwise stay blocked and never reach it). The lease client's own
//! threads are [`super`]'s.

use crate::error::Error;
use crate::lease::{LeaseConfig, Leases};
use crate::logging::info;
use nix::sys::signal::{SigSet, Signal, killpg};
use nix::unistd::Pid;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::time::Duration;

/// How long CMD waits, at most, for its leases to be granted or refused
/// (past it CMD runs and a line says so).
const WAIT: Duration = Duration::from_secs(1);

pub const HELP: &str = "\
aion-connector lease — hold Aion AI-protection leases while a command runs

Usage:
  aion-connector lease --app KEY [--app KEY…] [--seconds N] [--socket PATH]
                       [--holder ID] [--name NAME] -- CMD [ARGS…]

Options:
  --app KEY       an app to protect, e.g. com.google.Chrome (repeatable)
  --seconds N     lease length, 60-1800 (default 300), renewed at half
  --socket PATH   Aion's socket (default: macOS ~/Library/Application Support/
                  Aion/ipc/ai-protection.sock, else $XDG_RUNTIME_DIR/aion/
                  ai-protection.sock)
  --holder ID     holder id (default aion-connector.HOST.lease-PID)
  --name NAME     client name shown by Aion (default aion-connector lease)
  -h, --help      print this help and exit

Exit status: CMD's, 128+N when CMD was killed by signal N, 127 when CMD was
not found, 126 when it could not be run, 2 for a usage error.
";

struct Args {
    apps: Vec<String>,
    seconds: Option<u32>,
    socket: Option<PathBuf>,
    holder: Option<String>,
    name: Option<String>,
    command: Vec<String>,
}

fn parse(args: &[&str]) -> Result<Option<Args>, Error> {
    let usage = |msg: String| Error::Usage(format!("lease: {msg}"));
    let mut a =
        Args { apps: Vec::new(), seconds: None, socket: None, holder: None, name: None, command: Vec::new() };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (*arg, None),
        };
        let mut value = |name: &str| -> Result<String, Error> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => {
                    it.next().map(|v| v.to_string()).ok_or_else(|| usage(format!("{name} needs a value")))
                }
            }
        };
        match flag {
            "-h" | "--help" => return Ok(None),
            "--app" => {
                let key = value("--app")?;
                if key.is_empty() {
                    return Err(usage("--app needs an app key such as com.google.Chrome".into()));
                }
                a.apps.push(key);
            }
            "--seconds" => {
                let raw = value("--seconds")?;
                match raw.parse::<u32>() {
                    Ok(n) if (crate::lease::MIN_SECONDS..=crate::lease::MAX_SECONDS).contains(&n) => {
                        a.seconds = Some(n)
                    }
                    _ => return Err(usage(format!("--seconds must be 60-1800, not {raw:?}"))),
                }
            }
            "--socket" => a.socket = Some(PathBuf::from(value("--socket")?)),
            "--holder" => a.holder = Some(value("--holder")?),
            "--name" => a.name = Some(value("--name")?),
            "--" => {
                a.command = it.map(|s| s.to_string()).collect();
                break;
            }
            other => return Err(usage(format!("unknown option {other} (the command goes after --)"))),
        }
    }
    if a.apps.is_empty() {
        return Err(usage("at least one --app KEY is needed".into()));
    }
    if a.command.is_empty() {
        return Err(usage(
            "no command: put it after --, e.g. lease --app com.google.Chrome -- ./drive.sh".into(),
        ));
    }
    Ok(Some(a))
}

pub fn run(args: &[&str]) -> Result<i32, Error> {
    let Some(args) = parse(args)? else {
        print!("{HELP}");
        return Ok(0);
    };
    // Before any thread: the signals to forward are taken by sigwait, and
    // SIGTTOU is blocked so that handing the terminal back works.
    let mut forwarded = SigSet::empty();
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        forwarded.add(sig);
    }
    let mut blocked = forwarded;
    blocked.add(Signal::SIGTTOU);
    blocked.thread_block().map_err(|e| Error::Io { what: "signal setup", source: e.into() })?;
    // Blocked first, then back to their default action: inherited as ignored
    // (a background job of a script), they could not be waited for.
    crate::process::group::default_stop_signals();
    let holder = args.holder.clone().or_else(|| {
        Some(format!("aion-connector.{}.lease-{}", crate::lease::host_name(), std::process::id()))
    });
    let name = args.name.clone().or_else(|| Some("aion-connector lease".into()));
    let leases = Leases::start(LeaseConfig::new(args.socket.clone(), holder, name, args.seconds));
    let guards = leases.hold(&args.apps);
    // Protect the apps from the start, but never hold the command up for long.
    if leases.wait_granted(WAIT) == crate::lease::Waited::TimedOut {
        info!("lease: Aion has not answered within {WAIT:?}; running {} anyway", args.command[0]);
    }
    let mut cmd = std::process::Command::new(&args.command[0]);
    cmd.args(&args.command[1..]).process_group(0);
    crate::process::group::unblock_signals_in_child(&mut cmd);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 };
            eprintln!("aion-connector lease: cannot run {}: {e}", args.command[0]);
            drop(guards);
            leases.stop(Duration::from_secs(1));
            return Ok(code);
        }
    };
    let pgid = Pid::from_raw(child.id() as i32);
    let terminal = foreground_to(pgid);
    let forwarder =
        std::thread::Builder::new().name("signals".into()).stack_size(64 << 10).spawn(move || {
            while let Ok(sig) = forwarded.wait() {
                let _ = killpg(pgid, sig);
            }
        });
    if let Err(e) = forwarder {
        // SIGINT/SIGTERM stay blocked here and would never reach CMD.
        eprintln!("aion-connector lease: cannot forward signals ({e}); ending {}", args.command[0]);
        let _ = killpg(pgid, nix::sys::signal::Signal::SIGTERM);
    }
    let status = child.wait();
    if let Some(ours) = terminal {
        let _ = nix::unistd::tcsetpgrp(std::io::stdin(), ours);
    }
    drop(guards);
    leases.stop(Duration::from_secs(1));
    Ok(match status {
        Ok(s) => s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)),
        Err(e) => {
            eprintln!("aion-connector lease: cannot wait for {}: {e}", args.command[0]);
            1
        }
    })
}

/// When we are the terminal's foreground group, make `pgid` the foreground
/// (as a shell does for a job); returns our group to restore afterwards.
fn foreground_to(pgid: Pid) -> Option<Pid> {
    let stdin = std::io::stdin();
    let ours = nix::unistd::getpgrp();
    match nix::unistd::tcgetpgrp(&stdin) {
        Ok(fg) if fg == ours => nix::unistd::tcsetpgrp(&stdin, pgid).ok().map(|_| ours),
        _ => None,
    }
}
