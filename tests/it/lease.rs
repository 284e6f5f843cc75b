//! The lease client (issue 6): `aion-connector lease … -- CMD` and push-mode
//! runs of agents with `leaseApps`, against the reference lease server of
//! tests/it/util/lease_server.rs (Aion's guide, seed 002, and PROTOCOL.md §3).
//!
//! The client's timers run under `AION_LEASE_TIME_SCALE=300` where they
//! matter: a 60 s lease is renewed every 0.1 s, "10 minutes" is 2 s and "30 s"
//! is 0.1 s. The server's lease clock is scaled only in the renewal test
//! (both at 100 there: renewal every 0.3 s, expiry after 0.6 s), so that a
//! loaded machine does not turn a late thread wake-up into a failure elsewhere.

use crate::util::lease_server::{Dir, LeaseServer, Rec, Rules};
use crate::util::*;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const CHROME: &str = "com.google.Chrome";
const VSCODE: &str = "com.microsoft.VSCode";
const SCALE: f64 = 300.0;
const SCALE_ENV: (&str, &str) = ("AION_LEASE_TIME_SCALE", "300");
/// The project's token for the push-mode tests.
const TOKEN: &str = "lease-test-token-5d1c9b7e3a2f4068";

fn set(keys: &[&str]) -> BTreeSet<String> {
    keys.iter().map(|s| s.to_string()).collect()
}

const BEGIN_KEYS: &[&str] = &["action", "requestId", "holderId", "appKey", "leaseSeconds"];
const END_KEYS: &[&str] = &["action", "requestId", "holderId", "appKey"];

// ---------------------------------------------------------------- the wrapper

/// A running `aion-connector lease …`; on drop the wrapper is killed and so is
/// the command's group (its pid is the first word of `started`, when written).
struct Wrapper {
    sp: Spawned,
    started: Option<PathBuf>,
    t0: Instant,
    /// The wrapper's start time, in clock ticks since boot (`/proc/PID/stat`).
    start_ticks: u64,
}

impl Wrapper {
    /// `lease --app A… --socket S EXTRA… -- CMD…` in `dir`.
    fn start(
        dir: &TempDir,
        apps: &[&str],
        sock: &Path,
        extra: &[&str],
        cmd: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let mut args = vec!["lease".to_string()];
        for a in apps {
            args.extend(["--app".to_string(), a.to_string()]);
        }
        args.extend(["--socket".to_string(), sock.display().to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push("--".into());
        args.extend(cmd.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let t0 = Instant::now();
        let sp = spawn(&args, dir.path(), env);
        // (not reaped before `finish`, so /proc/PID is there)
        let start_ticks = start_ticks(sp.child.id() as i32);
        Wrapper { sp, started: None, t0, start_ticks }
    }

    /// `sh -c SCRIPT` under the wrapper; `started` names the file the script
    /// writes its pid to first (for the cleanup).
    fn sh(
        dir: &TempDir,
        apps: &[&str],
        sock: &Path,
        extra: &[&str],
        script: &str,
        started: Option<&Path>,
        env: &[(&str, &str)],
    ) -> Self {
        let mut w = Wrapper::start(dir, apps, sock, extra, &["sh", "-c", script], env);
        w.started = started.map(Path::to_path_buf);
        w
    }

    fn pid(&self) -> i32 {
        self.sp.child.id() as i32
    }

    fn stderr(&self) -> String {
        self.sp.stderr.lock().unwrap().clone()
    }

    /// Waits for the exit: (exit code, or 1000+signal if the wrapper itself was killed; stderr).
    fn finish(&mut self, within: Duration) -> (i32, String) {
        let Some(st) = wait_exit(&mut self.sp.child, within) else {
            let _ = self.sp.child.kill();
            let _ = self.sp.child.wait();
            panic!("the lease wrapper did not exit within {within:?}; stderr:\n{}", self.stderr());
        };
        use std::os::unix::process::ExitStatusExt;
        let code = st.code().unwrap_or_else(|| 1000 + st.signal().unwrap_or(0));
        (code, drained(&self.sp.stderr))
    }

    fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// How long the wrapper held its command up: from the wrapper's start to
    /// the command's, as the kernel timed them (the third word `started_cmd`
    /// wrote), so that neither the test's own scheduling nor the command's
    /// run time counts.
    fn held_up(&self, started: &Path) -> Duration {
        let text = std::fs::read_to_string(started).unwrap_or_else(|e| panic!("{}: {e}", started.display()));
        let ticks: u64 = text.split_whitespace().nth(2).and_then(|t| t.parse().ok()).expect("a start time");
        Duration::from_secs_f64(ticks.saturating_sub(self.start_ticks) as f64 / clock_ticks() as f64)
    }
}

/// Field 22 of `/proc/PID/stat`: the start time in clock ticks since boot.
fn start_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let (_, rest) = stat.rsplit_once(") ").unwrap();
    rest.split(' ').nth(19).and_then(|t| t.parse().ok()).expect("starttime in /proc/PID/stat")
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks() -> u64 {
    let out = std::process::Command::new("getconf").arg("CLK_TCK").output();
    out.ok().and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok()).unwrap_or(100)
}

impl Drop for Wrapper {
    fn drop(&mut self) {
        let _ = self.sp.child.kill();
        let _ = self.sp.child.wait();
        if let Some(pid) = self
            .started
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|s| s.split_whitespace().next()?.parse::<i32>().ok())
        {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// Waits for a file to appear.
fn wait_file(p: &Path) {
    poll(&format!("{} to appear", p.display()), || p.exists().then_some(()));
}

/// `echo $$ PGID STARTTIME > P.tmp && mv P.tmp P`: the started marker,
/// written atomically (the start time in clock ticks since boot, as in
/// `/proc/PID/stat`).
fn started_cmd(p: &Path) -> String {
    let p = p.display();
    format!("echo $$ $(cut -d' ' -f5,22 /proc/$$/stat) >{p}.tmp && mv {p}.tmp {p}")
}

/// The server's `lease.result` for a request, waited for.
fn result_of(srv: &LeaseServer, req: &Rec) -> Rec {
    let id = req.request_id().to_string();
    srv.wait_for(&format!("the lease.result for {id}"), DEADLINE, |_| srv.result_for(&id))
}

fn assert_clean(srv: &LeaseServer) {
    let v = srv.violations();
    assert!(v.is_empty(), "protocol violations: {v:#?}\nlog:\n{}", srv.dump());
}

/// What the wrapper says when it runs CMD only because its wait is over.
const NOT_ANSWERED: &str = "has not answered within";

fn warn_lines(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.contains("[WARN]") || l.contains("[ERROR]")).collect()
}

// ---------------------------------------------------------------- 1. the basic cycle

#[test]
fn wrapper_says_hello_begins_before_the_command_and_ends_after_it() {
    let dir = TempDir::new("lease-cycle");
    let (started, done) = (dir.join("started"), dir.join("done"));
    let srv =
        LeaseServer::start_with(&dir.join("aion.sock"), |r| r.probes = vec![started.clone(), done.clone()]);
    let script = format!("{}; sleep 0.5; touch {}", started_cmd(&started), done.display());
    let mut w = Wrapper::sh(&dir, &[CHROME], srv.path(), &[], &script, Some(&started), &[]);
    let pid = w.pid();
    let (code, err) = w.finish(DEADLINE);
    assert_eq!(code, 0, "stderr:\n{err}\nlog:\n{}", srv.dump());

    let log = srv.messages();
    let hello = log.iter().find(|r| r.dir == Dir::In).expect("a message from the wrapper");
    assert_eq!(hello.action(), "session.hello", "the first message:\n{}", srv.dump());
    assert_eq!(
        hello.keys(),
        set(&["action", "protocolVersion", "holderId", "clientName", "pid"]),
        "{}",
        hello.msg
    );
    assert_eq!(hello.msg["protocolVersion"], json!(1));
    assert_eq!(hello.msg["pid"], json!(pid), "hello.pid is the wrapper's pid");
    let holder = hello.msg["holderId"].as_str().unwrap().to_string();
    assert!(
        holder.starts_with("aion-connector.") && holder.ends_with(&format!(".lease-{pid}")),
        "default holder id {holder:?}"
    );
    assert!(!hello.msg["clientName"].as_str().unwrap_or("").is_empty(), "clientName {}", hello.msg);
    // Nothing but the hello before session.ready.
    let ready_at = srv.sent("session.ready")[0].at;
    assert!(log.iter().filter(|r| r.dir == Dir::In && r.at < ready_at).count() == 1, "{}", srv.dump());

    let begins = srv.received("lease.begin");
    assert_eq!(begins.len(), 1, "{}", srv.dump());
    let b = &begins[0];
    assert_eq!(b.keys(), set(BEGIN_KEYS), "{}", b.msg);
    assert_eq!(
        (b.msg["holderId"].as_str(), b.app(), &b.msg["leaseSeconds"]),
        (Some(holder.as_str()), CHROME, &json!(300))
    );
    assert!(b.request_id().starts_with(&format!("req_{pid}_")), "requestId {:?}", b.request_id());
    assert_eq!(
        b.probes,
        vec![false, false],
        "the command had started before lease.begin reached Aion:\n{}",
        srv.dump()
    );
    assert_eq!(result_of(&srv, b).msg["code"], "accepted");

    let ends = srv.received("lease.end");
    assert_eq!(ends.len(), 1, "{}", srv.dump());
    let e = &ends[0];
    assert_eq!(e.keys(), set(END_KEYS), "lease.end carries no leaseSeconds: {}", e.msg);
    assert_eq!((e.msg["holderId"].as_str(), e.app()), (Some(holder.as_str()), CHROME));
    assert_eq!(e.probes, vec![true, true], "lease.end came before the command was over:\n{}", srv.dump());
    assert_ne!(e.request_id(), b.request_id());
    assert!(srv.leases().is_empty(), "leases left: {:?}", srv.leases());
    assert_clean(&srv);

    // The command ran in its own process group.
    let ids = std::fs::read_to_string(&started).unwrap();
    let ids: Vec<i32> = ids.split_whitespace().map(|s| s.parse().unwrap()).collect();
    assert_eq!(ids[0], ids[1], "the command is not a process group leader (pid, pgid) = {ids:?}");
    assert_ne!(ids[1], nix::unistd::getpgrp().as_raw(), "the command is in the test's process group");
}

#[test]
fn exit_status_passes_through() {
    let dir = TempDir::new("lease-status");
    let srv = LeaseServer::start(&dir.join("aion.sock"));
    let not_exec = dir.join("not-executable");
    write(&not_exec, "#!/bin/sh\nexit 0\n");
    let cases: Vec<(Vec<String>, i32)> = vec![
        (vec!["sh".into(), "-c".into(), "exit 7".into()], 7),
        (vec!["sh".into(), "-c".into(), "exit 0".into()], 0),
        (vec!["sh".into(), "-c".into(), "kill -KILL $$".into()], 137),
        (vec!["sh".into(), "-c".into(), "kill -TERM $$".into()], 143),
        (vec![dir.join("no-such-command").display().to_string()], 127),
        (vec![not_exec.display().to_string()], 126),
    ];
    let mut wrong = Vec::new();
    for (cmd, want) in &cases {
        let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
        let mut w = Wrapper::start(&dir, &[CHROME], srv.path(), &[], &cmd, &[]);
        let (code, err) = w.finish(DEADLINE);
        if code != *want {
            wrong.push(format!("{cmd:?} → {code}, expected {want}; stderr: {err:?}"));
        }
    }
    assert!(wrong.is_empty(), "exit statuses:\n{}", wrong.join("\n"));
}

#[test]
fn signals_to_the_wrapper_are_forwarded_to_the_command() {
    let dir = TempDir::new("lease-signals");
    let srv = LeaseServer::start(&dir.join("aion.sock"));
    for (i, (sig, want)) in
        [(Signal::SIGTERM, 42), (Signal::SIGINT, 43), (Signal::SIGHUP, 44)].into_iter().enumerate()
    {
        let started = dir.join(format!("started-{i}"));
        let script = format!(
            "trap 'exit 42' TERM; trap 'exit 43' INT; trap 'exit 44' HUP; {}; while :; do sleep 0.05; done",
            started_cmd(&started)
        );
        let mut w = Wrapper::sh(&dir, &[CHROME], srv.path(), &[], &script, Some(&started), &[]);
        wait_file(&started);
        w.signal(sig);
        let (code, err) = w.finish(Duration::from_secs(5));
        assert_eq!(code, want, "{sig:?} to the wrapper: exit code; stderr:\n{err}");
        assert_eq!(srv.received("lease.end").len(), i + 1, "no lease.end after {sig:?}:\n{}", srv.dump());
    }
    assert_clean(&srv);
}

/// CMD must start with the usual signal mask: a program that is not a shell
/// (no trap, no mask reset of its own) is ended by the forwarded SIGTERM.
#[test]
fn signals_reach_a_command_that_is_not_a_shell() {
    let dir = TempDir::new("lease-mask");
    let srv = LeaseServer::start(&dir.join("aion.sock"));
    let mut w = Wrapper::start(&dir, &[CHROME], srv.path(), &[], &["sleep", "5"], &[]);
    let wrapper = w.pid();
    let cmd = poll("the command (a child of the wrapper)", || {
        std::fs::read_dir("/proc")
            .ok()?
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .find(|&p| ppid(p) == Some(wrapper))
    });
    let status = std::fs::read_to_string(format!("/proc/{cmd}/status")).unwrap();
    let field = |name: &str| -> u64 {
        let v = status.lines().find_map(|l| l.strip_prefix(name)).unwrap().trim();
        u64::from_str_radix(v, 16).unwrap()
    };
    let (blocked, ignored) = (field("SigBlk:"), field("SigIgn:"));
    let forwarded: u64 = [Signal::SIGHUP, Signal::SIGINT, Signal::SIGTERM, Signal::SIGTTOU]
        .iter()
        .map(|s| 1u64 << (*s as i32 - 1))
        .sum();
    let t0 = Instant::now();
    w.signal(Signal::SIGTERM);
    let (code, err) = w.finish(Duration::from_secs(9));
    assert_eq!(
        blocked & forwarded,
        0,
        "the command runs with signals blocked: SigBlk {blocked:#x} (HUP INT TERM TTOU = {forwarded:#x}), SigIgn {ignored:#x}"
    );
    assert_eq!(ignored & forwarded, 0, "the command runs with signals ignored: SigIgn {ignored:#x}");
    assert_eq!(
        code,
        143,
        "SIGTERM to the wrapper: `sleep 5` should die of it (exit 143) at once; took {:?}; stderr:\n{err}",
        t0.elapsed()
    );
}

/// A slow Aion: the grant comes after the wrapper stopped waiting (1 s) and
/// after the command ended. The lease must still be ended, not left to expire.
#[test]
fn a_lease_granted_late_is_still_ended() {
    let dir = TempDir::new("lease-slow");
    let srv =
        LeaseServer::start_with(&dir.join("aion.sock"), |r| r.answer_delay = Duration::from_millis(1200));
    let mut w = Wrapper::start(&dir, &[CHROME], srv.path(), &[], &["true"], &[]);
    let (code, err) = w.finish(DEADLINE);
    assert_eq!(code, 0, "stderr:\n{err}");
    let took = w.t0.elapsed();
    let begins = srv.received("lease.begin");
    assert_eq!(begins.len(), 1, "{}", srv.dump());
    // The slow server reads the wrapper's later messages only after its
    // delay; once it has read up to the closed connection's end, all are in.
    srv.wait_for("the wrapper's connection read to its end", DEADLINE, |_| {
        (srv.live_connections() == 0).then_some(())
    });
    assert_eq!(
        srv.received("lease.end").len(),
        1,
        "Aion granted the lease 1.2 s after the begin; the wrapper exited after {took:?} without ending it:\n{}",
        srv.dump()
    );
    assert!(srv.leases().is_empty(), "left held: {:?}", srv.leases());
}

/// Many short wrappers at once (CPU contention): each one begins its lease
/// before its command starts ("waits up to 1 s for the leases to be granted")
/// and ends it after.
#[test]
fn many_quick_wrappers_each_begin_first_and_end() {
    const N: usize = 72;
    const AT_ONCE: usize = 24;
    let dir = TempDir::new("lease-many");
    let files: Vec<PathBuf> = (0..N).map(|i| dir.join(format!("started-{i}"))).collect();
    let srv = LeaseServer::start_with(&dir.join("aion.sock"), |r| r.probes = files.clone());
    let mut bad = Vec::new();
    for round in 0..N / AT_ONCE {
        let mut running = Vec::new();
        for (i, file) in files.iter().enumerate().skip(round * AT_ONCE).take(AT_ONCE) {
            let app = format!("app.{i}");
            let script = started_cmd(file);
            running.push((i, Wrapper::sh(&dir, &[&app], srv.path(), &[], &script, Some(file), &[])));
        }
        for (i, mut w) in running {
            let (code, err) = w.finish(DEADLINE);
            let app = format!("app.{i}");
            let (b, e) = (srv.received_for("lease.begin", &app), srv.received_for("lease.end", &app));
            if code != 0 {
                bad.push(format!("{app}: exit {code}: {err}"));
            } else if b.len() != 1 || e.len() != 1 {
                bad.push(format!("{app}: {} lease.begin, {} lease.end", b.len(), e.len()));
            } else if b[0].probes[i] {
                bad.push(format!("{app}: lease.begin reached Aion after the command had started"));
            }
        }
    }
    assert!(bad.is_empty(), "{} of {N} quick wrappers ({AT_ONCE} at a time):\n{}", bad.len(), bad.join("\n"));
    assert_clean(&srv);
}

// ---------------------------------------------------------------- 2. close checks

#[test]
fn close_checks_are_answered_at_once() {
    let dir = TempDir::new("lease-close");
    let started = dir.join("started");
    let srv = LeaseServer::start(&dir.join("aion.sock"));
    let script = format!("{}; sleep 20", started_cmd(&started));
    let mut w = Wrapper::sh(
        &dir,
        &[CHROME],
        srv.path(),
        &["--seconds", "90", "--holder", "agent.local.test"],
        &script,
        Some(&started),
        &[],
    );
    wait_file(&started);
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let (reply, took) =
            srv.can_close(CHROME).unwrap_or_else(|e| panic!("{e}; stderr:\n{}\n{}", w.stderr(), srv.dump()));
        worst = worst.max(took);
        assert_eq!(
            reply,
            json!({"action": "lease.can_close.reply", "requestId": reply["requestId"], "holderId": "agent.local.test",
                   "appKey": CHROME, "result": "extend_lease", "leaseSeconds": 90}),
            "while the command runs"
        );
        assert!(reply["requestId"].as_str().is_some_and(|r| r.starts_with("close_")));
    }
    assert!(worst < Duration::from_secs(3), "a close check took {worst:?} (Aion waits 3 s)");
    eprintln!("close check while in use: slowest of 20 replies {worst:?}");

    // An app this wrapper does not hold: allow_close, without leaseSeconds.
    let (reply, took) = srv.can_close("com.apple.Safari").unwrap();
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(
        reply,
        json!({"action": "lease.can_close.reply", "requestId": reply["requestId"], "holderId": "agent.local.test",
               "appKey": "com.apple.Safari", "result": "allow_close"})
    );
    w.signal(Signal::SIGTERM);
    let (code, err) = w.finish(Duration::from_secs(5));
    assert_eq!(code, 143, "sleep killed by the forwarded SIGTERM; stderr:\n{err}");
    assert_clean(&srv);
}

// ---------------------------------------------------------------- 3. renewals

#[test]
fn leases_are_renewed_before_they_expire() {
    let dir = TempDir::new("lease-renew");
    // Scale 100 here (renewal every 0.3 s, expiry after 0.6 s): margins that
    // survive a loaded machine.
    const RENEW_SCALE: f64 = 100.0;
    let srv = LeaseServer::start_with(&dir.join("aion.sock"), |r| r.scale = RENEW_SCALE);
    let env = [("AION_LEASE_TIME_SCALE", "100")];
    let mut w = Wrapper::start(&dir, &[CHROME], srv.path(), &["--seconds", "60"], &["sleep", "2"], &env);
    let (code, err) = w.finish(DEADLINE);
    assert_eq!(code, 0, "stderr:\n{err}");

    let log = srv.messages();
    let requests: Vec<&Rec> = log
        .iter()
        .filter(|r| r.dir == Dir::In && matches!(r.action(), "lease.begin" | "lease.renew"))
        .collect();
    assert_eq!(requests[0].action(), "lease.begin", "{}", srv.dump());
    let renews = requests.len() - 1;
    // Renewal every 0.3 s for ~2 s: about 6; slow machines get some slack.
    assert!(
        renews >= 4,
        "only {renews} lease.renew in a 2 s command (60 s lease at scale 100):\n{}",
        srv.dump()
    );
    assert!(renews <= 8, "{renews} lease.renew in 2 s: renewing too often:\n{}", srv.dump());
    let half = Duration::from_secs(30).div_f64(RENEW_SCALE);
    let expiry = Duration::from_secs(60).div_f64(RENEW_SCALE);
    let mut ids = BTreeSet::new();
    for pair in requests.windows(2) {
        let (prev, next) = (pair[0], pair[1]);
        assert_eq!(next.action(), "lease.renew", "{}", srv.dump());
        assert_eq!(next.keys(), set(BEGIN_KEYS), "{}", next.msg);
        assert_eq!((next.app(), &next.msg["leaseSeconds"]), (CHROME, &json!(60)));
        assert_eq!(next.msg["holderId"], prev.msg["holderId"]);
        let granted = result_of(&srv, prev);
        assert_eq!(granted.msg["code"], "accepted");
        let gap = next.at.duration_since(granted.at);
        assert!(
            gap >= half.mul_f64(0.8),
            "a renewal {gap:?} after the grant: before half the lease ({half:?})"
        );
        assert!(gap < expiry, "a renewal {gap:?} after the grant: the lease had expired ({expiry:?})");
        ids.insert(next.request_id().to_string());
    }
    ids.insert(requests[0].request_id().to_string());
    assert_eq!(ids.len(), requests.len(), "request ids are reused");
    assert_eq!(srv.received("lease.end").len(), 1);
    assert_clean(&srv);
}

// ---------------------------------------------------------------- 4. reconnection

#[test]
fn a_dropped_connection_is_reopened_and_the_lease_begun_again() {
    let dir = TempDir::new("lease-drop");
    let (started, done) = (dir.join("started"), dir.join("done"));
    let srv = LeaseServer::start_with(&dir.join("aion.sock"), |r| {
        r.probes = vec![started.clone(), done.clone()];
    });
    let script = format!("{}; sleep 2; touch {}", started_cmd(&started), done.display());
    let mut w =
        Wrapper::sh(&dir, &[CHROME], srv.path(), &["--seconds", "60"], &script, Some(&started), &[SCALE_ENV]);
    let first = srv.wait_received("lease.begin", CHROME, 0, DEADLINE);
    assert_eq!(result_of(&srv, &first).msg["code"], "accepted");
    wait_file(&started);

    // Gone for 0.3 s: connections dropped, the socket file removed.
    let refused = Instant::now();
    srv.refuse_for(Duration::from_millis(300));
    srv.drop_connections();
    let dropped = Instant::now();
    let hello = srv.wait_for("a new session.hello", Duration::from_secs(5), |log| {
        log.iter().find(|r| r.dir == Dir::In && r.conn > first.conn && r.action() == "session.hello").cloned()
    });
    // (the socket is back only 300 ms after `refuse_for` began)
    assert!(
        hello.at.duration_since(refused) >= Duration::from_millis(300),
        "connected while the socket was gone?"
    );
    let again = srv.wait_for("the lease begun again on the new connection", Duration::from_secs(3), |log| {
        log.iter()
            .find(|r| {
                r.dir == Dir::In
                    && r.conn == hello.conn
                    && r.app() == CHROME
                    && r.action().starts_with("lease.")
            })
            .cloned()
    });
    assert_eq!(again.action(), "lease.begin", "the first lease message after reconnecting:\n{}", srv.dump());
    assert_eq!(again.probes, vec![true, false], "the command should still be running:\n{}", srv.dump());
    assert_eq!(hello.msg["holderId"], first.msg["holderId"], "same holder after reconnecting");
    assert_eq!(result_of(&srv, &again).msg["code"], "accepted");
    let back = again.at.duration_since(dropped);
    eprintln!("drop → lease begun again: {back:?} (socket refused for 300 ms)");

    let (code, err) = w.finish(DEADLINE);
    assert_eq!(code, 0, "stderr:\n{err}");
    assert!(err.contains("connection to Aion was lost"), "no WARN about the lost connection; stderr:\n{err}");
    let ends = srv.received("lease.end");
    assert_eq!(ends.len(), 1, "{}", srv.dump());
    assert_eq!((ends[0].conn, ends[0].probes.clone()), (hello.conn, vec![true, true]));
    assert_clean(&srv);
}

// ---------------------------------------------------------------- 5. no Aion to talk to

#[test]
fn an_unsupported_protocol_version_is_reported_and_the_command_runs() {
    let dir = TempDir::new("lease-version");
    let srv = LeaseServer::start_with(&dir.join("aion.sock"), |r| {
        r.refuse_version = true;
    });
    let started = dir.join("started");
    let script = format!("{}; sleep 1; exit 5", started_cmd(&started));
    let mut w =
        Wrapper::sh(&dir, &[CHROME], srv.path(), &["--seconds", "60"], &script, Some(&started), &[SCALE_ENV]);
    let (code, err) = w.finish(DEADLINE);
    assert_eq!(code, 5, "stderr:\n{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("unsupported_protocol_version")).collect();
    assert!(!lines.is_empty(), "the session.error code is not on stderr:\n{err}");
    assert!(lines[0].to_lowercase().contains("protocol version"), "not a clear message: {:?}", lines[0]);
    assert!(srv.received("lease.begin").is_empty(), "a lease.begin after session.error:\n{}", srv.dump());
    // "No reconnect for 10 min" = 2 s at scale 300.
    let quiet = Duration::from_secs(600).div_f64(SCALE);
    let hellos = srv.received("session.hello");
    for pair in hellos.windows(2) {
        let gap = pair[1].at.duration_since(pair[0].at);
        assert!(
            gap >= quiet.mul_f64(0.9),
            "a hello {gap:?} after unsupported_protocol_version (no reconnect for 10 min, {quiet:?} scaled):\n{err}"
        );
    }
    let held = w.held_up(&started);
    assert!(held < Duration::from_secs(2), "the command was held up {held:?}");
}

#[test]
fn a_missing_socket_gives_one_warning_and_the_command_runs() {
    let dir = TempDir::new("lease-nosock");
    let sock = dir.join("no-aion-here.sock");
    // Scaled: the quiet retry every 30 s happens every 0.1 s here.
    let started = dir.join("started-scaled");
    let script = format!("{}; sleep 0.6; exit 3", started_cmd(&started));
    let mut w = Wrapper::sh(&dir, &[CHROME], &sock, &[], &script, Some(&started), &[SCALE_ENV]);
    let (code, err) = w.finish(DEADLINE);
    assert_eq!(code, 3, "stderr:\n{err}");
    // No wait for a lease that cannot come: the wrapper says when it ran the
    // command only because its wait was over.
    assert!(!err.contains(NOT_ANSWERED), "the command waited for the wrapper's second:\n{err}");
    let warns = warn_lines(&err);
    assert_eq!(warns.len(), 1, "expected exactly one warning; stderr:\n{err}");
    assert!(
        warns[0].contains("no Aion socket at") && warns[0].contains(sock.to_str().unwrap()),
        "{:?}",
        warns[0]
    );

    // Real time: no wait (the wrapper's 1 s) for a lease that cannot come.
    let started = dir.join("started-real");
    let script = format!("{}; exit 4", started_cmd(&started));
    let mut w = Wrapper::sh(&dir, &[CHROME], &sock, &[], &script, Some(&started), &[]);
    let (code, err) = w.finish(DEADLINE);
    assert_eq!(code, 4, "stderr:\n{err}");
    assert!(!err.contains(NOT_ANSWERED), "a missing socket held the command up:\n{err}");
    assert_eq!(warn_lines(&err).len(), 1, "stderr:\n{err}");
}

// ---------------------------------------------------------------- 6. refusals

/// A 1 s command leasing `app` (refused per `setup`) and Chrome (granted):
/// the refused app is begun once (10 min = 2 s scaled), Chrome is held and
/// renewed; the refusal is on stderr with the app key and `phrase` or `code`.
fn refused_once(tag: &str, app: &str, code: &str, phrase: &str, setup: impl FnOnce(&mut Rules)) {
    let dir = TempDir::new(tag);
    let srv = LeaseServer::start_with(&dir.join("aion.sock"), setup);
    let mut w =
        Wrapper::start(&dir, &[app, CHROME], srv.path(), &["--seconds", "60"], &["sleep", "1"], &[SCALE_ENV]);
    let (status, err) = w.finish(DEADLINE);
    assert_eq!(status, 0, "stderr:\n{err}");
    let begins = srv.received_for("lease.begin", app);
    assert!(!begins.is_empty(), "{}", srv.dump());
    assert_eq!(result_of(&srv, &begins[0]).msg["code"], code);
    // No retry for 10 min = 2 s scaled (the run may last a little over 2 s
    // when the wrapper waited its full second for the refused grant).
    let quiet = Duration::from_secs(600).div_f64(SCALE);
    for pair in begins.windows(2) {
        let gap = pair[1].at.duration_since(result_of(&srv, &pair[0]).at);
        assert!(
            gap >= quiet.mul_f64(0.9),
            "{app} begun again {gap:?} after {code} (no retry for 10 min = {quiet:?} scaled):\n{}",
            srv.dump()
        );
    }
    let most = 1 + w.t0.elapsed().div_duration_f64(quiet.mul_f64(0.9)) as usize;
    assert!(begins.len() <= most, "{app} begun {} times after {code}:\n{}", begins.len(), srv.dump());
    assert!(srv.received_for("lease.renew", app).is_empty(), "a refused lease renewed:\n{}", srv.dump());
    // (every 0.1 s scaled: ~9 times in the 1 s command)
    let chrome = srv.received_for("lease.renew", CHROME).len();
    assert!(chrome >= 1, "Chrome (granted) was never renewed:\n{}", srv.dump());
    let line = warn_lines(&err).into_iter().find(|l| l.contains(app));
    let line = line.unwrap_or_else(|| panic!("no WARN/ERROR line names {app}; stderr:\n{err}"));
    assert!(line.contains(code) || line.contains(phrase), "not clear about {code}: {line:?}");
    assert_clean(&srv);
}

#[test]
fn unknown_app_is_not_retried_hot() {
    refused_once("lease-unknown", "com.example.NotAnApp", "unknown_app", "does not know", |r| {
        r.known_apps = Some([CHROME.to_string()].into())
    });
}

#[test]
fn not_entitled_is_not_retried_hot() {
    refused_once("lease-entitled", "com.apple.Safari", "not_entitled", "not entitled", |r| {
        r.codes.insert("com.apple.Safari".into(), "not_entitled".into());
    });
}

#[test]
fn lease_conflict_is_retried_after_half_a_lease() {
    let dir = TempDir::new("lease-conflict");
    let started = dir.join("started");
    let srv = LeaseServer::start_with(&dir.join("aion.sock"), |r| {
        r.codes.insert(CHROME.into(), "lease_conflict".into());
    });
    let script = format!("{}; sleep 1.2", started_cmd(&started));
    let mut w =
        Wrapper::sh(&dir, &[CHROME], srv.path(), &["--seconds", "60"], &script, Some(&started), &[SCALE_ENV]);
    let first = srv.wait_received("lease.begin", CHROME, 0, DEADLINE);
    // Retried after the conflict: the third begin (the second retry) is waited for.
    srv.wait_received("lease.begin", CHROME, 2, DEADLINE);
    let during = srv.received_for("lease.begin", CHROME);
    srv.rules().codes.clear();
    let granted =
        srv.wait_for("a begin accepted after the conflict cleared", Duration::from_secs(3), |log| {
            log.iter()
                .find(|r| r.dir == Dir::Out && r.action() == "lease.result" && r.msg["code"] == "accepted")
                .cloned()
        });
    let (code, err) = w.finish(DEADLINE);
    assert_eq!(code, 0, "stderr:\n{err}");
    // Half of a 60 s lease at scale 300: 0.1 s between attempts, not sooner.
    let half = Duration::from_secs(30).div_f64(SCALE);
    assert!(during.len() >= 3, "{} begins while lease_conflict was answered", during.len());
    let begins = srv.received_for("lease.begin", CHROME);
    for pair in begins.windows(2) {
        let gap = pair[1].at.duration_since(result_of(&srv, &pair[0]).at);
        assert!(gap >= half.mul_f64(0.8), "retried {gap:?} after a lease_conflict (half a lease: {half:?})");
    }
    assert!(granted.at > first.at);
    assert!(!srv.received_for("lease.renew", CHROME).is_empty(), "not renewed once granted:\n{}", srv.dump());
    let line =
        warn_lines(&err).into_iter().find(|l| l.contains(CHROME)).unwrap_or_else(|| panic!("stderr:\n{err}"));
    assert!(line.contains("lease_conflict") || line.contains("another holder"), "{line:?}");
    assert_clean(&srv);
}

/// The wrapper waits up to 1 s "for the leases to be granted (or refused)"
/// (src/lease.rs `wait_granted`): a refusal should not cost that second.
#[test]
fn a_refused_app_does_not_hold_the_command_up() {
    let dir = TempDir::new("lease-refused-wait");
    let started = dir.join("started");
    let srv = LeaseServer::start_with(&dir.join("aion.sock"), |r| {
        r.known_apps = Some(Default::default());
        r.probes = vec![started.clone()];
    });
    let mut w = Wrapper::sh(
        &dir,
        &["com.example.Unknown"],
        srv.path(),
        &[],
        &started_cmd(&started),
        Some(&started),
        &[],
    );
    let (code, err) = w.finish(DEADLINE);
    assert_eq!(code, 0, "stderr:\n{err}");
    assert_eq!(srv.sent("lease.result")[0].msg["code"], "unknown_app");
    // The command ran once the refusal came, not when the wrapper's second was over.
    assert!(!err.contains(NOT_ANSWERED), "a refused lease held the command up:\n{err}");
}

/// The control: an app Aion answers only after 3 s holds the command up for the
/// wrapper's second, and the wrapper says so (the line the tests above
/// look for, so its absence there means something).
#[test]
fn an_unanswered_lease_holds_the_command_up_for_a_second_at_most() {
    let dir = TempDir::new("lease-unanswered");
    let started = dir.join("started");
    let srv = LeaseServer::start_with(&dir.join("aion.sock"), |r| {
        r.answer_delay = Duration::from_secs(3);
        r.probes = vec![started.clone()];
    });
    let mut w = Wrapper::sh(&dir, &[CHROME], srv.path(), &[], &started_cmd(&started), Some(&started), &[]);
    let (code, err) = w.finish(DEADLINE);
    assert_eq!(code, 0, "stderr:\n{err}");
    assert!(err.contains(NOT_ANSWERED), "stderr:\n{err}");
    let begin = srv.received_for("lease.begin", CHROME);
    assert_eq!(begin.first().map(|b| b.probes.clone()), Some(vec![false]), "{}", srv.dump());
}

// ---------------------------------------------------------------- 7. usage

#[test]
fn usage_errors_exit_2() {
    let dir = TempDir::new("lease-usage");
    let srv = LeaseServer::start(&dir.join("aion.sock"));
    let s = srv.path_str();
    let cases: &[&[&str]] = &[
        &["lease", "--socket", s, "--", "true"],
        &["lease", "--app", CHROME, "--socket", s],
        &["lease", "--app", CHROME, "--socket", s, "--"],
        &["lease", "--app", CHROME, "--socket", s, "true"],
        &["lease", "--app", CHROME, "--seconds", "30", "--socket", s, "--", "true"],
        &["lease", "--app", CHROME, "--seconds", "59", "--socket", s, "--", "true"],
        &["lease", "--app", CHROME, "--seconds", "1801", "--socket", s, "--", "true"],
        &["lease", "--app", CHROME, "--seconds=soon", "--socket", s, "--", "true"],
        &["lease", "--app", CHROME, "--bogus", "--socket", s, "--", "true"],
        &["lease", "--app=", "--socket", s, "--", "true"],
        &["lease", "--app"],
    ];
    for args in cases {
        let (code, out, err) = run(args, dir.path(), &[]);
        assert_eq!(code, 2, "{args:?}: stdout {out:?} stderr:\n{err}");
        assert!(!err.trim().is_empty(), "{args:?}: no message on stderr");
        assert!(err.lines().count() <= 3, "{args:?}: a long message:\n{err}");
    }
    assert_eq!(srv.connections_seen(), 0, "a usage error still connected to Aion:\n{}", srv.dump());

    let (code, out, _) = run(&["lease", "--help"], dir.path(), &[]);
    assert_eq!(code, 0);
    assert!(out.contains("--app") && out.contains("--seconds"), "help: {out}");

    // --opt=value and the bounds themselves.
    for secs in ["60", "1800"] {
        let seconds = format!("--seconds={secs}");
        let app = format!("--app={CHROME}");
        let socket = format!("--socket={s}");
        let before = srv.received("lease.begin").len();
        let (code, _, err) = run(&["lease", &app, &seconds, &socket, "--", "sleep", "0.2"], dir.path(), &[]);
        assert_eq!(code, 0, "stderr:\n{err}");
        let begins = srv.received("lease.begin");
        assert_eq!(begins.len(), before + 1, "no lease.begin for {seconds}:\n{}", srv.dump());
        assert_eq!(begins[before].msg["leaseSeconds"], json!(secs.parse::<u64>().unwrap()));
    }
    assert_clean(&srv);
}

// ---------------------------------------------------------------- 8. push mode

struct Rig {
    _dir: TempDir,
    log: PathBuf,
    server: Server,
}

impl Rig {
    fn new(dir: TempDir, agents: Value, lease: Value) -> Rig {
        let proj = dir.join("proj");
        std::fs::create_dir_all(&proj).unwrap();
        let bin = fake_acpx_bin(dir.path());
        let log = dir.join("acpx.log");
        let cfg = dir.join("aion.config.json");
        let config = json!({
            "port": 0, "host": "127.0.0.1",
            "limits": {"stopGraceSeconds": 0},
            "lease": lease,
            "projects": {"p": {"token": TOKEN, "dir": proj, "agents": agents}}
        });
        std::fs::write(&cfg, config.to_string()).unwrap();
        let path = path_with(&bin);
        let env = [("PATH", path.as_str()), ("FAKE_ACPX_LOG", log.to_str().unwrap())];
        let server = Server::start_args(&[cfg.to_str().unwrap()], dir.path(), &env);
        Rig { _dir: dir, log, server }
    }

    fn start(&self, agent: &str, prompt: &str, session: &str, callback: &str) {
        let (status, v) = self.server.call(
            TOKEN,
            "invoke",
            json!({"agent": agent, "prompt": prompt, "session": session, "callback": callback}),
        );
        assert_eq!((status, v), (200, json!({"ok": true, "sessionId": session})));
    }

    fn stop(&self, session: &str) {
        let (status, v) = self.server.call(TOKEN, "stop", json!({"session": session}));
        assert_eq!((status, v), (200, json!({"ok": true, "stopping": true})));
    }

    /// The fake acpx's main commands with this prompt.
    fn main_calls(&self, prompt: &str) -> usize {
        acpx_calls(&self.log).iter().filter(|c| c.argv.last().map(String::as_str) == Some(prompt)).count()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = self.server.child.kill();
        let _ = self.server.child.wait();
        kill_marked(&format!("FAKE_ACPX_LOG={}", self.log.display()));
    }
}

#[test]
fn connector_runs_hold_their_agents_apps() {
    let dir = TempDir::new("lease-push");
    let srv = LeaseServer::start(&dir.join("aion.sock"));
    let agents = json!({
        "fake": {"description": "Fake", "leaseApps": [CHROME]},
        "code": {"description": "Fake, another app", "leaseApps": [VSCODE]},
        "plain": {"description": "No apps"}
    });
    let rig = Rig::new(dir, agents, json!({"socket": srv.path_str(), "holderId": "h1"}));
    let platform = Platform::start();
    let cb = platform.url();

    let hello = srv.wait_for("the connector's hello", DEADLINE, |_| srv.received("session.hello").pop());
    assert_eq!(hello.msg["holderId"], "h1");
    assert_eq!(hello.msg["pid"], json!(rig.server.pid()));
    let begins = || srv.received_for("lease.begin", CHROME);
    let ends = || srv.received_for("lease.end", CHROME);

    // An agent without leaseApps leases nothing.
    rig.start("plain", "hello", "s0", &cb);
    platform.wait_closed("s0");
    // A short run: begun, then ended.
    rig.start("fake", "hello", "s1", &cb);
    platform.wait_closed("s1");
    let b = srv.wait_received("lease.begin", CHROME, 0, DEADLINE);
    let e = srv.wait_received("lease.end", CHROME, 0, DEADLINE);
    assert_eq!((b.msg["holderId"].as_str(), &b.msg["leaseSeconds"]), (Some("h1"), &json!(300)));
    assert_eq!((e.msg["holderId"].as_str(), e.keys()), (Some("h1"), set(END_KEYS)));
    assert!(e.at > b.at);
    assert_eq!((begins().len(), ends().len()), (1, 1), "{}", srv.dump());

    // A long run holds the app while it goes on.
    rig.start("fake", "sleep", "s2", &cb);
    srv.wait_received("lease.begin", CHROME, 1, DEADLINE);
    let (reply, took) = srv.can_close(CHROME).unwrap();
    assert_eq!(
        (reply["result"].as_str(), &reply["leaseSeconds"], reply["holderId"].as_str()),
        (Some("extend_lease"), &json!(300), Some("h1"))
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
    // A second concurrent run shares the lease.
    rig.start("fake", "sleep", "s3", &cb);
    poll("the second sleep run to start", || (rig.main_calls("sleep") == 2).then_some(()));
    // s3 holds Chrome before its agent starts. A run of another app after
    // it begins and ends VSCode's lease: the lease thread handles the
    // changes in order, so a lease.begin for s3 would have come first.
    rig.start("code", "hello", "v1", &cb);
    platform.wait_closed("v1");
    srv.wait_received("lease.end", VSCODE, 0, DEADLINE);
    assert_eq!(begins().len(), 2, "the second run began the lease again:\n{}", srv.dump());

    rig.stop("s2");
    platform.wait_closed("s2");
    // Once s2 is out of the registry its hold is released; the same proof.
    poll("s2 to leave the registry", || {
        let (_, runs) = rig.server.call(TOKEN, "runs", json!({}));
        (!runs["active"].as_array().unwrap().iter().any(|r| r["session"] == "s2")).then_some(())
    });
    rig.start("code", "hello", "v2", &cb);
    platform.wait_closed("v2");
    srv.wait_received("lease.end", VSCODE, 1, DEADLINE);
    assert_eq!(ends().len(), 1, "the lease ended while s3 still runs:\n{}", srv.dump());
    let (reply, _) = srv.can_close(CHROME).unwrap();
    assert_eq!(reply["result"], "extend_lease", "s3 still runs");

    rig.stop("s3");
    platform.wait_closed("s3");
    srv.wait_received("lease.end", CHROME, 1, Duration::from_secs(5));
    let (reply, _) = srv.can_close(CHROME).unwrap();
    assert_eq!(
        reply,
        json!({"action": "lease.can_close.reply", "requestId": reply["requestId"], "holderId": "h1",
               "appKey": CHROME, "result": "allow_close"}),
        "after the last run"
    );
    assert_eq!((begins().len(), ends().len()), (2, 2), "{}", srv.dump());
    assert!(srv.leases().is_empty());
    assert_clean(&srv);
    assert!(!rig.server.stderr().contains(TOKEN));
}

#[test]
fn connector_without_lease_apps_does_not_connect() {
    let dir = TempDir::new("lease-push-none");
    let srv = LeaseServer::start(&dir.join("aion.sock"));
    let rig = Rig::new(dir, json!({"fake": {"description": "Fake"}}), json!({"socket": srv.path_str()}));
    let (status, _) = rig.server.call(TOKEN, "ping", json!({}));
    assert_eq!(status, 200);
    // No lease client exists (status says so), so none can connect later;
    // and a whole run goes by without one.
    let cfg = rig._dir.join("aion.config.json");
    let (code, out, err) = run(&["status", cfg.to_str().unwrap(), "--json"], rig._dir.path(), &[]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert!(v["lease"].is_null(), "{v}");
    let platform = Platform::start();
    rig.start("fake", "hello", "s1", &platform.url());
    platform.wait_closed("s1");
    assert_eq!(srv.connections_seen(), 0, "{}", srv.dump());
}

#[test]
fn connector_ends_its_leases_on_shutdown() {
    let dir = TempDir::new("lease-push-stop");
    let srv = LeaseServer::start(&dir.join("aion.sock"));
    let agents = json!({"fake": {"description": "Fake", "leaseApps": [CHROME, "com.microsoft.VSCode"]}});
    let mut rig =
        Rig::new(dir, agents, json!({"socket": srv.path_str(), "holderId": "h2", "leaseSeconds": 120}));
    let platform = Platform::start();
    rig.start("fake", "sleep", "s1", &platform.url());
    for app in [CHROME, "com.microsoft.VSCode"] {
        let b = srv.wait_received("lease.begin", app, 0, DEADLINE);
        assert_eq!(b.msg["leaseSeconds"], json!(120));
        result_of(&srv, &b);
    }
    let st = rig.server.signal_and_wait(Signal::SIGTERM, Duration::from_secs(15));
    assert_eq!(st.code(), Some(0), "stderr:\n{}", rig.server.stderr());
    for app in [CHROME, "com.microsoft.VSCode"] {
        assert_eq!(
            srv.received_for("lease.end", app).len(),
            1,
            "{app} not ended on shutdown:\n{}",
            srv.dump()
        );
    }
    assert!(srv.leases().is_empty());
    assert_clean(&srv);
}

/// An Aion that says `ready` and then hangs up at once, every time: the
/// wrapper backs off (1, 2, 4 … s) and logs the streak once, instead of
/// redialling every second with two log lines each time. Real time (no scale).
#[test]
fn an_aion_that_drops_every_connection_is_redialled_with_a_growing_pause() {
    use std::io::{BufRead, BufReader, Write};
    let dir = TempDir::new("flap");
    let sock = dir.join("aion.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let accepts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = accepts.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut line = String::new();
            let _ = BufReader::new(&conn).read_line(&mut line);
            let hello: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            let ready = json!({"action":"session.ready","protocolVersion":1,"holderId":hello["holderId"]});
            let _ = (&conn).write_all(format!("{ready}\n").as_bytes());
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
    });
    let (code, _, err) = run(
        &["lease", "--app", CHROME, "--socket", sock.to_str().unwrap(), "--", "sleep", "6.5"],
        dir.path(),
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let n = accepts.load(std::sync::atomic::Ordering::SeqCst);
    // At 0, 1, 3 (and perhaps 6.x) s with the backoff; 7 with a 1 s redial.
    assert!((2..=4).contains(&n), "{n} connections in 6.5 s; stderr:\n{err}");
    let connected = err.lines().filter(|l| l.contains("connected to Aion")).count();
    assert_eq!(connected, 1, "stderr:\n{err}");
}
