"""The operator CLI: policy check messages name the field (a bad policy never reaches Envoy),
key generation (OPS-2), listing and revoking a caller's grants (OPS-3, PERM-6)."""
from __future__ import annotations

import base64
import json
import subprocess

from conftest import CLI, ROOT


def run(*args, check=False):
    return subprocess.run([str(CLI), *args], capture_output=True, text=True, check=check)


def test_example_policies_pass_check():  # LVL-5
    for name in ("securities", "futures", "funds"):
        out = run("policy", "check", str(ROOT / f"policies/{name}.yaml"))
        assert out.returncode == 0 and "valid" in out.stdout, out.stderr


def test_s3_grant_without_approval_is_refused_naming_the_grant(tmp_path):  # PERM-3
    doc = json.loads(run("policy", "json", str(ROOT / "policies/securities.yaml"), check=True).stdout)
    for g in doc["grants"]:
        if g["id"] == "demo-partner-trading":
            del g["approval"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps(doc))
    out = run("policy", "check", str(bad))
    assert out.returncode == 2
    assert "grant 'demo-partner-trading' covers S3 APIs and needs an approval record" in out.stderr


def test_unknown_field_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "policies/securities.yaml").read_text().replace("clock_skew_seconds", "clock_skew_secs"))
    out = run("policy", "check", str(bad))
    assert out.returncode == 2 and "unknown field `clock_skew_secs`" in out.stderr


def test_keygen(tmp_path):  # OPS-2
    secret = run("keygen", "hmac", check=True).stdout.strip()
    assert len(base64.b64decode(secret)) == 32
    run("keygen", "p256", "--out", str(tmp_path / "k"), check=True)
    assert (tmp_path / "k.key.pem").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "k.pub.pem").read_text().startswith("-----BEGIN PUBLIC KEY-----")


def test_list_and_revoke_grants(tmp_path):  # OPS-3, PERM-6
    policy = str(ROOT / "policies/securities.yaml")
    listed = run("grants", "list", policy, "--app", "demo-partner", check=True).stdout.splitlines()
    assert [line.split("\t")[0] for line in listed] == ["demo-partner-info", "demo-partner-accounts", "demo-partner-trading",
                                                 "demo-partner-sessions"]
    out = run("grants", "revoke", policy, "--app", "demo-partner", "--grant", "demo-partner-info", check=True)
    revoked = tmp_path / "revoked.yaml"
    revoked.write_text(out.stdout)
    left = run("grants", "list", str(revoked), "--app", "demo-partner", check=True).stdout
    assert "demo-partner-info" not in left and "demo-partner-trading" in left
    assert run("grants", "revoke", policy, "--app", "nobody").returncode == 2
