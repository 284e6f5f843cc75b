#!/usr/bin/env python3
"""Smoke test of a built aion-connector binary, of any architecture.

    python3 .ci/smoke.py BIN [RUNNER ...]

RUNNER is what runs BIN, e.g. `qemu-aarch64` for an aarch64 binary on an
x86_64 machine (nothing for a native one). The test: `--version`; serve a
config on 127.0.0.1 port 0 and read the `listening on` line; a ping; a
terminal over the HTTP actions (terminal.spawn, terminal.input
"echo hi\\n", terminal.output until "hi" comes back as output); one `invoke`
streamed (`"stream":true`) with tests/fixtures/fake-acpx as `acpx` on PATH,
until its `complete` line; SIGTERM and exit status 0. Each step is timed;
every wait has a deadline. Standard library only.
"""

import http.client
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

# Deadlines are generous: under qemu a start takes a few hundred ms, on a
# loaded machine much more.
START = 60.0
STEP = 60.0
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fail(msg):
    print(f"smoke: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


class Connector:
    def __init__(self, argv, work):
        self.work = work
        self.out = open(os.path.join(work, "stdout"), "w+b")
        self.err = open(os.path.join(work, "stderr"), "w+b")
        self.proc = subprocess.Popen(argv, cwd=work, stdout=self.out, stderr=self.err, stdin=subprocess.DEVNULL)
        self.addr = None

    def stderr(self):
        self.err.seek(0)
        return self.err.read().decode(errors="replace")

    def wait_listening(self):
        deadline = time.monotonic() + START
        while time.monotonic() < deadline:
            self.out.seek(0)
            m = re.search(rb"listening on (\S+)", self.out.read())
            if m:
                self.addr = m.group(1).decode()
                return
            if self.proc.poll() is not None:
                fail(f"exited with {self.proc.returncode} before listening:\n{self.stderr()}")
            time.sleep(0.05)
        fail(f"no `listening on` line within {START} s:\n{self.stderr()}")

    def post(self, body, stream=False):
        host, port = self.addr.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=STEP)
        conn.request("POST", "/", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if stream:
            return conn, resp
        data = resp.read()
        conn.close()
        if resp.status != 200:
            fail(f"{body.get('action')}: HTTP {resp.status}: {data[:300]!r}")
        return json.loads(data)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=STEP)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            fail(f"still running {STEP} s after SIGTERM:\n{self.stderr()}")


def step(name, started):
    print(f"smoke: ok   {name} ({time.monotonic() - started:.2f} s)")
    return time.monotonic()


def main():
    if len(sys.argv) < 2:
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(2)
    binary = os.path.abspath(sys.argv[1])
    runner = sys.argv[2:]
    if runner and shutil.which(runner[0]) is None:
        fail(f"{runner[0]} is not on PATH")
    total = t = time.monotonic()

    out = subprocess.run(runner + [binary, "--version"], capture_output=True, timeout=STEP)
    if out.returncode != 0 or not out.stdout.startswith(b"aion-connector "):
        fail(f"--version: exit {out.returncode}, {out.stdout!r} {out.stderr!r}")
    print(f"smoke: {out.stdout.decode().strip()} ({' '.join(runner) or 'native'})")
    t = step("--version", t)

    work = tempfile.mkdtemp(prefix="aion-smoke-")
    conn = None
    try:
        bindir = os.path.join(work, "bin")
        os.mkdir(bindir)
        shutil.copy(os.path.join(REPO, "tests/fixtures/fake-acpx"), os.path.join(bindir, "acpx"))
        os.chmod(os.path.join(bindir, "acpx"), 0o755)
        token = secrets.token_hex(32)
        config = {
            "host": "127.0.0.1",
            "port": 0,
            "stateDir": "./state",
            "projects": {"smoke": {"token": token, "dir": "./work", "agents": {"pi": {"description": "Pi"}}}},
        }
        path = os.path.join(work, "aion.config.json")
        with open(path, "w") as f:
            json.dump(config, f)
        os.chmod(path, 0o600)
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
        os.environ["SHELL"] = "/bin/sh"
        conn = Connector(runner + [binary, path], work)
        conn.wait_listening()
        t = step(f"start, listening on {conn.addr}", t)

        pong = conn.post({"v": 1, "action": "ping", "token": token})
        if pong.get("v") != 1 or pong.get("ok") is not True:
            fail(f"ping: {pong}")
        t = step("ping", t)

        term = conn.post({"action": "terminal.spawn", "token": token, "payload": {"cols": 80, "rows": 24}})
        sid = term.get("sessionId") or fail(f"terminal.spawn: {term}")
        conn.post({"action": "terminal.input", "token": token, "payload": {"sessionId": sid, "data": "echo hi\n"}})
        seen, deadline = "", time.monotonic() + STEP
        # The typed line is echoed as "echo hi" (perhaps before the shell's
        # prompt): wait for a line that ends in "hi" without "echo".
        while not any(line.strip().endswith("hi") and "echo" not in line for line in seen.splitlines()):
            if time.monotonic() > deadline:
                fail(f"terminal: no line `hi` within {STEP} s: {seen!r}")
            got = conn.post({"action": "terminal.output", "token": token, "payload": {"sessionId": sid}})
            seen += got.get("data", "")
            if not got.get("data"):
                time.sleep(0.05)
        conn.post({"action": "terminal.close", "token": token, "payload": {"sessionId": sid}})
        t = step("terminal echo hi", t)

        invoke = {"action": "invoke", "token": token, "payload": {"agent": "pi", "prompt": "lines 3", "stream": True}}
        http_conn, resp = conn.post(invoke, stream=True)
        if resp.status != 200:
            fail(f"invoke: HTTP {resp.status}: {resp.read()[:300]!r}")
        kinds = []
        while True:
            line = resp.readline()
            if not line:
                fail(f"invoke: the stream ended without `complete`: {kinds}")
            event = json.loads(line)
            kinds.append(event.get("type"))
            if event.get("type") == "complete":
                break
            if event.get("type") == "error":
                fail(f"invoke: {event}")
        http_conn.close()
        t = step(f"invoke streamed ({', '.join(kinds)})", t)

        code = conn.stop()
        if code != 0:
            fail(f"exit status {code} after SIGTERM:\n{conn.stderr()}")
        step("SIGTERM, exit 0", t)
        print(f"smoke: all ok in {time.monotonic() - total:.2f} s")
    finally:
        if conn is not None and conn.proc.poll() is None:
            conn.proc.kill()
            conn.proc.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
