"""The walk-through `make run` prints is ready to paste (issue 12: "the ready-to-paste commands in
make run's output"): the session block and the operator's command are run here, as printed, by
bash from a directory laid out like the checkout, against a real Envoy running the shipped
securities policy with its sessions (SES-1 … SES-4, OPS-6, ID-4)."""
from __future__ import annotations

import json
import os
import subprocess

from conftest import ROOT, SECRET_VAR, gw, read_audit, start_gateway

MARK = "@@@ next command @@@"


def test_the_printed_session_walk_through_works(tmp_path, secret):
    policy = json.loads(gw.policy_to_json(ROOT / "policies/securities.yaml"))
    g = start_gateway(tmp_path / "gw", policy, secret=secret, concurrency=1)
    try:
        # The commands name build/certs, policies/ and target/ relative to the checkout.
        here = tmp_path / "checkout"
        (here / "build").mkdir(parents=True)
        (here / "build" / "certs").symlink_to(g.layout.certs)
        for name in ("policies", "target"):
            (here / name).symlink_to(ROOT / name)
        lines = [l.strip() for l in gw.session_commands(g.layout, SECRET_VAR) + [gw.operator_command(g.layout)]]
        commands = [l for l in lines if not l.startswith("#")]
        script = "set -e\n" + "\n".join(f"{c}\necho; echo '{MARK}'" for c in commands)
        out = subprocess.run(["bash", "-c", script], cwd=here, capture_output=True, text=True, timeout=120,
                             env={**os.environ, SECRET_VAR: secret})
        assert out.returncode == 0, out.stdout + out.stderr
        parts = [p.strip() for p in out.stdout.split(MARK)][: len(commands)]
        session, login, balance, order, logout, after, operator = parts
        assert session.startswith("session ") and len(session.split()[1]) == 32, session
        assert json.loads(login)["path"] == "/api/v1/users/login", login
        doc = json.loads(balance)
        assert doc["headers"]["x-apisec-user"] == "u-demo" and "id_number" not in balance, balance
        doc = json.loads(order)
        assert doc["path"] == "/api/v1/orders" and doc["headers"]["x-apisec-user"] == "u-demo", order
        assert json.loads(logout) == {"ended": True}
        refused = json.loads(after)
        assert refused["error"] == "session_invalid", after
        assert read_audit(g, refused["request_id"])["audit"]["code"] == "session_invalid"
        assert json.loads(operator) == {"ended": "every session of app demo-partner"}, operator
    finally:
        g.stop()
