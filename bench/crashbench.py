#!/usr/bin/env python3
"""Helpers for bench/crash.sh (Python 3.11 standard library only).

Every subcommand prints `key=value` lines on stdout; diagnostics go to
stderr. All traffic goes to 127.0.0.1 only and every loop is bounded in count
and in time. The connector's token is read from the environment variable
AION_TOKEN (never from argv).

Subcommands:
  callback PORT FILE LIMIT
        a callback server on 127.0.0.1:PORT (0: any) for at most LIMIT s;
        prints port=, then appends one line per post to FILE as it arrives:
        `RECV_NS PATH SESSION SEQ`
  invoke ADDR SESSION CALLBACK
        one invoke of agent "pi" with a prompt that streams a line every
        100 ms for ten minutes, callback base CALLBACK
  terminal ADDR LIMIT
        opens a terminal, starts `nohup sleep 600 &` in its shell, prints bg=PID
        and holds the socket open for at most LIMIT s (or until killed)
  watch MARK OUT LIMIT
        started before the kill: polls /proc every 2 ms and prints the
        CLOCK_REALTIME ns at which the file OUT first holds "listening on"
        (listen_ns=) and at which no process has the environment line MARK
        any more (gone_ns=), for at most LIMIT s
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchcli  # noqa: E402
from pushbench import out  # noqa: E402
from runsbench import Callback, invoke  # noqa: E402
from termbench import open_terminal, token  # noqa: E402


def cmd_callback(port: str, path: str, limit: str) -> None:
    cb = Callback(int(port))
    out("port", cb.port)
    sys.stdout.flush()
    end, done = time.monotonic() + float(limit), 0
    try:
        with open(path, "a", encoding="utf-8") as f:
            while time.monotonic() < end:
                with cb.recorder.lock:
                    new = cb.recorder.posts[done:]
                for p in new:
                    try:
                        body = json.loads(p.body)
                    except ValueError:
                        body = {}
                    f.write(f"{p.recv_ns} {p.path} {body.get('sessionId', '-')} {body.get('seq', '-')}\n")
                done += len(new)
                f.flush()
                time.sleep(0.005)
    finally:
        cb.close()


def cmd_invoke(addr: str, session: str, callback: str) -> None:
    status, body, _, _ = invoke(addr, session, "lines=6000 interval_us=100000", callback)
    out("status", status)
    if status != 200:
        out("error", body[:200].decode(errors="replace"))


def cmd_terminal(addr: str, limit: str) -> None:
    ws = open_terminal(addr, token())
    # nohup: a job that outlives its shell's hangup, as a user's long job does
    ws.send(b"nohup sleep 600 >/dev/null 2>&1 & echo BG$((40+2))=$!\n")
    got = bytearray()
    deadline = time.monotonic() + 5.0
    while not (m := re.search(rb"BG42=(\d+)\r?\n", got)):
        if time.monotonic() > deadline:
            sys.exit(f"crashbench: no background pid from the shell: {bytes(got[-200:])!r}")
        ws.pump(got.extend, 0.2)
    out("bg", m.group(1).decode())
    sys.stdout.flush()
    end = time.monotonic() + float(limit)
    while time.monotonic() < end:  # the socket stays open (the connector may die under it)
        time.sleep(0.1)


def marked(mark: bytes) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if mark in f.read().split(b"\0"):
                    with open(f"/proc/{name}/stat", "rb") as st:
                        if st.read().rsplit(b") ", 1)[1][:1] != b"Z":
                            pids.append(int(name))
        except (OSError, IndexError):
            pass
    return pids


def cmd_watch(mark: str, path: str, limit: str) -> None:
    end, want = time.monotonic() + float(limit), mark.encode()
    listen = gone = 0
    while time.monotonic() < end and not (listen and gone):
        now = time.clock_gettime_ns(time.CLOCK_REALTIME)
        if not listen:
            try:
                with open(path, "rb") as f:
                    if b"listening on " in f.read():
                        listen = now
            except OSError:
                pass
        if not gone and not marked(want):
            gone = now
        time.sleep(0.002)
    out("listen_ns", listen or "-")
    out("gone_ns", gone or "-")


def main(argv: list[str]) -> None:
    cmds = {
        "callback": cmd_callback,
        "invoke": cmd_invoke,
        "terminal": cmd_terminal,
        "watch": cmd_watch,
    }
    benchcli.dispatch("crashbench", __doc__, cmds, argv)


if __name__ == "__main__":
    main(sys.argv)
