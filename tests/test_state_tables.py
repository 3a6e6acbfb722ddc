"""The state behaviour tables (filter/core/src/state/tables/*.json) against the cluster backend:
the real script on a real Redis behind a real webdis, each batch encoded and each answer decoded
by the filter's own code (filter/core/examples/state_tables.rs). `cargo test` runs the same
tables against the local backend; a change that makes the two disagree fails one of them
(issue 22). Steps run at their time in real time, so this takes a few seconds per table."""

from __future__ import annotations

import json
import subprocess

import pytest
import requests

import gateway as gw
import state_store
from conftest import ROOT

pytestmark = pytest.mark.cluster

RUNNER = ROOT / "target/release/examples/state_tables"
TABLES = sorted(p.stem for p in (ROOT / "filter/core/src/state/tables").glob("*.json"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = state_store.StateStore(tmp_path_factory.mktemp("tables-store"), gw.free_port(), gw.free_port()).start()
    yield s
    s.stop()


def post(url: str, body: str) -> tuple[str, str]:
    """The callout as Envoy makes it: POST / with the command as a text body."""
    r = requests.post(url + "/", data=body.encode(), headers={"content-type": "text/plain"}, timeout=10)
    return str(r.status_code), r.text


def run_tables(store, name: str) -> dict:
    """Carries each batch the runner writes to webdis, and its answer back."""
    p = subprocess.Popen([str(RUNNER), name], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    batches = 0
    try:
        for line in p.stdout:
            msg = json.loads(line)
            if msg.get("done"):
                p.wait(timeout=30)
                return {**msg, "batches": batches, "exit": p.returncode}
            status, body = post(store.url(), msg["body"])
            batches += 1
            p.stdin.write(json.dumps({"status": status, "body": body}) + "\n")
            p.stdin.flush()
    finally:
        if p.poll() is None:
            p.kill()
    raise AssertionError(f"the runner ended without a verdict (exit {p.wait()})")


@pytest.mark.parametrize("name", TABLES)
def test_cluster_backend_answers_the_table(store, name):
    assert RUNNER.exists(), "make e2e builds it"
    table = json.loads((ROOT / "filter/core/src/state/tables" / f"{name}.json").read_text())
    verdict = run_tables(store, name)
    assert verdict["failures"] == [], "\n".join(verdict["failures"])
    assert verdict["exit"] == 0
    # every step reached the store (the first also loaded the script: one batch more)
    assert len(table["steps"]) <= verdict["batches"] <= len(table["steps"]) + 1
