#!/usr/bin/env python3
"""Helpers for bench/delivery.sh (Python 3.11 standard library only).

Every subcommand prints `key=value` lines on stdout; diagnostics go to
stderr. All traffic goes to 127.0.0.1 only and every loop is bounded in count
and in time. The connector's token is read from the environment variable
AION_TOKEN (never from argv).

Subcommands:
  runs ADDR N PREFIX PROMPT CALLBACK
        N invokes (sessions PREFIX0000...) of agent "pi" with PROMPT and the
        callback base CALLBACK, one at a time, each retried while the project
        is at its cap (429), for at most 300 s in all
  deliver PORT PREFIX N TIMEOUT
        a callback server on 127.0.0.1:PORT until N sessions PREFIX* are
        closed (complete or error) or TIMEOUT s: posts, repeats, first/last post
  status FILE COND TIMEOUT [REMOVE]
        removes the file REMOVE if given (the clock starts then), then reads
        the outbox status file FILE (JSON) every 5 ms until the Python
        expression COND over `s` holds, for at most TIMEOUT s
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchcli  # noqa: E402
from pushbench import out  # noqa: E402
from runsbench import FINAL_PATHS, Callback, invoke, realtime_ns  # noqa: E402


def cmd_runs(addr: str, n: str, prefix: str, prompt: str, callback: str) -> None:
    count, started, refused = int(n), time.monotonic(), 0
    deadline = started + 300
    for i in range(count):
        session = f"{prefix}{i:04d}"
        while True:
            status, body, _, _ = invoke(addr, session, prompt, callback)
            if status == 200:
                break
            if status != 429 or time.monotonic() > deadline:
                out("invoked", i)
                out("error", f"{status} {body[:200]!r}")
                return
            refused += 1
            time.sleep(0.01)
    out("invoked", count)
    out("busy_answers", refused)
    out("ms", round((time.monotonic() - started) * 1000))


def cmd_deliver(port: str, prefix: str, n: str, timeout: str) -> None:
    want, limit = int(n), float(timeout)
    t0, t0_ns = time.monotonic(), realtime_ns()
    cb = Callback(int(port))
    closed: set[str] = set()
    try:
        while time.monotonic() - t0 < limit:
            with cb.recorder.lock:
                posts = list(cb.recorder.posts)
            for p in posts:
                if p.path in FINAL_PATHS:
                    s = str(json.loads(p.body).get("sessionId", ""))
                    if s.startswith(prefix):
                        closed.add(s)
            if len(closed) >= want:
                break
            time.sleep(0.01)
        t1 = time.monotonic()
    finally:
        cb.close()
    with cb.recorder.lock:
        posts = list(cb.recorder.posts)
    seen: dict[tuple[str, int], int] = {}
    finals: dict[str, int] = {}
    for p in posts:
        body = json.loads(p.body)
        key = (str(body.get("sessionId", "")), int(body.get("seq", -1)))
        seen[key] = seen.get(key, 0) + 1
        if p.path in FINAL_PATHS:
            finals[key[0]] = finals.get(key[0], 0) + 1
    out("closed", len(closed))
    out("posts", len(posts))
    out("repeated", sum(c - 1 for c in seen.values() if c > 1))
    out("closed_twice", sum(1 for c in finals.values() if c > 1))
    out("all_ms", round((t1 - t0) * 1000) if len(closed) >= want else "-")
    out("first_post_ms", round((min(p.recv_ns for p in posts) - t0_ns) / 1e6) if posts else "-")


def cmd_status(path: str, cond: str, timeout: str, remove: str = "") -> None:
    code = compile(cond, "<cond>", "eval")
    if remove:
        os.remove(remove)
    t0, limit, last = time.monotonic(), float(timeout), None
    while time.monotonic() - t0 < limit:
        try:
            with open(path, encoding="utf-8") as f:
                s = json.loads(f.read().strip())
        except (OSError, ValueError):
            s = None
        if s is not None:
            last = s
            if eval(code, {}, {"s": s}):  # noqa: S307 (the bench's own expression)
                out("ms", round((time.monotonic() - t0) * 1000))
                for k in ("memoryRecords", "spooledRecords", "streams", "delivered"):
                    out(k, s.get(k, "-"))
                return
        time.sleep(0.005)
    out("ms", "-")
    out("last", json.dumps(last, separators=(",", ":")))


def main(argv: list[str]) -> None:
    cmds = {"runs": cmd_runs, "deliver": cmd_deliver, "status": cmd_status}
    benchcli.dispatch("deliverybench", __doc__, cmds, argv)


if __name__ == "__main__":
    main(sys.argv)
