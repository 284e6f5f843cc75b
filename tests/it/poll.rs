//! Poll mode (issue 5, PROTOCOL.md §2): the real binary (`aion-connector poll`)
//! against a fake server (util::PollServer) that hands out instructions,
//! checks the bearer token on every request and the timestamped signature on
//! every POST, and records acks, events, output chunks, status and errors.
//! Session commands are small `sh` scripts; nothing here asserts timing beyond
//! generous deadlines (bench/poll.sh measures it).

use crate::util::*;
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use std::thread;
use std::time::{Duration, Instant};

/// The agent token. Never logged.
const TOKEN: &str = "agent-token-5e1d9c3b7a2f4e6d8c0b1a2f3e4d5c6b";

/// Most sessions run `sh -c <script>`, the script being the instruction's `args`.
const SH: &str = r#"["sh","-c"]"#;

/// A fake server and an agent polling it every 100 ms (flush 200 ms, status
/// every 60 s unless `env` says otherwise), state dir in the test's dir.
struct Rig {
    dir: TempDir,
    server: PollServer,
    agent: PollAgent,
    /// The agent's environment (the defaults and the test's own), for `restart`.
    env: Vec<(String, String)>,
}

impl Rig {
    fn new(tag: &str, env: &[(&str, &str)]) -> Rig {
        Rig::with_server(tag, PollServer::start(TOKEN), env)
    }

    fn with_server(tag: &str, server: PollServer, env: &[(&str, &str)]) -> Rig {
        Rig::in_dir(TempDir::new(tag), server, env)
    }

    /// The agent in `dir`, which the test has prepared (a config file, a state
    /// dir), state dir `dir/state`, polling `server`; `env` comes after the
    /// defaults and overrides them.
    fn in_dir(dir: TempDir, server: PollServer, env: &[(&str, &str)]) -> Rig {
        let url = server.url();
        let state = dir.join("state");
        let all: Vec<(String, String)> = [
            ("SERVER_URL", url.as_str()),
            ("AGENT_TOKEN", TOKEN),
            ("POLL_INTERVAL", "100"),
            ("OUTPUT_FLUSH_INTERVAL", "200"),
            ("STATUS_INTERVAL", "60000"),
            ("AION_SESSION_COMMAND", SH),
            ("AION_STATE_DIR", state.to_str().unwrap()),
        ]
        .iter()
        .chain(env)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let agent = Rig::spawn(&dir, &all);
        Rig { dir, server, agent, env: all }
    }

    fn spawn(dir: &TempDir, env: &[(String, String)]) -> PollAgent {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        PollAgent::start(&[], dir.path(), &env)
    }

    /// Starts the next agent on the same dir, state dir, server and
    /// environment, and hands back the old one: its drop (SIGTERM, then
    /// SIGKILL to its sessions' processes) comes when the caller chooses.
    fn restart(&mut self) -> PollAgent {
        std::mem::replace(&mut self.agent, Rig::spawn(&self.dir, &self.env))
    }

    /// Hands out start_session `id` for `session` running `sh -c script`.
    fn start_sh(&self, id: &str, session: &str, script: &str) {
        self.server.push(json!({"id": id, "type": "start_session", "sessionId": session, "args": [script]}));
    }

    fn wait_event(&self, session: &str, name: &str) -> Value {
        self.server.wait_event(session, name, DEADLINE)
    }

    /// The checks every test ends with: clean requests, no token in the log.
    fn finish(&self) {
        self.server.assert_clean();
        let err = self.agent.stderr();
        assert!(!err.contains(TOKEN), "the token appears in stderr:\n{err}");
    }
}

/// The pids printed by a script as `NAME:PID` on stdout.
fn printed_pid(text: &str, name: &str) -> i32 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name}:PID line in {text:?}"))
}

fn gone_soon(pid: i32) -> bool {
    eventually(Duration::from_secs(5), || !alive(pid))
}

// ---------------------------------------------------------------- 1. sessions

#[test]
fn start_session_streams_stdout_stderr_and_events() {
    let script = r#"read -r l; printf '%s\n' "got:$l"; echo err >&2; echo "tok=${AGENT_TOKEN:-none} sid=${AION_SESSION_ID:+set}""#;
    let cmd = json!(["sh", "-c", script]).to_string();
    let rig = Rig::new("poll-start", &[("AION_SESSION_COMMAND", &cmd)]);
    let prompt = "say \"hi\" — ü\\n";
    rig.server.push(json!({"id": "i1", "type": "start_session", "sessionId": "s1", "prompt": prompt}));
    let started = rig.wait_event("s1", "started");
    let exited = rig.wait_event("s1", "exited");
    assert_eq!(exited["exitCode"], 0, "exited event: {exited}");
    assert!(exited.get("signal").is_none_or(Value::is_null), "exited with a signal: {exited}");
    let (names, chunks) = check_poll_session(&rig.server, "s1");
    assert_eq!(names, ["started", "exited"]);

    let out = rig.server.text("s1", "stdout");
    let err = rig.server.text("s1", "stderr");
    assert_eq!(err, "err\n", "stderr chunks: {chunks:?}");
    let mut lines = out.lines();
    let first = lines.next().and_then(|l| l.strip_prefix("got:")).unwrap_or_else(|| panic!("stdout {out:?}"));
    let msg: Value =
        serde_json::from_str(first).unwrap_or_else(|e| panic!("stdin line is not JSON ({e}): {first}"));
    assert_eq!(msg, json!({"type": "user", "message": {"role": "user", "content": prompt}}));
    // the session's environment: no agent token, the sweep marker set
    assert_eq!(lines.next(), Some("tok=none sid=set"), "stdout {out:?}");
    assert_eq!(lines.next(), None, "stdout {out:?}");

    let pid = started["pid"].as_i64().unwrap();
    let log = rig.agent.wait_stderr("Session exited: s1", DEADLINE, |s| s.contains("Session exited: s1"));
    for want in [
        "[INFO] Agent starting...".to_string(),
        format!("Polling server at {}", rig.server.url()),
        "Received instruction: start_session (s1)".to_string(),
        format!("Session started: s1 (pid {pid})"),
    ] {
        assert!(log.contains(&want), "log lacks {want:?}:\n{log}");
    }
    rig.finish();
}

#[test]
fn prompt_placeholder_goes_to_argv_with_args_and_cwd() {
    // With {prompt} in the command nothing is written to stdin: `timeout 0.5 cat` prints nothing.
    let script = r#"printf 'arg:%s|' "$@"; echo; pwd; timeout 0.5 cat; echo end"#;
    let cmd = json!(["sh", "-c", script, "sh", "p={prompt}!"]).to_string();
    let rig = Rig::new("poll-argv", &[("AION_SESSION_COMMAND", &cmd)]);
    let work = rig.dir.join("work dir");
    std::fs::create_dir_all(&work).unwrap();
    rig.server.push(json!({
        "id": "i1", "type": "start_session", "sessionId": "s1", "prompt": "hello world",
        "args": ["--x", "y z"], "cwd": work.to_str().unwrap()
    }));
    let exited = rig.wait_event("s1", "exited");
    assert_eq!(exited["exitCode"], 0, "{exited}");
    check_poll_session(&rig.server, "s1");
    assert_eq!(
        rig.server.text("s1", "stdout"),
        format!("arg:p=hello world!|arg:--x|arg:y z|\n{}\nend\n", work.display())
    );
    rig.finish();
}

#[test]
fn exit_code_and_unstartable_command() {
    let rig = Rig::new("poll-exit", &[]);
    rig.start_sh("i1", "s1", "echo bye; exit 3");
    assert_eq!(rig.wait_event("s1", "exited")["exitCode"], 3);
    check_poll_session(&rig.server, "s1");
    rig.finish();
    drop(rig);

    let rig = Rig::new("poll-failed", &[("AION_SESSION_COMMAND", r#"["/nonexistent/agent-cli"]"#)]);
    rig.server.push(json!({"id": "i1", "type": "start_session", "sessionId": "s1", "prompt": "x"}));
    let failed = rig.wait_event("s1", "failed");
    assert!(failed["message"].as_str().is_some_and(|m| !m.is_empty()), "failed event: {failed}");
    assert_eq!(rig.server.event_names("s1"), ["failed"]);
    rig.finish();
}

// ---------------------------------------------------------------- 2. ack before act

#[test]
fn ack_comes_before_acting_and_a_repeated_id_runs_once() {
    let rig = Rig::new("poll-ack", &[]);
    let ins = json!({"id": "i2", "type": "start_session", "sessionId": "s2", "args": ["echo once"]});
    rig.server.push(ins.clone());
    rig.wait_event("s2", "exited");
    let acks = rig.server.acks();
    let (ack_at, ..) = acks
        .iter()
        .find(|(_, st, ids)| *st == 200 && ids.contains(&"i2".to_string()))
        .unwrap_or_else(|| panic!("no ack of i2: {acks:?}"));
    let started_at = rig.server.events_at("s2")[0].0;
    assert!(ack_at < &started_at, "the ack (request {ack_at}) came after started (request {started_at})");

    // The same instruction again: acked again, not run again.
    rig.server.push(ins);
    rig.server.wait_for("a second ack of i2", DEADLINE, |s| {
        s.acks().iter().filter(|(_, st, ids)| *st == 200 && ids.contains(&"i2".to_string())).count() == 2
    });
    // The agent says it has seen i2 (and does not run it) instead of starting it.
    rig.agent.wait_stderr("i2 seen before", DEADLINE, |s| s.contains("Instruction i2 seen before"));
    assert_eq!(rig.server.event_names("s2"), ["started", "exited"], "{}", rig.server.dump(20));

    // A failed ack: nothing is acted on; the instruction comes again and runs once.
    rig.server.fail_acks(1);
    rig.start_sh("i3", "s3", "echo three");
    rig.wait_event("s3", "exited");
    let acks: Vec<_> =
        rig.server.acks().into_iter().filter(|(_, _, ids)| ids.contains(&"i3".to_string())).collect();
    assert_eq!(acks.iter().map(|a| a.1).collect::<Vec<_>>(), [500, 200], "acks of i3: {acks:?}");
    let started = rig.server.events_at("s3");
    assert!(started[0].0 > acks[1].0, "s3 started before its successful ack:\n{}", rig.server.dump(20));
    assert_eq!(rig.server.event_names("s3"), ["started", "exited"]);
    rig.finish();
}

// ---------------------------------------------------------------- 3. command / terminate

#[test]
fn command_writes_stdin_and_terminate_ends_the_whole_session() {
    let rig = Rig::new("poll-cmd", &[]);
    let script = "read -r a; echo one:$a; read -r b; echo two:$b; \
                  sleep 300 & echo child:$!; setsid sleep 301 & echo escaped:$!; echo sid:$AION_SESSION_ID; wait";
    rig.start_sh("i1", "s3", script);
    let pid = rig.wait_event("s3", "started")["pid"].as_i64().unwrap() as i32;
    rig.server.push(json!({"id": "c1", "type": "command", "sessionId": "s3", "input": "alpha"}));
    rig.server.wait_for("one:alpha", DEADLINE, |s| s.text("s3", "stdout").contains("one:alpha\n"));
    rig.server.push(json!({"id": "c2", "type": "command", "sessionId": "s3", "input": "beta gamma\n"}));
    rig.server.wait_for("the session's pids", DEADLINE, |s| s.text("s3", "stdout").contains("sid:"));
    let out = rig.server.text("s3", "stdout");
    assert!(out.starts_with("one:alpha\ntwo:beta gamma\nchild:"), "stdout {out:?}");
    let child = printed_pid(&out, "child");
    let escaped = printed_pid(&out, "escaped");
    let sid = out.lines().find_map(|l| l.strip_prefix("sid:")).unwrap().to_string();
    assert!(alive(pid) && alive(child) && alive(escaped), "session processes not running");
    rig.agent.wait_stderr("Command sent to s3", DEADLINE, |s| s.contains("Command sent to s3"));

    rig.server.push(json!({"id": "t1", "type": "terminate_session", "sessionId": "s3"}));
    rig.wait_event("s3", "terminated");
    let (names, _) = check_poll_session(&rig.server, "s3");
    assert_eq!(names, ["started", "terminated"]);
    assert!(gone_soon(pid), "the session process {pid} is still alive");
    assert!(gone_soon(child), "the grandchild {child} (sleep 300 &) is still alive");
    assert!(gone_soon(escaped), "the setsid grandchild {escaped} is still alive");
    let marker = format!("AION_SESSION_ID={sid}");
    assert!(
        eventually(Duration::from_secs(5), || marked_processes(&marker).is_empty()),
        "processes still carry {marker}: {:?}",
        marked_processes(&marker)
    );
    rig.agent.wait_stderr("Session terminated: s3", DEADLINE, |s| s.contains("Session terminated: s3"));
    rig.finish();
}

// ---------------------------------------------------------------- 4. concurrency cap

#[test]
fn over_max_concurrent_sessions_is_rejected() {
    let rig = Rig::new("poll-max", &[("MAX_CONCURRENT_SESSIONS", "1")]);
    rig.start_sh("i1", "a", "echo up; sleep 300");
    rig.wait_event("a", "started");
    rig.start_sh("i2", "b", "echo never");
    let rejected = rig.wait_event("b", "rejected");
    assert!(rejected["message"].as_str().is_some_and(|m| !m.is_empty()), "rejected: {rejected}");
    assert_eq!(rig.server.event_names("b"), ["rejected"]);
    assert!(rig.server.chunks("b").is_empty(), "a rejected session printed");

    rig.server.push(json!({"id": "t1", "type": "terminate_session", "sessionId": "a"}));
    rig.wait_event("a", "terminated");
    // the slot is free again
    rig.start_sh("i3", "c", "echo ok");
    assert_eq!(rig.wait_event("c", "exited")["exitCode"], 0);
    check_poll_session(&rig.server, "a");
    check_poll_session(&rig.server, "c");
    rig.finish();
}

#[test]
fn a_second_start_of_a_running_session_id_is_rejected() {
    let rig = Rig::new("poll-dup-session", &[]);
    rig.start_sh("i1", "a", "sleep 300");
    rig.wait_event("a", "started");
    rig.start_sh("i2", "a", "echo twin");
    rig.server.wait_for("a rejected event for the twin", DEADLINE, |s| {
        s.event_names("a").contains(&"rejected".into())
    });
    let names = rig.server.event_names("a");
    assert_eq!(names, ["started", "rejected"], "{}", rig.server.dump(20));
    rig.server.push(json!({"id": "t1", "type": "terminate_session", "sessionId": "a"}));
    rig.server.wait_for("terminated", DEADLINE, |s| s.event_names("a").contains(&"terminated".into()));
    rig.finish();
}

// ---------------------------------------------------------------- 5. seq / flushing

#[test]
fn ten_thousand_lines_arrive_whole_in_few_posts() {
    let rig = Rig::new("poll-seq", &[]);
    rig.start_sh("i1", "big", "seq 1 10000");
    // ~100 lines, one every 20 ms: batched by the 200 ms flush interval
    rig.start_sh("i2", "paced", "i=0; while [ $i -lt 100 ]; do echo p$i; i=$((i+1)); sleep 0.02; done");
    assert_eq!(rig.wait_event("big", "exited")["exitCode"], 0);
    assert_eq!(rig.wait_event("paced", "exited")["exitCode"], 0);

    let (_, chunks) = check_poll_session(&rig.server, "big");
    let expected: String = (1..=10000).map(|i| format!("{i}\n")).collect();
    let got = rig.server.text("big", "stdout");
    assert!(chunks.iter().all(|c| c["stream"] == "stdout"));
    assert_eq!(got.len(), expected.len(), "stdout length");
    assert!(got == expected, "stdout differs from `seq 1 10000`");
    let posts = rig.server.output_posts("big").len();
    assert!(posts <= 20, "{posts} output posts for 10,000 lines");

    check_poll_session(&rig.server, "paced");
    let expected: String = (0..100).map(|i| format!("p{i}\n")).collect();
    assert_eq!(rig.server.text("paced", "stdout"), expected);
    // Streamed while it runs (not all at the end), batched by the flush
    // interval: the typical gap between posts is about 200 ms, however long
    // the ~2 s of output take on a loaded machine.
    let posts = rig.server.output_posts("paced");
    assert!(posts.len() >= 2, "{} output posts for 100 lines over ~2 s", posts.len());
    let mut gaps: Vec<Duration> = posts.windows(2).map(|w| w[1].at - w[0].at).collect();
    gaps.sort();
    if !gaps.is_empty() {
        let median = gaps[gaps.len() / 2];
        assert!(median >= Duration::from_millis(160), "median gap between output posts {median:?}: {gaps:?}");
    }
    rig.finish();
}

#[test]
fn utf8_split_across_reads_is_held_back() {
    // 'é' is written in two halves 300 ms apart (two pipe reads, two flushes).
    let rig = Rig::new("poll-utf8", &[]);
    rig.start_sh("i1", "u", r"printf 'a\303'; sleep 0.3; printf '\251b\n'");
    rig.wait_event("u", "exited");
    check_poll_session(&rig.server, "u");
    assert_eq!(rig.server.text("u", "stdout"), "aéb\n");
    rig.finish();
}

// ---------------------------------------------------------------- 6. outage

#[test]
fn server_outage_loses_and_repeats_nothing() {
    let mut rig = Rig::new("poll-outage", &[("OUTPUT_FLUSH_INTERVAL", "100")]);
    rig.start_sh("i1", "o", "i=0; while [ $i -lt 300 ]; do echo line$i; i=$((i+1)); sleep 0.01; done");
    rig.server.wait_for("some output of o", DEADLINE, |s| s.chunks("o").len() >= 2);
    let down_ms = now_ms();
    let down = Instant::now();
    rig.server.down();
    rig.agent.wait_stderr("the outage noticed", DEADLINE, |s| s.contains("Cannot poll the server"));
    // The outage itself (not a synchronisation): it lasts 2.5 s while the
    // session keeps printing, so output is produced while nothing is delivered.
    thread::sleep(Duration::from_millis(2500).saturating_sub(down.elapsed()));
    let up_ms = now_ms();
    rig.server.up();
    // (the agent's backoff reached 2-4 s during the outage)
    rig.server.wait_event("o", "exited", Duration::from_secs(60));

    let (names, chunks) = check_poll_session(&rig.server, "o");
    assert_eq!(names, ["started", "exited"]);
    let expected: String = (0..300).map(|i| format!("line{i}\n")).collect();
    assert_eq!(rig.server.text("o", "stdout"), expected);
    let during =
        chunks.iter().filter(|c| (down_ms..up_ms).contains(&(c["ts"].as_u64().unwrap() as u128))).count();
    assert!(during > 0, "no output was produced while the server was down (the test proves nothing)");
    let log = rig.agent.stderr();
    assert_eq!(log.matches("Cannot poll the server").count(), 1, "unreachable logged not once:\n{log}");
    rig.finish();
}

fn now_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
}

// ---------------------------------------------------------------- 7. 401

#[test]
fn a_refused_token_backs_off_without_spinning() {
    let server = PollServer::start(TOKEN);
    server.set_refuse(true);
    let mut rig = Rig::with_server("poll-401", server, &[]);
    rig.agent.wait_stderr("the refusal", DEADLINE, |s| s.contains("refused the agent token"));
    // Time passing is the test: with pollInterval 100 a spinning agent would
    // poll ~40 times in these 4 s; one that backs off, not again.
    thread::sleep(Duration::from_secs(4));
    let n = rig.server.requests().len();
    assert!(n >= 1, "the agent never polled");
    assert!(n <= 3, "{n} requests in 4 s against a 401 (pollInterval 100):\n{}", rig.server.dump(20));
    let log = rig.agent.stderr();
    assert_eq!(log.matches("refused the agent token").count(), 1, "refusal logged not once:\n{log}");
    let st = rig.agent.signal_and_wait(Signal::SIGTERM, Duration::from_secs(5));
    assert_eq!(st.code(), Some(0), "exit after SIGTERM");
    rig.finish();
}

// ---------------------------------------------------------------- 8. status

fn sessions_of(status: &Value) -> Vec<Value> {
    status["sessions"].as_array().cloned().unwrap_or_else(|| panic!("status without sessions: {status}"))
}

#[test]
fn status_is_posted_at_session_start_and_end_and_periodically() {
    let rig = Rig::new("poll-status", &[("MAX_CONCURRENT_SESSIONS", "3")]);
    rig.server.wait_for("the first status", DEADLINE, |s| !s.statuses().is_empty());
    let (_, first) = &rig.server.statuses()[0];
    assert_eq!(first["version"], "0.1.0", "status: {first}");
    assert_eq!(first["maxConcurrentSessions"], 3, "status: {first}");
    assert!(first["uptimeSeconds"].is_u64(), "status: {first}");
    assert!(sessions_of(first).is_empty(), "status: {first}");

    rig.start_sh("i1", "st", "sleep 1");
    let pid = rig.wait_event("st", "started")["pid"].as_i64().unwrap();
    // statusInterval is 60 s: these come from the session's start and end
    rig.server.wait_for("a status listing st", DEADLINE, |s| {
        s.statuses().iter().any(|(_, v)| sessions_of(v).iter().any(|x| x["sessionId"] == "st"))
    });
    let listed = rig.server.statuses().into_iter().find(|(_, v)| !sessions_of(v).is_empty()).unwrap().1;
    let entry = &sessions_of(&listed)[0];
    assert_eq!(entry["state"], "running", "{listed}");
    assert_eq!(entry["pid"].as_i64(), Some(pid), "{listed}");
    assert!(entry["startedAt"].is_u64(), "{listed}");
    rig.wait_event("st", "exited");
    let n = rig.server.statuses().len();
    rig.server.wait_for("an empty status after the end", DEADLINE, |s| {
        s.statuses().last().is_some_and(|(_, v)| sessions_of(v).is_empty())
    });
    assert!(n <= 4, "{n} statuses with a 60 s interval:\n{}", rig.server.dump(20));
    rig.finish();
    drop(rig);

    // STATUS_INTERVAL=300: statuses keep coming (4 of them, waited for), and
    // not faster than the interval allows (each gap at least half of it).
    let rig = Rig::new("poll-status-interval", &[("STATUS_INTERVAL", "300")]);
    rig.server.wait_for("4 statuses", DEADLINE, |s| s.statuses().len() >= 4);
    let at: Vec<Instant> = rig.server.statuses().iter().map(|(at, _)| *at).collect();
    let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.iter().all(|g| *g >= Duration::from_millis(150)),
        "statuses closer than half of STATUS_INTERVAL=300: gaps {gaps:?}"
    );
    rig.finish();
}

// ---------------------------------------------------------------- 9. errors

#[test]
fn bad_instructions_are_reported_as_errors() {
    let rig = Rig::new("poll-errors", &[]);
    rig.server.push(json!({"id": "e1", "type": "command", "sessionId": "nope", "input": "x"}));
    rig.server.push(json!({"id": "e2", "type": "terminate_session", "sessionId": "nope2"}));
    rig.server.push(json!({"id": "e3", "type": "reboot", "sessionId": "s"}));
    rig.server.push(json!({"type": "start_session", "sessionId": "noid"}));
    rig.server.wait_for("4 errors", DEADLINE, |s| s.errors().len() >= 4);
    // Errors are posted by the poll loop itself, before its next GET: two more
    // GETs (the first may hand out again what was not acked) and every error
    // of those rounds has arrived.
    let fourth = rig.server.requests().iter().filter(|r| r.is_post("/api/agent/errors")).nth(3).unwrap().at;
    rig.server.wait_for("two polls after the errors", DEADLINE, |s| {
        s.requests().iter().filter(|r| r.method == "GET" && r.at > fourth).count() >= 2
    });
    let errors = rig.server.errors();
    let by = |id: &str| -> Value {
        errors
            .iter()
            .find(|e| e["instructionId"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no error for {id}: {errors:?}"))
    };
    assert_eq!(by("e1")["sessionId"], "nope");
    assert_eq!(by("e2")["sessionId"], "nope2");
    assert_eq!(by("e3")["sessionId"], "s");
    for e in &errors {
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "error without message: {e}");
    }
    assert!(
        errors.iter().any(|e| e.get("instructionId").is_none()),
        "no error for the instruction without an id: {errors:?}"
    );
    assert_eq!(errors.len(), 4, "errors: {errors:?}");
    assert!(rig.server.events("noid").is_empty(), "an instruction without an id was run");
    rig.finish();
}

/// One poll answer of 20,000 copies of one id, 20,000 instructions without
/// an id and 30 bad ones: a handful of log lines and at most 10 error posts
/// (plus one summary each for the id-less and the unreported), acked once
/// per distinct id; a second answer of 20,000 copies seen before is one line.
#[test]
fn a_flood_of_repeated_and_bad_instructions_logs_a_handful_of_lines() {
    let rig = Rig::new("poll-dups", &[]);
    first_get(&rig.server, DEADLINE);
    let lines_at_start = rig.agent.stderr().lines().count();
    let bad =
        (0..30).map(|i| json!({"id": format!("c{i}"), "type": "command", "sessionId": format!("no{i}")}));
    let flood = std::iter::repeat_n(json!({"id": "d"}), 20_000)
        .chain(std::iter::repeat_n(json!({"x": 1}), 20_000))
        .chain(bad);
    rig.server.push_all(flood);
    rig.server.wait_for("the flood's summary post", DEADLINE, |s| {
        s.errors().iter().any(|e| e["message"].as_str().is_some_and(|m| m.contains("more error(s)")))
    });
    let errors = rig.server.errors();
    let messages: Vec<&str> = errors.iter().filter_map(|e| e["message"].as_str()).collect();
    assert_eq!(errors.len(), 12, "error posts: {messages:#?}");
    assert!(messages.contains(&"20000 instructions without an id; ignored"), "{messages:#?}");
    assert!(messages.iter().any(|m| m.starts_with("21 more error(s)")), "{messages:#?}");
    let acks = rig.server.acks();
    let ack = &acks.last().unwrap().2;
    assert_eq!(ack.len(), 31, "ids acked: {ack:?}");
    let log = rig.agent.wait_stderr("the repeats' summary", DEADLINE, |s| {
        s.contains("19999 instructions seen before (1 distinct id(s), the first d)")
    });
    let first = log.lines().count() - lines_at_start;
    // one `Received instruction` per distinct id, 10 errors, 3 summaries
    let received = log.lines().filter(|l| l.contains("Received instruction")).count();
    assert_eq!(received, 31, "{log}");
    assert!(first - received <= 15, "{first} log lines for one poll answer:\n{log}");

    // the same id 20,000 times again: all seen before, one line
    rig.server.push_all(std::iter::repeat_n(json!({"id": "d"}), 20_000));
    let log = rig.agent.wait_stderr("the second summary", DEADLINE, |s| {
        s.contains("20000 instructions seen before (1 distinct id(s), the first d)")
    });
    // (the poll after it, which found nothing, logs nothing)
    rig.server.wait_for("the pending list emptied", DEADLINE, |s| s.acks().len() >= 2);
    let second = rig.agent.stderr().lines().count() - lines_at_start - first;
    assert!(second <= 2, "{second} log lines for an answer of repeats:\n{log}");
    assert_eq!(rig.server.errors().len(), 12, "a repeat was reported as an error");
    rig.finish();
}

// ---------------------------------------------------------------- 10. configuration

fn first_get(server: &PollServer, within: Duration) {
    server.wait_for("a poll", within, |s| s.requests().iter().any(|r| r.method == "GET"));
}

#[test]
fn environment_overrides_the_file() {
    let server = PollServer::start(TOKEN);
    let dir = TempDir::new("poll-cfg");
    let file = dir.join("agent.json");
    write(
        &file,
        json!({"serverUrl": "http://127.0.0.1:9", "agentToken": "wrong", "pollInterval": 60000}).to_string(),
    );
    let url = server.url();
    let state = dir.join("state");
    let env =
        [("SERVER_URL", url.as_str()), ("AGENT_TOKEN", TOKEN), ("AION_STATE_DIR", state.to_str().unwrap())];
    let agent = PollAgent::start(&["--config", file.to_str().unwrap()], dir.path(), &env);
    first_get(&server, DEADLINE);
    // Time passing is the test: without the file's pollInterval 60000 the
    // agent would poll again within the default 5 s (±10%).
    thread::sleep(Duration::from_secs(6));
    let gets = server.requests().iter().filter(|r| r.method == "GET").count();
    assert_eq!(gets, 1, "pollInterval 60000 from the file is not used:\n{}", server.dump(20));
    server.assert_clean();
    assert!(!agent.stderr().contains(TOKEN));
    drop(agent);

    // ./config.json is the default file; -c and --config= name another
    let server = PollServer::start(TOKEN);
    let cfg = json!({"serverUrl": server.url(), "agentToken": TOKEN, "pollInterval": 100, "stateDir": state})
        .to_string();
    write(dir.join("config.json"), &cfg);
    let agent = PollAgent::start(&[], dir.path(), &[]);
    first_get(&server, DEADLINE);
    drop(agent);
    let server = PollServer::start(TOKEN);
    let other = dir.join("other.json");
    let cfg = json!({"serverUrl": server.url(), "agentToken": TOKEN, "stateDir": state}).to_string();
    write(&other, &cfg);
    let arg = format!("--config={}", other.display());
    let agent = PollAgent::start(&[&arg], dir.path(), &[]);
    first_get(&server, DEADLINE);
    drop(agent);
    let server = PollServer::start(TOKEN);
    write(&other, json!({"serverUrl": server.url(), "agentToken": TOKEN, "stateDir": state}).to_string());
    let agent = PollAgent::start(&["-c", other.to_str().unwrap()], dir.path(), &[]);
    first_get(&server, DEADLINE);
    server.assert_clean();
    drop(agent);
}

#[test]
fn config_problems_exit_2_naming_each() {
    let dir = TempDir::new("poll-cfg-bad");
    let (code, _, err) = run_poll(&[], dir.path(), &[]);
    assert_eq!(code, 2, "no config at all: {err}");
    assert!(err.contains("serverUrl") && err.contains("SERVER_URL"), "{err}");
    assert!(err.contains("agentToken") && err.contains("AGENT_TOKEN"), "{err}");

    let env = [("SERVER_URL", "http://127.0.0.1:9"), ("AGENT_TOKEN", TOKEN), ("POLL_INTERVAL", "abc")];
    let (code, _, err) = run_poll(&[], dir.path(), &env);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("$POLL_INTERVAL") && err.contains("abc"), "{err}");
    assert!(!err.contains(TOKEN), "token in the error text: {err}");

    // every problem at once
    let env =
        [("POLL_INTERVAL", "5"), ("MAX_CONCURRENT_SESSIONS", "many"), ("AION_SESSION_COMMAND", "claude")];
    let (code, _, err) = run_poll(&[], dir.path(), &env);
    assert_eq!(code, 2, "{err}");
    for want in
        ["serverUrl", "agentToken", "$POLL_INTERVAL", "$MAX_CONCURRENT_SESSIONS", "$AION_SESSION_COMMAND"]
    {
        assert!(err.contains(want), "{want} not named: {err}");
    }

    // a file given explicitly must exist; a file with only serverUrl names agentToken
    let (code, _, err) = run_poll(&["--config", dir.join("missing.json").to_str().unwrap()], dir.path(), &[]);
    assert_eq!(code, 2, "{err}");
    let file = dir.join("half.json");
    write(&file, r#"{"serverUrl":"http://127.0.0.1:9"}"#);
    let (code, _, err) = run_poll(&["-c", file.to_str().unwrap()], dir.path(), &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("agentToken") && !err.contains("serverUrl (or"), "{err}");
}

#[test]
fn poll_help_and_version() {
    let dir = TempDir::new("poll-help");
    let (code, out, err) = run_poll(&["--help"], dir.path(), &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("poll") && out.contains("SERVER_URL"), "help: {out}");
    let (code, out, err) = run_poll(&["--version"], dir.path(), &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "aion-connector 0.1.0");
}

// ---------------------------------------------------------------- 11. SIGTERM

#[test]
fn sigterm_terminates_sessions_and_exits_0() {
    let mut rig = Rig::new("poll-sigterm", &[]);
    rig.start_sh("i1", "k", "echo sid:$AION_SESSION_ID; sleep 300 & echo child:$!; sleep 300");
    let pid = rig.wait_event("k", "started")["pid"].as_i64().unwrap() as i32;
    rig.server.wait_for("the session's pids", DEADLINE, |s| s.text("k", "stdout").contains("child:"));
    let out = rig.server.text("k", "stdout");
    let child = printed_pid(&out, "child");
    let sid = out.lines().find_map(|l| l.strip_prefix("sid:")).unwrap().to_string();

    let t = Instant::now();
    let st = rig.agent.signal_and_wait(Signal::SIGTERM, Duration::from_secs(20));
    assert_eq!(st.code(), Some(0), "exit status after SIGTERM: {st:?}\n{}", rig.agent.stderr());
    let took = t.elapsed();
    let (names, _) = check_poll_session(&rig.server, "k");
    assert_eq!(names, ["started", "terminated"], "{}", rig.server.dump(20));
    assert!(!alive(pid), "session process {pid} outlived the agent");
    assert!(gone_soon(child), "grandchild {child} outlived the agent");
    assert!(marked_processes(&format!("AION_SESSION_ID={sid}")).is_empty(), "marked processes left");
    assert!(rig.agent.leftovers().is_empty(), "session processes left: {:?}", rig.agent.leftovers());
    let log = rig.agent.stderr();
    assert!(log.contains("Agent stopped"), "log:\n{log}");
    assert!(took < Duration::from_secs(12), "SIGTERM -> exit took {took:?}");
    // nothing left spooled
    let spool = rig.dir.join("state/poll-outbox");
    // (`.lock` is the spool directory's lock file, not a post)
    let left: Vec<_> = std::fs::read_dir(&spool)
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).filter(|n| n != ".lock").collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "spool not empty after a clean stop: {left:?}");
    rig.finish();
}

#[test]
fn terminate_kills_a_session_that_ignores_sigterm() {
    let rig = Rig::new("poll-stubborn", &[]);
    // SIG_IGN is inherited: neither sh nor its sleep die of SIGTERM
    rig.start_sh("i1", "x", "trap '' TERM; echo ready; sleep 300; echo survived");
    let pid = rig.wait_event("x", "started")["pid"].as_i64().unwrap() as i32;
    rig.server.wait_for("ready", DEADLINE, |s| s.text("x", "stdout") == "ready\n");
    let t = Instant::now();
    rig.server.push(json!({"id": "t1", "type": "terminate_session", "sessionId": "x"}));
    rig.server.wait_event("x", "terminated", Duration::from_secs(60));
    let took = t.elapsed();
    assert!(took >= Duration::from_secs(3), "terminated after {took:?}: the 5 s grace was not given");
    assert!(gone_soon(pid), "{pid} still alive");
    assert_eq!(rig.server.text("x", "stdout"), "ready\n");
    let (names, _) = check_poll_session(&rig.server, "x");
    assert_eq!(names, ["started", "terminated"]);
    rig.finish();
}

// ---------------------------------------------------------------- spool

#[test]
fn posts_spooled_while_the_server_is_down_are_delivered_after_a_restart() {
    let mut rig = Rig::new("poll-spool", &[]);
    rig.start_sh("i1", "sp", "read -r go; sleep 0.5; seq 1 3000; echo bye >&2");
    rig.wait_event("sp", "started");
    rig.server.push(json!({"id": "c1", "type": "command", "sessionId": "sp", "input": "go"}));
    rig.agent.wait_stderr("the command sent", DEADLINE, |s| s.contains("Command sent to sp"));
    rig.server.down();
    rig.agent.wait_stderr("the session's end", DEADLINE, |s| s.contains("Session exited: sp"));
    // SIGTERM with the server down: the outbox tries for up to ~10 s, then exits 0 leaving the spool
    let st = rig.agent.signal_and_wait(Signal::SIGTERM, Duration::from_secs(120));
    assert_eq!(st.code(), Some(0), "exit status: {st:?}\n{}", rig.agent.stderr());
    let spool = rig.dir.join("state/poll-outbox");
    let files: Vec<String> = std::fs::read_dir(&spool)
        .unwrap_or_else(|e| panic!("{}: {e}", spool.display()))
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(files.iter().any(|f| f.ends_with(".q")), "nothing spooled in {}: {files:?}", spool.display());
    let before = rig.server.requests().len();

    // the next start resumes the spool
    rig.server.up();
    drop(rig.restart());
    if !eventually(Duration::from_secs(15), || rig.server.event_names("sp").contains(&"exited".to_string())) {
        panic!(
            "the restarted agent did not deliver the spooled posts; requests since the restart:\n{}\nagent stderr:\n{}",
            rig.server.requests()[before..].iter().map(PollReq::line).collect::<Vec<_>>().join("\n"),
            rig.agent.stderr()
        );
    }
    let (names, _) = check_poll_session(&rig.server, "sp");
    assert_eq!(names, ["started", "exited"]);
    let expected: String = (1..=3000).map(|i| format!("{i}\n")).collect();
    assert_eq!(rig.server.text("sp", "stdout"), expected);
    assert_eq!(rig.server.text("sp", "stderr"), "bye\n");
    assert!(rig.server.requests().len() > before);
    assert!(
        eventually(DEADLINE, || std::fs::read_dir(&spool)
            .map(|d| d.filter_map(Result::ok).all(|e| e.file_name() == ".lock"))
            .unwrap_or(true)),
        "spool files left after delivery"
    );
    rig.finish();
}

/// kill -9 of the connector while a session runs: the session outlives it
/// (nothing could end it) until the next start on the same state dir ends
/// every process of the old instance (`end_previous`) and closes the
/// session with exactly one `failed`. The old harness is kept alive until
/// then, so that its drop (which SIGKILLs its marked processes) cannot be
/// what ended them.
#[test]
fn a_crashed_agent_closes_the_session_on_the_next_start() {
    let mut rig = Rig::new("poll-crash", &[]);
    rig.start_sh("i1", "cr", "echo alive; sleep 300");
    let started = rig.wait_event("cr", "started");
    rig.server.wait_for("alive", DEADLINE, |s| s.text("cr", "stdout") == "alive\n");
    let session = started["pid"].as_i64().unwrap() as i32;
    let mark =
        instance_mark(session).unwrap_or_else(|| panic!("session {session} carries no AION_CONNECTOR"));
    // The server has both posts; the kill comes once the agent has recorded
    // them as delivered too (a kill between the server's answer and that
    // record would rightly post the last one again after the restart).
    let status = rig.dir.join("state/poll-outbox.status");
    let delivered = || {
        let text = std::fs::read_to_string(&status).unwrap_or_default();
        serde_json::from_str::<Value>(text.trim()).ok().and_then(|v| v["delivered"].as_u64()).unwrap_or(0)
    };
    assert!(
        eventually(DEADLINE, || delivered() >= 2),
        "{} post(s) confirmed in {}",
        delivered(),
        status.display()
    );
    rig.agent.signal_and_wait(Signal::SIGKILL, Duration::from_secs(5));
    let old = marked_processes(&mark);
    assert!(old.contains(&session), "the session {session} died with the connector; old instance: {old:?}");
    // The old harness stays alive (its drop would kill the session) until
    // the new connector has been seen to end the old instance itself.
    let old_agent = rig.restart();
    let gone = eventually(DEADLINE, || marked_processes(&mark).is_empty());
    assert!(
        gone,
        "the restarted connector left the old instance's processes {:?}; its stderr:\n{}",
        marked_processes(&mark),
        rig.agent.stderr()
    );
    drop(old_agent);
    let failed = rig.server.wait_event("cr", "failed", DEADLINE);
    assert!(failed["message"].as_str().is_some_and(|m| m.contains("stopped")), "{failed}");
    let (names, _) = check_poll_session(&rig.server, "cr");
    assert_eq!(names, ["started", "failed"]);
    rig.finish();
}

/// Under `nofile` 64 a configured cap of 100 sessions is lowered, with one
/// warning, to what fits after the reserve (5); the sixth start is
/// `rejected`, not an EMFILE, and status reports the lowered cap.
#[test]
fn an_open_file_limit_below_the_session_cap_lowers_the_cap_with_a_warning() {
    const NAME: &str = "an_open_file_limit_below_the_session_cap_lowers_the_cap_with_a_warning";
    if !std::process::Command::new("prlimit").arg("--version").output().is_ok_and(|o| o.status.success()) {
        skip(NAME, "prlimit (util-linux) is not installed");
        return;
    }
    let server = PollServer::start(TOKEN);
    let dir = TempDir::new("poll-nofile");
    let (url, state) = (server.url(), dir.join("state"));
    let env = [
        ("SERVER_URL", url.as_str()),
        ("AGENT_TOKEN", TOKEN),
        ("POLL_INTERVAL", "100"),
        ("STATUS_INTERVAL", "60000"),
        ("MAX_CONCURRENT_SESSIONS", "100"),
        ("AION_SESSION_COMMAND", SH),
        ("AION_STATE_DIR", state.to_str().unwrap()),
    ];
    // Its drop kills what is left of the sessions, at the end or in a panic.
    let mut agent = PollAgent::start_under(&["prlimit", "--nofile=64:64", "--"], &[], dir.path(), &env);
    let check = || -> Result<(), String> {
        first_get(&server, DEADLINE);
        for i in 0..7 {
            server.push(json!({"id": format!("i{i}"), "type": "start_session", "sessionId": format!("s{i}"), "args": ["sleep 60"]}));
        }
        let closed =
            |s: &PollServer| (0..7).filter(|i| !s.event_names(&format!("s{i}")).is_empty()).count() == 7;
        server.wait_for("an event of each session", DEADLINE, closed);
        let names: Vec<Vec<String>> = (0..7).map(|i| server.event_names(&format!("s{i}"))).collect();
        let started = names.iter().filter(|n| n.as_slice() == ["started"]).count();
        let rejected = names.iter().filter(|n| n.as_slice() == ["rejected"]).count();
        let log = agent.stderr();
        let warning = "[WARN] maxConcurrentSessions is 100 but the open-file limit (nofile) is 64: running at most 5 sessions";
        if log.matches(warning).count() != 1 || (started, rejected) != (5, 2) {
            return Err(format!("started {started}, rejected {rejected} ({names:?}); log:\n{log}"));
        }
        if log.contains("os error 24") || log.to_lowercase().contains("too many open files") {
            return Err(format!("EMFILE:\n{log}"));
        }
        let status = server.statuses().last().map(|s| s.1.clone()).unwrap_or_default();
        if status["maxConcurrentSessions"] != 5 {
            return Err(format!("status: {status}"));
        }
        Ok(())
    };
    let result = check();
    let _ = agent.child.kill();
    let _ = agent.child.wait();
    if let Err(e) = result {
        panic!("{e}");
    }
    server.assert_clean();
}

// ---------------------------------------------------------------- found by probing (see the report)

#[test]
fn a_refused_token_also_pauses_status_posts() {
    let server = PollServer::start(TOKEN);
    server.set_refuse(true);
    let rig = Rig::with_server("poll-401-status", server, &[("STATUS_INTERVAL", "300")]);
    rig.agent.wait_stderr("the refusal", DEADLINE, |s| s.contains("refused the agent token"));
    // Time passing is the test: statuses every 300 ms would be ~10 posts in 3 s.
    thread::sleep(Duration::from_secs(3));
    let n = rig.server.requests().len();
    assert!(n <= 3, "{n} requests in 3 s against a 401 (statusInterval 300):\n{}", rig.server.dump(6));
    rig.finish();
}

#[test]
fn a_command_a_session_does_not_read_blocks_nothing_else() {
    let mut rig = Rig::new("poll-stdin-full", &[]);
    rig.start_sh("i1", "n", "sleep 300");
    rig.wait_event("n", "started");
    // more than a pipe buffer holds, to a process that never reads its stdin
    rig.server.push(json!({"id": "c1", "type": "command", "sessionId": "n", "input": "y".repeat(200_000)}));
    rig.server
        .wait_for("the command's ack", DEADLINE, |s| s.acks().iter().any(|a| a.2.contains(&"c1".into())));
    rig.start_sh("i2", "m", "echo alive");
    let ran =
        eventually(Duration::from_secs(5), || rig.server.event_names("m").contains(&"exited".to_string()));
    let t = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(rig.agent.pid()), Signal::SIGTERM).unwrap();
    let exited = wait_exit(&mut rig.agent.child, Duration::from_secs(12));
    let acks: Vec<Vec<String>> = rig.server.acks().into_iter().map(|a| a.2).collect();
    assert!(
        ran && exited.is_some_and(|st| st.code() == Some(0)),
        "after a 200 kB command to a session that does not read stdin: a later start_session ran: {ran} \
         (acks: {acks:?}); SIGTERM -> {exited:?} after {:?} (the poll loop is stuck writing to the pipe)",
        t.elapsed()
    );
    rig.finish();
}

#[test]
fn output_posts_stay_within_512_kib() {
    let rig = Rig::new("poll-post-size", &[]);
    rig.start_sh("i1", "big", "head -c 3000000 /dev/zero | tr '\\0' 'a'");
    rig.wait_event("big", "exited");
    check_poll_session(&rig.server, "big");
    assert_eq!(rig.server.text("big", "stdout").len(), 3_000_000);
    let chunk_max = rig.server.chunks("big").iter().map(|c| c["data"].as_str().unwrap().len()).max().unwrap();
    assert!(chunk_max <= 64 << 10, "a chunk of {chunk_max} bytes of data");
    let sizes: Vec<usize> = rig.server.output_posts("big").iter().map(|r| r.body.len()).collect();
    assert!(
        sizes.iter().all(|&n| n <= 512 << 10),
        "output post bodies over 512 KiB (524288 bytes): {sizes:?}"
    );
    rig.finish();
}

#[test]
fn a_trailing_partial_utf8_sequence_is_not_dropped() {
    let rig = Rig::new("poll-utf8-tail", &[]);
    rig.start_sh("i1", "u", r"printf 'ab\303'");
    rig.wait_event("u", "exited");
    assert_eq!(
        rig.server.text("u", "stdout"),
        "ab\u{FFFD}",
        "the last byte (half of a UTF-8 sequence) was lost"
    );
    rig.finish();
}

#[test]
fn a_missing_cwd_is_named_in_the_failed_event() {
    let rig = Rig::new("poll-bad-cwd", &[]);
    rig.server.push(json!({
        "id": "i1", "type": "start_session", "sessionId": "c", "args": ["echo hi"], "cwd": "/nonexistent/dir"
    }));
    let failed = rig.wait_event("c", "failed");
    let msg = failed["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("/nonexistent/dir") && !msg.contains("not found on PATH"),
        "failed event for a missing cwd: {failed}"
    );
    rig.finish();
}

// ---------------------------------------------------------------- Aion leases

#[test]
fn sessions_hold_the_lease_apps_while_they_run() {
    use crate::util::lease_server::LeaseServer;
    const APP: &str = "com.google.Chrome";
    let dir = TempDir::new("poll-lease");
    let aion = LeaseServer::start(&dir.join("aion.sock"));
    let config = json!({"leaseApps": [APP], "lease": {"socket": aion.path_str(), "holderId": "poll-h"}});
    write(dir.join("config.json"), config.to_string());
    let rig = Rig::in_dir(dir, PollServer::start(TOKEN), &[]);
    let (dir, server, state) = (&rig.dir, &rig.server, rig.dir.join("state"));
    server.push(json!({"id": "l1", "type": "start_session", "sessionId": "ls", "args": ["sleep 300"]}));
    server.wait_event("ls", "started", DEADLINE);
    let begin = aion.wait_received("lease.begin", APP, 0, DEADLINE);
    assert_eq!(begin.msg["holderId"], "poll-h");
    // `status` with poll mode's config file (no stateDir: $AION_STATE_DIR) shows the lease
    let cfg = dir.join("config.json");
    let lease = poll("the lease in status", || {
        let state_env = [("AION_STATE_DIR", state.to_str().unwrap())];
        let (code, out, err) = run(&["status", cfg.to_str().unwrap(), "--json"], dir.path(), &state_env);
        assert_eq!(code, 0, "status: {err}");
        let v: Value = serde_json::from_str(out.trim()).expect("status --json prints JSON");
        let l = v["lease"].clone();
        (l["link"] == "up" && l["apps"][0]["app"] == APP).then_some(l)
    });
    assert_eq!(lease["apps"].as_array().unwrap().len(), 1, "{lease}");
    let (reply, took) = aion.can_close(APP).unwrap();
    assert_eq!(reply["result"], "extend_lease", "while the session runs");
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(aion.received_for("lease.end", APP).is_empty(), "ended while the session runs");
    server.push(json!({"id": "l2", "type": "terminate_session", "sessionId": "ls"}));
    server.wait_event("ls", "terminated", DEADLINE);
    aion.wait_received("lease.end", APP, 0, DEADLINE);
    let (reply, _) = aion.can_close(APP).unwrap();
    assert_eq!(reply["result"], "allow_close", "after the session");
    assert!(aion.violations().is_empty(), "{:?}", aion.violations());
    assert!(!rig.agent.stderr().contains(TOKEN));
}

// ---------------------------------------------------------------- `aion-connector status` (poll.sock)

/// `aion-connector status` of the poll agent whose state dir is `state`
/// (through poll mode's config file naming it), with `extra` arguments.
fn poll_status(dir: &std::path::Path, state: &std::path::Path, extra: &[&str]) -> (i32, String, String) {
    let cfg = dir.join("status-config.json");
    write(&cfg, json!({"stateDir": state}).to_string());
    let mut args = vec!["status", cfg.to_str().unwrap()];
    args.extend_from_slice(extra);
    run(&args, dir, &[])
}

#[test]
fn status_shows_the_poll_sessions_and_exits_3_once_stopped() {
    let mut rig = Rig::new("poll-local-status", &[]);
    let state = rig.dir.join("state");
    rig.start_sh("i1", "st1", "echo hello; sleep 300");
    let pid = rig.wait_event("st1", "started")["pid"].as_i64().unwrap();
    rig.server.wait_for("the first output", DEADLINE, |s| s.text("st1", "stdout").contains("hello"));

    // JSON: the session, its posts all delivered (started + the output)
    let v = poll("the session's posts delivered in status", || {
        let (code, out, err) = poll_status(rig.dir.path(), &state, &["--json"]);
        assert_eq!(code, 0, "status --json: {err}");
        let v: Value = serde_json::from_str(out.trim()).expect("status --json prints JSON");
        let s = &v["sessions"][0];
        (s["posts"].as_u64() >= Some(2) && s["pending"] == 0).then_some(v)
    });
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["mode"], "poll", "{v}");
    assert_eq!(v["server"], rig.server.url(), "{v}");
    assert_eq!(v["pid"], rig.agent.pid(), "{v}");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"), "{v}");
    assert_eq!(v["maxConcurrentSessions"], 5, "{v}");
    assert!(v["uptimeSeconds"].is_u64(), "{v}");
    let sessions = v["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1, "{v}");
    let s = &sessions[0];
    assert_eq!(s["id"], "st1", "{v}");
    assert_eq!(s["state"], "running", "{v}");
    assert_eq!(s["pid"], pid, "{v}");
    assert_eq!(s["delivered"], s["posts"], "{v}");
    assert!(s["ageSeconds"].is_number(), "{v}");
    let origin = &v["outbox"]["origins"];
    assert!(origin.as_array().is_some_and(|o| o.iter().all(|g| g["origin"] == rig.server.url())), "{v}");
    assert!(v["outbox"]["delivered"].as_u64() >= Some(2), "{v}");
    assert!(v["lease"].is_null(), "no lease client without leaseApps: {v}");
    assert!(!v.to_string().contains(TOKEN), "the token in status: {v}");
    // the socket is the agent's alone
    let socket = state.join("poll.sock");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "{}", socket.display());

    // text
    let (code, out, err) = poll_status(rig.dir.path(), &state, &[]);
    assert_eq!(code, 0, "status: {err}");
    let head = format!("poll mode (pid {}) up ", rig.agent.pid());
    let line = format!("session st1 pid {pid} running ");
    for want in [head.as_str(), &format!("polling {}", rig.server.url()), "sessions: 1 of at most 5", &line] {
        assert!(out.contains(want), "status lacks {want:?}:\n{out}");
    }
    assert!(out.contains("leases: none configured"), "{out}");
    assert!(!out.contains(TOKEN), "{out}");

    // no CONFIG: poll mode's defaults ($AION_STATE_DIR) are asked too
    let (code, out, err) =
        run(&["status", "--json"], rig.dir.path(), &[("AION_STATE_DIR", state.to_str().unwrap())]);
    assert_eq!(code, 0, "status --json without CONFIG: {err}");
    assert!(out.contains("\"mode\":\"poll\""), "{out}");

    // the session ends: it leaves the list
    rig.server.push(json!({"id": "i2", "type": "terminate_session", "sessionId": "st1"}));
    rig.wait_event("st1", "terminated");
    poll("the ended session to leave status", || {
        let (code, out, _) = poll_status(rig.dir.path(), &state, &["--json"]);
        let v: Value = serde_json::from_str(out.trim()).ok()?;
        (code == 0 && v["sessions"] == json!([])).then_some(())
    });

    // stopped: nobody answers, the socket is gone
    let st = rig.agent.signal_and_wait(Signal::SIGTERM, Duration::from_secs(20));
    assert_eq!(st.code(), Some(0), "{}", rig.agent.stderr());
    assert!(!socket.exists(), "the socket outlived the agent");
    let (code, out, err) = poll_status(rig.dir.path(), &state, &["--json"]);
    assert_eq!(code, 3, "stdout {out}\nstderr {err}");
    assert!(err.contains("no connector running"), "{err}");
    assert!(out.is_empty(), "{out}");
    rig.finish();
}

#[test]
fn status_exits_3_after_a_killed_poll_agent() {
    let mut rig = Rig::new("poll-local-status-kill", &[]);
    let state = rig.dir.join("state");
    poll("the agent's socket", || state.join("poll.sock").exists().then_some(()));
    let (code, _, err) = poll_status(rig.dir.path(), &state, &["--json"]);
    assert_eq!(code, 0, "{err}");
    // SIGKILL leaves the socket file: a stale socket is no connector
    let _ = rig.agent.signal_and_wait(Signal::SIGKILL, Duration::from_secs(5));
    let (code, _, err) = poll_status(rig.dir.path(), &state, &[]);
    assert_eq!(code, 3, "{err}");
    // the next agent on the state dir replaces the stale socket
    drop(rig.restart());
    let next = &mut rig.agent;
    let v = poll("the next agent in status", || {
        let (code, out, _) = poll_status(rig.dir.path(), &state, &["--json"]);
        let v: Value = serde_json::from_str(out.trim()).ok()?;
        (code == 0 && v["pid"] == next.pid()).then_some(v)
    });
    assert_eq!(v["mode"], "poll");
    let st = next.signal_and_wait(Signal::SIGTERM, Duration::from_secs(20));
    assert_eq!(st.code(), Some(0), "{}", next.stderr());
}

#[test]
fn an_agent_that_cannot_bind_its_socket_still_polls() {
    let dir = TempDir::new("poll-no-socket");
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    write(state.join("poll.sock"), "not a socket");
    let mut rig = Rig::in_dir(dir, PollServer::start(TOKEN), &[]);
    let (dir, server, agent) = (&rig.dir, &rig.server, &mut rig.agent);
    server.push(json!({"id": "n1", "type": "start_session", "sessionId": "ns", "args": ["echo hi"]}));
    server.wait_event("ns", "exited", DEADLINE);
    let log = agent.stderr();
    assert!(log.contains("cannot serve the status socket") && log.contains("not a socket"), "{log}");
    assert_eq!(std::fs::read_to_string(state.join("poll.sock")).unwrap(), "not a socket", "left alone");
    let (code, out, err) =
        run(&["status", "--json"], dir.path(), &[("AION_STATE_DIR", state.to_str().unwrap())]);
    assert_eq!(code, 3, "stdout {out}\nstderr {err}");
    let st = agent.signal_and_wait(Signal::SIGTERM, Duration::from_secs(20));
    assert_eq!(st.code(), Some(0), "{}", agent.stderr());
}
