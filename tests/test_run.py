"""`make run` (envoy/gateway.py run) next to a running demo (issue 21 item 13): on 91ff9c0 a
second run printed "is up" and exited 0 although its Envoy died, and truncated the running
gateway's Envoy log (the audit checkpoints). Now it checks the ports and its build directory
first, names what holds them, leaves the running gateway's files alone, watches its own Envoy
and exits non-zero when it fails."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import requests

from helpers import demo_args, demo_assets, fresh_ports


def test_a_second_run_beside_a_running_one_fails_loudly_and_touches_nothing(tmp_path):
    build = tmp_path / "build"
    demo_assets(build)
    ports = fresh_ports()
    first = subprocess.Popen(demo_args(build, ports), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and "is up" not in first.stdout.readline():
            assert first.poll() is None, first.stderr.read()
        quote = f"http://127.0.0.1:{ports['http_port']}/api/v1/market/quotes/600000"
        assert requests.get(quote, headers={"x-app-id": "demo-partner"}, timeout=5).status_code == 200
        log = build / "envoy.log"
        before = log.read_bytes()
        assert before
        if os.environ.get("APISEC_BUILD") == "native":  # `make run NATIVE=1` (make e2e-native)
            assert b"Dynamic module ABI version v0.2.0 matched." in before

        # the same ports: refused before anything is written, naming the holder
        second = subprocess.run(demo_args(build, ports), capture_output=True, text=True, timeout=60)
        assert second.returncode == 1 and "is up" not in second.stdout, second
        assert f"port {ports['http_port']} is in use by pid" in second.stderr and "envoy" in second.stderr
        assert log.read_bytes().startswith(before), "the running gateway's log was truncated"
        # other ports, the same build directory: refused (its logs belong to the running demo)
        second = subprocess.run(demo_args(build, fresh_ports()), capture_output=True, text=True, timeout=60)
        assert second.returncode == 1 and "in use by a running gateway" in second.stderr, second
        assert log.read_bytes().startswith(before)
        assert requests.get(quote, headers={"x-app-id": "demo-partner"}, timeout=5).status_code == 200

        # the run watches its own Envoy: when it dies, the run ends non-zero
        envoy_pid = next(int(p.name) for p in Path("/proc").iterdir()
                         if p.name.isdigit() and _cmdline(p).split(" ")[0].endswith("/envoy")
                         and f"--base-id {ports['admin_port']}" in _cmdline(p))
        os.kill(envoy_pid, signal.SIGKILL)
        assert first.wait(timeout=30) == 1
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGTERM)
            first.wait(timeout=30)


def _cmdline(p) -> str:
    try:
        return (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
