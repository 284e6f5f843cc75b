#!/usr/bin/env python3
"""bench/mcpbench.py: helper of bench/mcp.sh (standard library only).

Answers in key=value lines on stdout.

  starts BIN SOCKET PROJECT KEY RUNS
      RUNS times: exec `BIN mcp` (the env of an .acpxrc.json entry), send
      `initialize`, time exec -> the answer line; then close stdin and wait.
      Also the peak RSS of one mcp process (VmHWM) after initialize.
  calls BIN SOCKET PROJECT KEY COUNT
      One `BIN mcp`; COUNT `tools/call check_background {pid: 1}` (an
      unknown pid: one round trip through the connector's socket), timed
      request -> answer line.
  key TOKEN
      The project's MCP key: sha256= + hex HMAC-SHA256(TOKEN, "aion-mcp").
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
import time


def mcp_env(socket: str, project: str, key: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AION_")}
    env.update({"AION_CONNECTOR_SOCKET": socket, "AION_PROJECT": project, "AION_MCP_KEY": key,
                "AION_SESSION_ID": "bench"})
    return env


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def stats(prefix: str, values: list[float]) -> None:
    if not values:
        for k in ("p50_ms", "p99_ms", "min_ms", "max_ms"):
            print(f"{prefix}_{k}=-")
        return
    print(f"{prefix}_p50_ms={pct(values, 50):.2f}")
    print(f"{prefix}_p99_ms={pct(values, 99):.2f}")
    print(f"{prefix}_min_ms={min(values):.2f}")
    print(f"{prefix}_max_ms={max(values):.2f}")


def hwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


INIT = (json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                    "params": {"protocolVersion": "2024-11-05", "capabilities": {}}}) + "\n").encode()


def cmd_starts(binary: str, socket: str, project: str, key: str, runs: str) -> None:
    env = mcp_env(socket, project, key)
    times: list[float] = []
    failures = 0
    hwm = 0
    budget = time.monotonic() + 120
    for k in range(int(runs)):
        if time.monotonic() > budget:
            print(f"mcpbench: starts stopped after {k} runs (120 s budget)", file=sys.stderr)
            break
        t0 = time.perf_counter()
        p = subprocess.Popen([binary, "mcp"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, env=env)
        assert p.stdin is not None and p.stdout is not None
        try:
            p.stdin.write(INIT)
            p.stdin.flush()
            line = p.stdout.readline()
            t1 = time.perf_counter()
            answer = json.loads(line)
            if answer.get("result", {}).get("protocolVersion") != "2024-11-05":
                raise ValueError(f"unexpected answer {line[:200]!r}")
            times.append((t1 - t0) * 1e3)
            if k == 0:
                hwm = hwm_kb(p.pid)
        except (OSError, ValueError) as e:
            failures += 1
            print(f"mcpbench: start {k}: {e}", file=sys.stderr)
        finally:
            p.stdin.close()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                failures += 1
    print(f"starts_runs={len(times)}")
    print(f"starts_failures={failures}")
    print(f"starts_hwm_kb={hwm}")
    stats("starts", times)


def cmd_calls(binary: str, socket: str, project: str, key: str, count: str) -> None:
    env = mcp_env(socket, project, key)
    p = subprocess.Popen([binary, "mcp"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, env=env)
    assert p.stdin is not None and p.stdout is not None
    times: list[float] = []
    bad = 0
    try:
        p.stdin.write(INIT)
        p.stdin.flush()
        p.stdout.readline()
        for i in range(int(count)):
            req = {"jsonrpc": "2.0", "id": i + 2, "method": "tools/call",
                   "params": {"name": "check_background", "arguments": {"pid": 1}}}
            t0 = time.perf_counter()
            p.stdin.write((json.dumps(req) + "\n").encode())
            p.stdin.flush()
            line = p.stdout.readline()
            t1 = time.perf_counter()
            text = json.loads(line)["result"]["content"][0]["text"]
            if text != "No background process with PID 1":
                bad += 1
                if bad == 1:
                    print(f"mcpbench: call answered {text[:200]!r}", file=sys.stderr)
            times.append((t1 - t0) * 1e3)
    finally:
        p.stdin.close()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    print(f"calls_count={len(times)}")
    print(f"calls_unexpected={bad}")
    stats("calls", times)


def cmd_key(token: str) -> None:
    print("sha256=" + hmac.new(token.encode(), b"aion-mcp", hashlib.sha256).hexdigest())


def main(argv: list[str]) -> None:
    if len(argv) >= 1 and argv[0] == "starts" and len(argv) == 6:
        cmd_starts(*argv[1:])
    elif len(argv) >= 1 and argv[0] == "calls" and len(argv) == 6:
        cmd_calls(*argv[1:])
    elif len(argv) == 2 and argv[0] == "key":
        cmd_key(argv[1])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
