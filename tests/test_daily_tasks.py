"""The daily tasks of docs/operators.md ("Daily tasks"), run as printed against a real demo
gateway (`envoy/gateway.py run`, as `make run` starts it, with this test's own ports and build
directory): add a partner with its onboarding record, key and reviewed grant (OPS-7, OPS-8,
OPS-2), rotate its key with an overlap, retire an API with its review and the callers to notify
(OPS-9, LVL-6), and answer an alert by finding the requests (LOG-2). After each task the test
checks what the gateway did: status, audit record, operations log."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest

from conftest import ROOT, WASM, gw, read_audit
from helpers import demo_args, demo_assets, fresh_ports

DOC = ROOT / "docs/operators.md"


def tasks() -> dict[str, list[str]]:
    """The commands of each task block, continuation lines joined."""
    text = DOC.read_text()
    out = {}
    for name, body in re.findall(r"<!-- daily-task: ([a-z-]+) -->\n```sh\n(.*?)```", text, re.S):
        out[name] = [line.strip() for line in body.replace("\\\n", " ").splitlines() if line.strip()]
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("daily")
    build = tmp / "build"
    demo_assets(build)
    (tmp / "policies").symlink_to(ROOT / "policies")
    ports = fresh_ports()
    proc = subprocess.Popen(demo_args(build, ports), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and "is up" not in proc.stdout.readline():
            assert proc.poll() is None, proc.stderr.read()
        yield tmp, ports
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def view(demo) -> gw.Gateway:
    """The running demo as the test helpers read a gateway: its audit log and admin stats."""
    tmp, ports = demo
    return gw.Gateway(gw.Layout(build=tmp / "build", wasm=WASM, **ports), upstream=False)


def run_task(demo, name: str) -> list[subprocess.CompletedProcess]:
    tmp, ports = demo
    env = {**os.environ, "PATH": f"{ROOT / 'target/release'}:{os.environ['PATH']}"}
    done = []
    for cmd in tasks()[name]:
        cmd = (cmd.replace("127.0.0.1:9901", f"127.0.0.1:{ports['admin_port']}")
               .replace("127.0.0.1:10443", f"127.0.0.1:{ports['https_port']}"))
        out = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=tmp, env=env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, (cmd, out.stdout, out.stderr)
        done.append(out)
    return done


def last_ops(tmp) -> dict:
    return json.loads((tmp / "build/ecds/operations.log").read_text().splitlines()[-1])


def test_the_daily_tasks_are_all_tested():
    assert list(tasks()) == ["add-a-partner", "rotate-a-key", "retire-an-api", "answer-an-alert"]


def test_daily_tasks_as_printed(demo):  # OPS-7 OPS-8 OPS-9 LOG-2
    tmp, g = demo[0], view(demo)
    # Add a partner: onboarding record, key, reviewed grant, applied; its first call passes
    out = run_task(demo, "add-a-partner")
    policy = (tmp / "build/policy.yaml").read_text()
    assert "ONB-2026-0042" in policy and "requested_by: bob@acme.example" in policy
    rec = last_ops(tmp)
    assert rec["outcome"] == "applied" and rec["actor"] == "alice" and rec["source"] == "ONB-2026-0042"
    changed = {(c["section"], c.get("id")) for c in rec["changes"]}
    assert {("apps", "acme-quant"), ("grants", "acme-quant-research")} <= changed
    assert rec["keyring_added"] == 1
    answer = json.loads(out[-1].stdout)
    assert answer["headers"]["x-apisec-app"] == "acme-quant"
    first = read_audit(g, answer["headers"]["x-request-id"])["audit"]
    assert (first["decision"], first["status"], first["keyid"], first["grant"]) == (
        "allow", 200, "acme-quant-p256", "acme-quant-research")

    # Rotate: the successor works now, and so does the old key during the overlap
    out = run_task(demo, "rotate-a-key")
    answer = json.loads(out[-1].stdout)
    assert read_audit(g, answer["headers"]["x-request-id"])["audit"]["keyid"] == "acme-quant-p256-2027"
    old = subprocess.run(
        [str(ROOT / "target/release/apisec"), "sign", "--app", "acme-quant", "--keyid", "acme-quant-p256", "--key",
         "build/acme-quant.key.pem", "--url", f"https://127.0.0.1:{demo[1]['https_port']}/api/v1/info/research/r-1"],
        cwd=tmp, capture_output=True, text=True, check=True)
    answer = json.loads(subprocess.run(["bash", "-c", old.stdout], cwd=tmp, capture_output=True, text=True).stdout)
    assert "x-request-id" in answer["headers"], answer
    creds = next(c for c in last_ops(tmp)["changes"] if c.get("id") == "acme-quant")["fields"]["credentials"]
    assert creds == {"issued": ["acme-quant-p256-2027"], "revoked": [], "rotated": ["acme-quant-p256"]}

    # Retire: the callers to notify are named, the review goes to the operations log, and the
    # API is refused from then on
    out = run_task(demo, "retire-an-api")
    assert "notify\tacme-quant\tsecurity@acme.example" in out[0].stdout
    assert "notify\tdemo-partner\t" in out[0].stdout
    change = next(c for c in last_ops(tmp)["changes"] if c.get("id") == "info.research")
    assert change["fields"]["state"] == {"before": "online", "after": "retired"}
    assert change["fields"]["review"]["after"]["ticket"] == "CHG-2026-1207"
    refused = json.loads(out[-1].stdout)
    assert refused["error"] == "api_retired", refused
    assert read_audit(g, refused["request_id"])["audit"]["code"] == "api_retired"

    # Answer an alert: every call of the app, and its refusals since a time
    out = run_task(demo, "answer-an-alert")
    # the app's three calls, and its call to the retired API (recorded with the app it claims)
    assert len(out[0].stdout.splitlines()) == 4 and out[0].stdout.count(" acme-quant ") == 4, out[0].stdout
    assert f"{refused['request_id']} deny 410 api_retired acme-quant info.research" in out[0].stdout
    denied = [json.loads(line) for line in out[1].stdout.splitlines()]
    assert [d["request_id"] for d in denied] == [refused["request_id"]]


def test_a_revoked_key_is_refused_and_stays_in_the_keyring(demo):  # OPS-2
    """After the tasks: `credentials revoke` and `policy apply`; the old key is refused with its
    code and an audit record, nothing reaches the backend, and its public key stays in the
    keyring so that evidence it signed still verifies."""
    tmp, ports = demo
    g = view(demo)
    cli = str(ROOT / "target/release/apisec")
    base = f"127.0.0.1:{ports['admin_port']}"
    subprocess.run([cli, "credentials", "revoke", "build/policy.yaml", "--app", "acme-quant", "--credential",
                    "acme-quant-p256"], cwd=tmp, check=True, capture_output=True)
    out = subprocess.run([cli, "policy", "apply", "build/policy.yaml", "--ecds", "build/ecds/apisec.yaml", "--admin", base,
                          "--env-file", "build/demo.env", "--actor", "alice", "--source", "CHG-2026-1208"],
                         cwd=tmp, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    creds = next(c for c in last_ops(tmp)["changes"] if c.get("id") == "acme-quant")["fields"]["credentials"]
    assert creds["revoked"] == ["acme-quant-p256"]
    upstream = g.stat("cluster.backend.upstream_rq_total")
    signed = subprocess.run([cli, "sign", "--app", "acme-quant", "--keyid", "acme-quant-p256", "--key",
                             "build/acme-quant.key.pem", "--url",
                             f"https://127.0.0.1:{ports['https_port']}/api/v1/accounts/A-1/balance"],
                            cwd=tmp, capture_output=True, text=True, check=True).stdout
    refused = json.loads(subprocess.run(["bash", "-c", signed], cwd=tmp, capture_output=True, text=True).stdout)
    assert refused["error"] == "unknown_key", refused
    assert read_audit(g, refused["request_id"])["audit"]["code"] == "unknown_key"
    assert g.stat("cluster.backend.upstream_rq_total") == upstream
    ring = [json.loads(line) for line in (tmp / "build/ecds/public-keys.jsonl").read_text().splitlines()]
    assert any(k.get("keyid") == "acme-quant-p256" for k in ring), ring

