//! The terminal: the WebSocket `GET /ws?token=…` on real PTYs with a real
//! WebSocket client (tungstenite), and the HTTP `terminal.*` actions. Every
//! server runs its shells as `/bin/sh -l` with HOME in the test's directory.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::util::*;
use nix::sys::signal::Signal;
use serde_json::{Value, json};

const TA: &str = "tok-term-A-0001";
const TB: &str = "tok-term-B-0002";

/// Projects "a" (token TA) and "b" (token TB); `limits` as the top-level member.
fn start(tag: &str, limits: Option<Value>) -> (TempDir, Server) {
    let tmp = TempDir::new(tag);
    let srv = serve(&tmp, limits);
    (tmp, srv)
}

/// Starts (or starts again: the same config and state dir) the server of `start`.
fn serve(tmp: &TempDir, limits: Option<Value>) -> Server {
    let (a, b, home) = (tmp.join("a"), tmp.join("b"), tmp.join("home"));
    for d in [&a, &b, &home] {
        std::fs::create_dir_all(d).unwrap();
    }
    write(home.join(".profile"), "PS1='$ '\n");
    write(home.join(".shrc"), "PS1='$ '\n");
    let cfg = config(
        json!({
            "a": {"token": TA, "dir": a.to_str().unwrap()},
            "b": {"token": TB, "dir": b.to_str().unwrap()},
        }),
        limits.map(|l| json!({ "limits": l })),
    );
    let (home_s, env_s) =
        (home.to_str().unwrap().to_string(), home.join(".shrc").to_str().unwrap().to_string());
    Server::start_env(
        tmp.path(),
        &cfg,
        &[
            ("SHELL", "/bin/sh"),
            ("HOME", &home_s),
            ("ENV", &env_s),
            ("AGENT_TOKEN", "agent-secret-xyz"),
            ("AION_TEST_SECRET", "aion-secret-xyz"),
        ],
    )
}

fn target(token: &str, extra: &str) -> String {
    format!("/ws?token={token}{extra}")
}

static QUESTION: AtomicUsize = AtomicUsize::new(0);

/// `echo`es `expr` in the shell behind a marker the typed line's echo cannot
/// match, and returns the value printed.
fn ask(ws: &mut Ws, expr: &str) -> String {
    let n = QUESTION.fetch_add(1, Ordering::Relaxed);
    ws.send_text(&format!("echo Q{n}-$((40+2))={expr}\r"));
    ws.expect_value(&format!("Q{n}-42=")).trim().to_string()
}

/// A raw upgrade request on a fresh connection: (status, body, head).
fn upgrade_raw(srv: &Server, target: &str, headers: Option<&[&str]>) -> (u16, String, String) {
    let resp = raw(&srv.addr, &ws_upgrade_request(&srv.addr, target, headers)).expect("an answer");
    (resp.status, resp.text(), resp.head)
}

/// Gone for good: not alive, and not a zombie child of the connector either.
fn reaped(pid: i32, server: u32) -> bool {
    !alive(pid) && ppid(pid) != Some(server as i32)
}

/// The number of threads of a process.
fn threads(pid: u32) -> i64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let line = status.lines().find(|l| l.starts_with("Threads:")).expect("a Threads line");
    line["Threads:".len()..].trim().parse().expect("a thread count")
}

fn ping_ok(srv: &Server) {
    let (status, v) = srv.call(TA, "ping", json!({}));
    assert_eq!((status, &v["ok"]), (200, &json!(true)), "ping: {v}");
}

// ------------------------------------------------------------ 1. refusals

#[test]
fn refusals_are_plain_http_before_any_upgrade() {
    let (_tmp, srv) = start("ws-refuse", None);
    for t in
        ["/ws?token=wrong", "/ws", "/ws?token=", "/elsewhere?token=nope&session=x", "/ws?tok=tok-term-A-0001"]
    {
        let (status, body, head) = upgrade_raw(&srv, t, None);
        assert_eq!(status, 403, "{t}: {head}\n{body}");
        assert_eq!(body, r#"{"error":"unauthorized"}"#, "{t}");
        assert!(!head.to_ascii_lowercase().contains("sec-websocket-accept"), "{t}: {head}");
    }
    // tungstenite sees the same refusal
    let e = ws_try_connect(&srv.addr, "/ws?token=wrong").err().expect("refused");
    assert!(e.starts_with("HTTP 403"), "{e}");

    // bad upgrade headers with a good token
    let key = format!("Sec-WebSocket-Key: {WS_KEY}");
    let cases: [(&str, Vec<&str>); 3] = [
        ("no key", vec!["Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13"]),
        ("version 8", vec!["Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 8", &key]),
        ("no Connection", vec!["Upgrade: websocket", "Sec-WebSocket-Version: 13", &key]),
    ];
    for (what, headers) in &cases {
        let (status, body, head) = upgrade_raw(&srv, &target(TA, ""), Some(headers));
        assert_eq!(status, 400, "{what}: {head}\n{body}");
        assert_eq!(body, r#"{"error":"bad websocket upgrade"}"#, "{what}");
    }
    // session ids of 1-128 characters
    let long = "s".repeat(129);
    let (status, body, _) = upgrade_raw(&srv, &target(TA, &format!("&session={long}")), None);
    assert_eq!(status, 400, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["error"], "bad payload", "{body}");

    // the upgrade works on any path; the server is fine after all that
    let mut ws = ws_connect(&srv.addr, &format!("/some/path?token={TA}"));
    assert_eq!(ask(&mut ws, "ok"), "ok");
    ws.close_clean();
    ping_ok(&srv);
}

// ------------------------------------------------------------ 2. echo

#[test]
fn echo_through_binary_and_text_frames() {
    let (tmp, srv) = start("ws-echo", None);
    let mut ws = ws_connect(&srv.addr, &target(TA, ""));
    ws.send_binary(b"echo hi-$((6*7))\r");
    ws.expect("hi-42");
    ws.send_text("echo hi-$((6*7))\r");
    ws.expect("hi-42");
    // one keystroke per frame
    for b in b"echo hi-$((6*9))\r" {
        ws.send_binary(&[*b]);
    }
    ws.expect("hi-54");
    assert_eq!(ws.binary_frames, 0, "text frames unless ?encoding=binary (the original's)");
    assert!(ws.text_frames > 0);

    // the shell's world: project dir, TERM, the marker, no connector secrets
    assert_eq!(ask(&mut ws, "$(pwd)"), tmp.join("a").to_str().unwrap());
    assert_eq!(ask(&mut ws, "$TERM/$COLORTERM"), "xterm-256color/truecolor");
    assert_eq!(ask(&mut ws, "${AION_TERMINAL_ID:+marked}"), "marked");
    assert_eq!(ask(&mut ws, "[${AGENT_TOKEN:-}${AION_TEST_SECRET:-}]"), "[]");
    ws.close_clean();
}

// ------------------------------------------------------------ 3. resize

#[test]
fn resize_frame_and_size_query() {
    let (_tmp, srv) = start("ws-resize", None);
    let mut ws = ws_connect(&srv.addr, &target(TA, ""));
    assert_eq!(ask(&mut ws, "$(stty size)"), "24 80", "default size");
    ws.send_text(r#"{"type":"resize","cols":123,"rows":45}"#);
    assert_eq!(ask(&mut ws, "$(stty size)"), "45 123");
    ws.send_text("stty size\r");
    ws.expect("45 123");
    ws.close_clean();

    let mut ws = ws_connect(&srv.addr, &target(TA, "&cols=100&rows=30"));
    assert_eq!(ask(&mut ws, "$(stty size)"), "30 100", "?cols&rows");
    ws.close_clean();
}

// ------------------------------------------------------------ 4. exit

#[test]
fn shell_exit_closes_with_1000() {
    let (_tmp, srv) = start("ws-exit", None);
    for cmd in ["exit\r", "exit 3\r"] {
        let mut ws = ws_connect(&srv.addr, &target(TA, ""));
        let pid = ws.shell_pid("ex");
        ws.send_text(cmd);
        assert_eq!(ws.wait_close(Duration::from_secs(8)), Some(1000), "{cmd:?}");
        assert!(eventually(Duration::from_secs(5), || reaped(pid, srv.pid())), "shell {pid} left behind");
    }
    ping_ok(&srv);
}

// ------------------------------------------------------------ 5. socket close ends the shell

#[test]
fn closing_the_socket_kills_the_shell_and_its_background_jobs() {
    let (_tmp, srv) = start("ws-hup", None);
    let mut ws = ws_connect(&srv.addr, &target(TA, ""));
    let pid = ws.shell_pid("sh");
    ws.send_text("sleep 300 & echo BG$((1+1))=$!\r");
    let bg: i32 = ws.expect_value("BG2=").trim().parse().unwrap();
    assert!(alive(pid) && alive(bg), "shell {pid} and sleep {bg} run");
    ws.close_clean();
    assert!(
        eventually(Duration::from_secs(6), || reaped(pid, srv.pid()) && !alive(bg)),
        "after the close: shell {pid} alive={} (ppid {:?}), background sleep {bg} alive={}",
        alive(pid),
        ppid(pid),
        alive(bg)
    );

    // the same without a close frame: the TCP connection just drops
    let mut ws = ws_connect(&srv.addr, &target(TA, ""));
    let pid = ws.shell_pid("sh2");
    ws.drop_tcp();
    assert!(eventually(Duration::from_secs(6), || reaped(pid, srv.pid())), "shell {pid} after a TCP drop");
}

/// kill -9 of the connector with a terminal open: the shell gets the PTY's
/// hangup, but a job it started in the background outlives the connector
/// (nothing else could end it) until the next start on the same state dir
/// ends every process of the old instance.
#[test]
fn a_terminal_left_by_a_crashed_connector_ends_on_the_next_start() {
    let (tmp, mut srv) = start("ws-crash", None);
    let mut ws = ws_connect(&srv.addr, &target(TA, ""));
    let pid = ws.shell_pid("cr");
    ws.send_text("sleep 300 & echo BG$((1+1))=$!\r");
    let bg: i32 = ws.expect_value("BG2=").trim().parse().unwrap();
    let mark = instance_mark(pid).unwrap_or_else(|| panic!("shell {pid} carries no AION_CONNECTOR"));
    // Right after `$!` the job may still be in its exec, when /proc/PID/environ
    // reads empty: wait for a reading that has the variable.
    eventually(Duration::from_secs(5), || instance_mark(bg).is_some());
    assert_eq!(instance_mark(bg).as_deref(), Some(mark.as_str()), "the background job's mark");
    srv.signal_and_wait(Signal::SIGKILL, Duration::from_secs(5));
    drop(ws);
    let old = marked_processes(&mark);
    let cleanup = |pids: &[i32]| {
        for p in pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p), Signal::SIGKILL);
        }
    };
    if !old.contains(&bg) {
        cleanup(&old);
        panic!("job {bg} of shell {pid} died with the connector (the test proves nothing); left: {old:?}");
    }
    let srv = serve(&tmp, None);
    if !eventually(DEADLINE, || marked_processes(&mark).is_empty()) {
        let left = marked_processes(&mark);
        cleanup(&left);
        panic!("the restarted connector left the old instance's {left:?}; stderr:\n{}", srv.stderr());
    }
    ping_ok(&srv);
}

// ------------------------------------------------------------ 6. many terminals, limits

#[test]
fn twenty_terminals_then_the_per_project_limit() {
    let (_tmp, srv) = start("ws-many", Some(json!({"terminalsPerProject": 20})));
    let threads_before = threads(srv.pid());
    let mut socks: Vec<Ws> = (0..20).map(|_| ws_connect(&srv.addr, &target(TA, ""))).collect();
    for (i, ws) in socks.iter_mut().enumerate() {
        ws.send_text(&format!("echo n{i}-$(({i}*1000+7))\r"));
    }
    for (i, ws) in socks.iter_mut().enumerate() {
        ws.expect(&format!("n{i}-{}", i * 1000 + 7));
    }
    let mut pids: Vec<i32> = socks.iter_mut().map(|ws| ws.shell_pid("many")).collect();
    pids.sort();
    pids.dedup();
    assert_eq!(pids.len(), 20, "20 distinct shells");
    // a socket's pump is its connection's thread; the shell's waiter is the
    // only other one (and one `terminals` thread for them all)
    let grew = threads(srv.pid()) - threads_before;
    assert!(grew <= 2 * 20 + 1, "{grew} more threads for 20 terminals");
    // the 21st is refused before the upgrade; the other project is not limited by this one
    let (status, body, head) = upgrade_raw(&srv, &target(TA, ""), None);
    assert_eq!((status, body.as_str()), (429, r#"{"error":"too many terminals"}"#), "{head}");
    let mut other = ws_connect(&srv.addr, &target(TB, ""));
    assert_eq!(ask(&mut other, "b"), "b");
    for ws in socks {
        ws.drop_tcp();
    }
    other.drop_tcp();

    let (_tmp2, srv) = start("ws-limit", Some(json!({"terminalsPerProject": 2})));
    let mut one = ws_connect(&srv.addr, &target(TA, ""));
    let mut two = ws_connect(&srv.addr, &target(TA, ""));
    assert_eq!(ask(&mut one, "1"), "1");
    assert_eq!(ask(&mut two, "2"), "2");
    let (status, body, head) = upgrade_raw(&srv, &target(TA, ""), None);
    assert_eq!((status, body.as_str()), (429, r#"{"error":"too many terminals"}"#), "3rd: {head}");
    assert!(!head.to_ascii_lowercase().contains("upgrade: websocket"), "{head}");
    let (status, v) = srv.call(TA, "terminal.spawn", json!({}));
    assert_eq!((status, v.clone()), (429, json!({"error":"too many terminals"})), "HTTP terminals count too");
    // a freed slot is usable again
    one.close_clean();
    poll("a slot after a close", || ws_try_connect(&srv.addr, &target(TA, "")).ok()).drop_tcp();
    // WebSocket and HTTP terminals share the limit
    let slot = poll("a slot after a drop", || {
        let (status, v) = srv.call(TA, "terminal.spawn", json!({}));
        (status == 200).then_some(v)
    });
    let (status, body, _) = upgrade_raw(&srv, &target(TA, ""), None);
    assert_eq!(status, 429, "one WS + one HTTP terminal fill a limit of 2: {body}");
    let (status, _) = srv.call(TA, "terminal.close", json!({"sessionId": slot["sessionId"]}));
    assert_eq!(status, 200);
    poll("a slot after terminal.close", || ws_try_connect(&srv.addr, &target(TA, "")).ok()).drop_tcp();
    two.drop_tcp();
}

// ------------------------------------------------------------ 7. flow control

#[test]
fn a_client_that_stops_reading_keeps_server_memory_bounded() {
    let (_tmp, srv) = start("ws-flow", None);
    let mut ws = ws_connect(&srv.addr, &target(TA, ""));
    let before = assert_unread_flood_keeps_memory_bounded(&srv, &mut ws, || ping_ok(&srv));
    ws.close_clean();
    ping_ok(&srv);
    assert!(srv.rss_kb() <= before + 4096, "RSS {} kB after, {before} kB before", srv.rss_kb());
}

// ------------------------------------------------------------ 8. full duplex

#[test]
fn ctrl_c_stops_a_flood_while_it_streams() {
    let (_tmp, srv) = start("ws-duplex", None);
    let mut ws = ws_connect(&srv.addr, &target(TA, ""));
    ws.send_text("yes\r");
    ws.expect("y\r\ny\r\ny\r\n");
    // keep reading for a moment: the flood is on
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(300) {
        ws.pump(Duration::from_millis(50));
    }
    let sent = Instant::now();
    ws.send_binary(b"\x03");
    ws.send_text("echo done-$((2+3))\r");
    if !ws.seen_within("done-5", Duration::from_secs(3)) {
        // the line may have been typed before the interrupt flushed the input
        ws.send_text("echo done-$((2+3))\r");
        ws.expect_within("done-5", Duration::from_secs(3));
    }
    assert!(sent.elapsed() < Duration::from_secs(6), "Ctrl-C took {:?}", sent.elapsed());
    // the flood stopped: only a prompt (or so) follows in the next 500 ms
    let mark = ws.out.len();
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(500) {
        ws.pump(Duration::from_millis(50));
    }
    let after = String::from_utf8_lossy(&ws.out[mark..]).into_owned();
    assert!(after.len() < 2048 && !after.contains("y\r\ny\r\n"), "still flooding: {:.300}", after);
    assert_eq!(ask(&mut ws, "$((1+2))"), "3");
    ws.close_clean();
}

// ------------------------------------------------------------ 9. reattach

#[test]
fn session_reattach_replays_and_keeps_the_shell() {
    let (_tmp, srv) = start("ws-session", None);
    let mut a = ws_connect(&srv.addr, &target(TA, "&session=abc"));
    a.send_text("echo first-$((1+1))\r");
    a.expect("first-2");
    let pid = a.shell_pid("s1");
    a.drop_tcp();

    let mut a2 = ws_connect(&srv.addr, &target(TA, "&session=abc"));
    a2.expect("first-2");
    let first = a2.first_frames.first().copied();
    assert!(
        first.is_some_and(|(text, len)| text && a2.cursor() <= len),
        "the replay is the first (text) frame: frames {:?}, match ends at {}",
        a2.first_frames,
        a2.cursor()
    );
    assert_eq!(a2.shell_pid("s2"), pid, "the same shell continues");

    // another project's token with the same session id: a new terminal
    let mut b = ws_connect(&srv.addr, &target(TB, "&session=abc"));
    let pb = b.shell_pid("s3");
    assert_ne!(pb, pid);
    assert!(!String::from_utf8_lossy(&b.out).contains("first-2"), "project b saw project a's output");
    b.close_clean();

    // a second socket on an attached session takes over; the first gets 4000
    let mut a3 = ws_connect(&srv.addr, &target(TA, "&session=abc"));
    assert_eq!(a2.wait_close(Duration::from_secs(8)), Some(4000));
    assert_eq!(a3.shell_pid("s4"), pid);
    assert!(alive(pid));

    // without a session: a reconnect is a new shell and the old one ends
    let mut n = ws_connect(&srv.addr, &target(TA, ""));
    let p1 = n.shell_pid("n1");
    n.drop_tcp();
    let mut n2 = ws_connect(&srv.addr, &target(TA, ""));
    let p2 = n2.shell_pid("n2");
    assert_ne!(p1, p2);
    assert!(eventually(Duration::from_secs(6), || reaped(p1, srv.pid())), "shell {p1} left behind");
    n2.close_clean();

    a3.send_text("exit\r");
    assert_eq!(a3.wait_close(Duration::from_secs(8)), Some(1000));
    assert!(eventually(Duration::from_secs(5), || reaped(pid, srv.pid())));
    // an exited session is not reattached: the same id gets a new shell
    let mut a4 = ws_connect(&srv.addr, &target(TA, "&session=abc"));
    assert_ne!(a4.shell_pid("s5"), pid);
    a4.close_clean();

    // the replay is the last 64 KiB, in one frame
    let mut big = ws_connect(&srv.addr, &target(TA, "&session=big"));
    big.send_text("head -c 200000 /dev/zero | tr '\\0' x; echo; echo big-$((2+2))\r");
    big.expect_within("big-4", Duration::from_secs(15));
    big.drop_tcp();
    let mut big2 = ws_connect(&srv.addr, &target(TA, "&session=big"));
    big2.expect("big-4");
    let (text, len) = big2.first_frames[0];
    assert!(text && len <= 64 << 10 && len > 60 << 10, "replay frame: {:?}", big2.first_frames);
    assert!(big2.cursor() <= len, "big-4 not in the replay frame: {:?}", big2.first_frames);
    big2.send_text("exit\r");
    assert_eq!(big2.wait_close(Duration::from_secs(8)), Some(1000));
}

#[test]
fn a_detached_session_keeps_running_and_replays_its_latest_output() {
    let (tmp, srv) = start("ws-detached-run", None);
    let mut ws = ws_connect(&srv.addr, &target(TA, "&session=busy"));
    // 3 s from now the shell prints 20000 lines (about 200 KB: far more than
    // a PTY holds), then marks a file; the socket is gone by then
    ws.send_text(
        "sleep 3; i=0; while [ $i -lt 20000 ]; do echo line-$i; i=$((i+1)); done; echo fin > done.txt\r",
    );
    ws.expect("done.txt");
    ws.drop_tcp();
    let done = tmp.join("a/done.txt");
    assert!(
        eventually(Duration::from_secs(60), || done.exists()),
        "the detached shell did not get through its output (nobody read its PTY?)"
    );
    let mut back = ws_connect(&srv.addr, &target(TA, "&session=busy"));
    back.expect("line-19999");
    let (text, len) = back.first_frames[0];
    assert!(text && len <= 64 << 10 && len > 60 << 10, "the replay: {:?}", back.first_frames);
    assert!(back.cursor() <= len, "line-19999 is not in the replay frame");
    assert!(
        !String::from_utf8_lossy(&back.out[..len]).contains("line-1\r\n"),
        "the replay is not the latest"
    );
    assert_eq!(ask(&mut back, "still"), "still");
    back.close_clean();
}

// ------------------------------------------------------------ 10. SIGPIPE

#[test]
fn sigpipe_is_default_in_the_shell() {
    let (_tmp, srv) = start("ws-pipe", None);
    let mut ws = ws_connect(&srv.addr, &target(TA, ""));
    ws.send_text("yes | head -3; echo rc=$?\r");
    ws.expect("rc=0");
    // yes itself died of SIGPIPE (128+13), without a "Broken pipe" complaint
    assert_eq!(ask(&mut ws, "$( { (yes; echo $? >&3) | head -1 >/dev/null; } 3>&1 )"), "141");
    assert!(
        !String::from_utf8_lossy(&ws.out).contains("Broken pipe"),
        "{}",
        String::from_utf8_lossy(&ws.out)
    );
    ws.close_clean();
}

// ------------------------------------------------------------ 11. text frames

#[test]
fn encoding_text_sends_whole_utf8() {
    let (_tmp, srv) = start("ws-text", None);
    let mut ws = ws_connect(&srv.addr, &target(TA, "&encoding=text"));
    ws.send_text("printf '\\342\\202\\254\\360\\237\\230\\200\\n'\r");
    ws.expect("€😀\r\n");
    // a long run written at once (cat), so PTY reads cut sequences, arrives whole
    ws.send_text(
        "i=0; while [ $i -lt 3000 ]; do printf '\\342\\202\\254\\360\\237\\230\\200'; i=$((i+1)); done >u.txt\r",
    );
    ws.send_text("cat u.txt; echo; echo end-$((5*5))\r");
    ws.expect("end-25");
    let text = String::from_utf8(ws.out.clone()).expect("text frames are UTF-8");
    assert!(text.contains(&"€😀".repeat(3000)), "the run was damaged");
    assert!(!text.contains('\u{FFFD}'), "replacement characters in valid output");
    // an invalid byte becomes U+FFFD
    ws.send_text("printf 'a\\377b\\n'\r");
    ws.expect("a\u{FFFD}b");
    assert_eq!(ws.binary_frames, 0, "no binary frames with ?encoding=text");
    assert!(ws.text_frames > 0);
    ws.close_clean();
}

/// The shell prints `P42`, the first two bytes of 😀, pauses 0.5 s, then
/// the last two bytes and `E42`: the two halves of the character come out
/// of the PTY in separate reads. `$((6*7))` keeps the typed line's echo from
/// matching. Returns what followed `P42` in the frame that brought it.
fn print_split_emoji(ws: &mut Ws) -> Vec<u8> {
    ws.send_text("printf 'P%s\\360\\237' $((6*7)); sleep 0.5; printf '\\230\\200E%s\\n' $((6*7))\r");
    ws.expect("P42");
    let rest = ws.out[ws.cursor()..].to_vec();
    ws.expect("E42");
    rest
}

#[test]
fn text_frames_by_default_never_split_a_character() {
    let (_tmp, srv) = start("ws-utf8", None);
    let mut ws = ws_connect(&srv.addr, &target(TA, ""));
    let mut split = false;
    for _ in 0..3 {
        let mark = ws.cursor();
        // nothing of the character came with P42: its first half waited for the second
        split |= print_split_emoji(&mut ws).is_empty();
        let text = String::from_utf8(ws.out[mark..ws.cursor()].to_vec()).expect("text frames are UTF-8");
        assert!(text.contains("P42😀E42"), "{text:?}");
        assert!(!text.contains('\u{FFFD}'), "a character was cut: {text:?}");
        if split {
            break;
        }
    }
    assert!(split, "the two halves of the character never came in separate reads");
    // the explicit form of the default
    let mut explicit = ws_connect(&srv.addr, &target(TA, "&encoding=text"));
    assert_eq!(ask(&mut explicit, "$(printf '\\360\\237\\230\\200')"), "😀");
    assert_eq!((ws.binary_frames, explicit.binary_frames), (0, 0), "binary frames without ?encoding=binary");
    assert!(ws.text_frames > 0 && explicit.text_frames > 0);
    ws.close_clean();
    explicit.close_clean();
    // anything else is refused before the upgrade
    let (status, body, _) = upgrade_raw(&srv, &target(TA, "&encoding=utf16"), None);
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"error": "bad payload", "detail": "encoding must be text or binary"})
    );
}

#[test]
fn encoding_binary_sends_the_pty_bytes_as_they_come() {
    let (_tmp, srv) = start("ws-binary", None);
    let mut ws = ws_connect(&srv.addr, &target(TA, "&encoding=binary"));
    let mut split = false;
    for _ in 0..3 {
        let mark = ws.cursor();
        // the frame that brought P42 ended with the first half of the character
        split |= print_split_emoji(&mut ws) == b"\xF0\x9F";
        assert!(ws.out[mark..ws.cursor()].windows(7).any(|w| w == "P42😀".as_bytes()));
        if split {
            break;
        }
    }
    assert!(split, "the two halves of the character never came in separate frames");
    assert_eq!(ws.text_frames, 0, "text frames with ?encoding=binary");
    assert!(ws.binary_frames > 0);
    ws.close_clean();
}

#[test]
fn resize_messages_with_bad_sizes_are_refused_and_never_typed() {
    let (_tmp, srv) = start("ws-badresize", None);
    let mut ws = ws_connect(&srv.addr, &target(TA, ""));
    assert_eq!(ask(&mut ws, "$(stty size)"), "24 80");
    let mark = ws.cursor();
    for bad in [
        r#"{"type":"resize","cols":0,"rows":40}"#,
        r#"{"type":"resize","cols":10001,"rows":40}"#,
        r#"{"type":"resize","cols":-1,"rows":40}"#,
        r#"{"type":"resize","cols":100.5,"rows":40}"#,
        r#"{"type":"resize","cols":"100","rows":40}"#,
        r#"{"type":"resize","cols":100}"#,
        r#"{"type":"resize"}"#,
    ] {
        ws.send_text(bad);
        ws.send_binary(bad.as_bytes());
    }
    assert_eq!(ask(&mut ws, "$(stty size)"), "24 80", "a refused resize changed the size");
    let seen = String::from_utf8_lossy(&ws.out[mark..]).into_owned();
    assert!(
        !seen.contains("resize") && !seen.contains("cols"),
        "a resize message reached the shell: {seen:?}"
    );
    // a good one in a binary frame works too (the original does not tell them apart)
    ws.send_binary(br#"{"type":"resize","cols":99,"rows":33}"#);
    assert_eq!(ask(&mut ws, "$(stty size)"), "33 99");
    // JSON that is not a resize message is keystrokes, as in the original
    ws.send_text(r#"{"type":"other"}"#);
    ws.send_binary(b"\x15"); // Ctrl-U: forget the line
    assert_eq!(ask(&mut ws, "ok"), "ok");
    assert!(String::from_utf8_lossy(&ws.out[mark..]).contains(r#"{"type":"other"}"#), "not typed");
    ws.close_clean();
}

#[test]
fn sixty_four_terminals_per_project_by_default() {
    // a team's browser tabs: HTTP terminals, live sockets and reattachable
    // sessions waiting for theirs all count
    let (_tmp, mut srv) = start("ws-cap", None);
    let mut live = Vec::new();
    for i in 0..64 {
        match i % 3 {
            0 => {
                let (status, v) = srv.call(TA, "terminal.spawn", json!({}));
                assert_eq!(status, 200, "terminal {i}: {v}");
            }
            1 => live.push(ws_connect(&srv.addr, &target(TA, ""))),
            _ => ws_connect(&srv.addr, &target(TA, &format!("&session=tab{i}"))).drop_tcp(),
        }
    }
    let (status, body, head) = upgrade_raw(&srv, &target(TA, ""), None);
    assert_eq!((status, body.as_str()), (429, r#"{"error":"too many terminals"}"#), "the 65th: {head}");
    let (status, body, _) = upgrade_raw(&srv, &target(TA, "&session=tab65"), None);
    assert_eq!((status, body.as_str()), (429, r#"{"error":"too many terminals"}"#), "a 65th session");
    let (status, v) = srv.call(TA, "terminal.spawn", json!({}));
    assert_eq!((status, v), (429, json!({"error": "too many terminals"})), "a 65th HTTP terminal");
    // a waiting session is reattached, not counted twice
    let mut tab = ws_connect(&srv.addr, &target(TA, "&session=tab2"));
    assert_eq!(ask(&mut tab, "back"), "back");
    // the other project is not limited by this one
    let mut other = ws_connect(&srv.addr, &target(TB, ""));
    assert_eq!(ask(&mut other, "b"), "b");
    assert_eq!(ask(&mut live[0], "a"), "a");
    let status = srv.signal_and_wait(Signal::SIGTERM, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "stderr:\n{}", srv.stderr());
}

// ------------------------------------------------------------ 12. descriptors

#[test]
fn the_shell_inherits_no_descriptor_of_the_connector() {
    let (_tmp, srv) = start("ws-fds", None);
    let mut a = ws_connect(&srv.addr, &target(TA, ""));
    let pa = a.shell_pid("fa");
    let mut b = ws_connect(&srv.addr, &target(TA, ""));
    let pb = b.shell_pid("fb");
    // a program started in the shell has 0, 1, 2 and the directory ls reads
    assert_eq!(ask(&mut b, "$(ls /proc/self/fd | tr '\\n' ,)"), "0,1,2,3,");
    // the shells themselves hold only their own terminal (no master, no socket)
    let mut ttys = Vec::new();
    for pid in [pa, pb] {
        let fds = fd_targets(pid);
        let tty = fds.iter().find(|(fd, _)| *fd == 0).map(|(_, t)| t.clone()).expect("fd 0");
        assert!(tty.starts_with("/dev/pts/"), "shell {pid} stdin is {tty}");
        // (dash keeps its controlling terminal open as /dev/tty on fd 10)
        assert!(
            fds.iter().all(|(_, t)| *t == tty || t == "/dev/tty"),
            "shell {pid} holds more than its terminal: {fds:?}"
        );
        ttys.push(tty);
    }
    assert_ne!(ttys[0], ttys[1]);
    a.close_clean();
    b.close_clean();
}

// ------------------------------------------------------------ 13. HTTP terminal.*

/// terminal.output until the data seen contains `pat`; all data seen.
fn http_output_until(srv: &Server, id: &str, pat: &str) -> String {
    let mut seen = String::new();
    poll(&format!("terminal.output showing {pat:?}"), || {
        let (status, v) = srv.call(TA, "terminal.output", json!({"sessionId": id}));
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["ok"], true, "{v}");
        seen.push_str(v["data"].as_str().expect("data"));
        seen.contains(pat).then(|| seen.clone())
    })
}

#[test]
fn http_terminal_actions() {
    let (_tmp, srv) = start("http-term", None);
    let (status, v) = srv.call(TA, "terminal.spawn", json!({"cols": 100, "rows": 30}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["ok"], true);
    let id = v["sessionId"].as_str().expect("sessionId").to_string();

    let input = |data: &str| {
        let (status, v) = srv.call(TA, "terminal.input", json!({"sessionId": id, "data": data}));
        assert_eq!((status, v.clone()), (200, json!({"ok": true})), "input {data:?}");
    };
    input("stty size\r");
    http_output_until(&srv, &id, "30 100");
    let (_, again) = srv.call(TA, "terminal.output", json!({"sessionId": id}));
    assert_eq!(again["alive"], true, "{again}");
    assert!(!again["data"].as_str().unwrap().contains("30 100"), "a drain repeated data: {again}");

    let (status, v) = srv.call(TA, "terminal.resize", json!({"sessionId": id, "cols": 132, "rows": 43}));
    assert_eq!((status, v.clone()), (200, json!({"ok": true})));
    input("stty size\r");
    http_output_until(&srv, &id, "43 132");

    input("printf '\\342\\202\\254\\n'\r");
    http_output_until(&srv, &id, "€");

    // the other project cannot use the id; unknown ids are 404, except for
    // terminal.close and terminal.resize, which answer {"ok":true} as the
    // original's (and end or resize nothing)
    let no = json!({"error": "no session"});
    for (token, sid) in [(TB, id.as_str()), (TA, "t-nope"), (TA, "")] {
        for (action, extra) in
            [("terminal.input", json!({"data": "echo x\r"})), ("terminal.output", json!({}))]
        {
            let mut payload = extra;
            payload["sessionId"] = json!(sid);
            let (status, v) = srv.call(token, action, payload);
            assert_eq!((status, &v), (404, &no), "{action} {sid:?} with {token}");
        }
        for (action, payload) in [
            ("terminal.resize", json!({"sessionId": sid, "cols": 10, "rows": 10})),
            ("terminal.resize", json!({"sessionId": sid})),
            ("terminal.close", json!({"sessionId": sid})),
        ] {
            let (status, v) = srv.call(token, action, payload);
            assert_eq!((status, v), (200, json!({"ok": true})), "{action} {sid:?} with {token}");
        }
    }
    // resize without sizes is a no-op (the original ignored them); one size
    // alone or a bad one is a 400, also for an unknown id
    let (status, v) = srv.call(TA, "terminal.resize", json!({"sessionId": id}));
    assert_eq!((status, v), (200, json!({"ok": true})));
    for sid in [id.as_str(), "t-nope"] {
        for bad in [json!({"cols": 50}), json!({"cols": 0, "rows": 10}), json!({"cols": "80", "rows": 10})] {
            let mut payload = bad.clone();
            payload["sessionId"] = json!(sid);
            let (status, v) = srv.call(TA, "terminal.resize", payload);
            assert_eq!((status, v["error"].clone()), (400, json!("bad payload")), "{sid} {bad}: {v}");
        }
    }
    // Nothing above resized this project's terminal, not even B's call with its id.
    input("stty size\r");
    http_output_until(&srv, &id, "43 132");
}

#[test]
fn http_input_larger_than_the_pty_takes_at_once_arrives_whole() {
    let (tmp, srv) = start("http-bigin", None);
    let (_, v) = srv.call(TA, "terminal.spawn", json!({}));
    let id = v["sessionId"].as_str().expect("sessionId").to_string();
    let input = |data: &str| {
        let (status, v) = srv.call(TA, "terminal.input", json!({"sessionId": id, "data": data}));
        assert_eq!((status, v), (200, json!({"ok": true})), "input of {} bytes", data.len());
    };
    input("stty -echo; cat > big.txt; echo got-$((6*7))\r");
    http_output_until(&srv, &id, "$ ");
    // 2000 lines of 50 bytes in one request: a PTY takes a few KiB at a time
    let line = format!("{}\n", "x".repeat(49));
    input(&line.repeat(2000));
    // then Ctrl-D, once the shell has read most of it: until then the
    // terminal is busy (what it accepted is written in order meanwhile)
    poll("terminal.input accepted again", || {
        let (status, v) = srv.call(TA, "terminal.input", json!({"sessionId": id, "data": "\x04"}));
        match status {
            200 => Some(()),
            503 => {
                assert_eq!(v["error"], "terminal busy", "{v}");
                None
            }
            _ => panic!("terminal.input: {status} {v}"),
        }
    });
    http_output_until(&srv, &id, "got-42");
    let size = std::fs::metadata(tmp.join("a/big.txt")).expect("big.txt").len();
    assert_eq!(size, 100_000, "what cat received");
}

/// terminal.output until `cond` holds on the data seen so far; (all data, the last answer).
fn http_output_while(srv: &Server, id: &str, what: &str, cond: impl Fn(&str) -> bool) -> (String, Value) {
    let mut seen = String::new();
    poll(what, || {
        let (status, v) = srv.call(TA, "terminal.output", json!({"sessionId": id}));
        assert_eq!(status, 200, "{v}");
        seen.push_str(v["data"].as_str().expect("data"));
        cond(&seen).then(|| (seen.clone(), v))
    })
}

#[test]
fn http_terminal_end_of_life() {
    let (_tmp, srv) = start("http-eol", None);
    let spawn = || {
        let (status, v) = srv.call(TA, "terminal.spawn", json!({}));
        assert_eq!(status, 200, "{v}");
        v["sessionId"].as_str().expect("sessionId").to_string()
    };
    let call = |action: &str, id: &str, extra: Value| {
        let mut payload = extra;
        payload["sessionId"] = json!(id);
        srv.call(TA, action, payload)
    };
    let no = json!({"error": "no session"});

    // the shell exits: its output ends with the original's marker, alive turns false
    let id = spawn();
    let (status, v) = call("terminal.input", &id, json!({"data": "echo bye-$((6*7)); exit\r"}));
    assert_eq!((status, v), (200, json!({"ok": true})));
    let (seen, last) =
        http_output_while(&srv, &id, "the exit marker", |seen| seen.contains("[process exited]"));
    assert!(seen.contains("bye-42"), "{seen:?}");
    assert!(seen.ends_with("\r\n[process exited]"), "output does not end with the marker: {seen:?}");
    assert_eq!(last["alive"], false, "the answer with the marker: {last}");
    // input is refused, the rest of the output can still be read (none is left)
    let (status, v) = call("terminal.input", &id, json!({"data": "echo again\r"}));
    assert_eq!((status, &v), (404, &no), "input after the exit");
    let (status, v) = call("terminal.output", &id, json!({}));
    assert_eq!(
        (status, v),
        (200, json!({"ok": true, "data": "", "alive": false})),
        "output right after the exit"
    );
    // closed: gone at once
    let (status, v) = call("terminal.close", &id, json!({}));
    assert_eq!((status, v), (200, json!({"ok": true})));
    let (status, v) = call("terminal.output", &id, json!({}));
    assert_eq!((status, &v), (404, &no), "output after terminal.close");

    // terminal.close on a live shell: every later call is `no session` at once,
    // and the shell is hung up and reaped
    let id = spawn();
    let (_, v) = call("terminal.input", &id, json!({"data": "echo P$((1+1))=$$\r"}));
    assert_eq!(v["ok"], true, "{v}");
    let (seen, _) = http_output_while(&srv, &id, "the shell's pid", |seen| {
        seen.split("P2=").nth(1).is_some_and(|rest| rest.contains('\n'))
    });
    let pid: i32 =
        seen.split("P2=").nth(1).unwrap().lines().next().unwrap().trim().parse().expect("pid of the shell");
    assert!(alive(pid));
    let (status, v) = call("terminal.close", &id, json!({}));
    assert_eq!((status, v), (200, json!({"ok": true})));
    for (action, extra) in [("terminal.input", json!({"data": "echo x\r"})), ("terminal.output", json!({}))] {
        let (status, v) = call(action, &id, extra);
        assert_eq!((status, &v), (404, &no), "{action} right after terminal.close");
    }
    // resize and close of a closed terminal: {"ok":true}, as the original's
    let (status, v) = call("terminal.resize", &id, json!({"cols": 10, "rows": 10}));
    assert_eq!((status, v), (200, json!({"ok": true})), "terminal.resize after terminal.close");
    let (status, v) = call("terminal.close", &id, json!({}));
    assert_eq!((status, v), (200, json!({"ok": true})), "a second terminal.close");
    assert!(eventually(Duration::from_secs(5), || reaped(pid, srv.pid())), "shell {pid} left behind");
    ping_ok(&srv);
}

// ------------------------------------------------------------ 14. SIGTERM

#[test]
fn sigterm_closes_terminals_and_exits_zero() {
    let (_tmp, mut srv) = start("ws-term", None);
    let mut ws = ws_connect(&srv.addr, &target(TA, ""));
    let pid = ws.shell_pid("live");
    // a detached session terminal and an HTTP one end too
    let mut detached = ws_connect(&srv.addr, &target(TA, "&session=keep"));
    let pid_detached = detached.shell_pid("kept");
    detached.drop_tcp();
    let (_, v) = srv.call(TA, "terminal.spawn", json!({}));
    assert_eq!(v["ok"], true, "{v}");

    let client = thread::spawn(move || ws.wait_close(Duration::from_secs(15)));
    let status = srv.signal_and_wait(Signal::SIGTERM, Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "exit status; stderr:\n{}", srv.stderr());
    let code = client.join().unwrap();
    assert!(code.is_none() || code == Some(1000), "close code {code:?}");
    for p in [pid, pid_detached] {
        assert!(eventually(Duration::from_secs(3), || !alive(p)), "shell {p} outlived the connector");
    }
}

// ------------------------------------------------------------ limits: detach, idle, ping

#[test]
fn detached_sessions_and_idle_terminals_end_and_idle_sockets_are_pinged() {
    let (_tmp, srv) = start("ws-detach", Some(json!({"terminalDetachSeconds": 1})));
    let mut ws = ws_connect(&srv.addr, &target(TA, "&session=gone"));
    let pid = ws.shell_pid("d");
    ws.drop_tcp();
    assert!(
        eventually(Duration::from_secs(20), || reaped(pid, srv.pid())),
        "a session detached longer than terminalDetachSeconds keeps its shell {pid}"
    );
    let mut again = ws_connect(&srv.addr, &target(TA, "&session=gone"));
    assert_ne!(again.shell_pid("d2"), pid, "reattached to an ended terminal");
    again.close_clean();

    let (_tmp2, srv) = start("ws-idle", Some(json!({"terminalIdleSeconds": 2, "wsPingSeconds": 1})));
    let mut ws = ws_connect(&srv.addr, &target(TA, ""));
    let pid = ws.shell_pid("i");
    let started = Instant::now();
    let code = ws.wait_close(Duration::from_secs(30));
    assert_eq!(code, Some(1000), "idle terminal: close code");
    assert!(started.elapsed() >= Duration::from_millis(1500), "hung up after {:?}", started.elapsed());
    assert!(ws.pings >= 1, "no ping on an idle socket (wsPingSeconds 1)");
    assert!(eventually(Duration::from_secs(5), || reaped(pid, srv.pid())), "idle shell {pid} left behind");
}

#[test]
fn a_socket_that_only_watches_output_is_pinged_and_kept() {
    // The reader drops a peer silent for 2×ping+5 s; a client that only
    // watches output answers pings and nothing else, so pings must come
    // while output flows too.
    let (_tmp, srv) = start("ws-watch", Some(json!({"wsPingSeconds": 1})));
    let mut ws = ws_connect(&srv.addr, &target(TA, ""));
    ws.send_text("while :; do echo tick; sleep 0.2; done\r");
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(9) {
        assert!(ws.pump(Duration::from_millis(200)) || !ws.eof, "dropped while watching output");
        assert!(ws.close.is_none() && !ws.eof, "closed after {:?}", started.elapsed());
    }
    // (one a second: 8-9 measured; without them the socket would have been dropped)
    assert!(ws.pings >= 1, "no ping in 9 s of output (wsPingSeconds 1)");
    ws.send_binary(b"\x03echo still-$((20+22))\r");
    ws.expect("still-42");
}
