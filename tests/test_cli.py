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


def test_a_change_of_state_or_level_needs_a_new_review(tmp_path):  # OPS-1, LVL-4, LVL-6
    """Issue 26: going online, going offline and a level change leave a review record (who,
    ticket, date): `policy apply` refuses such a change without a new one and records the
    refusal, `policy check --against` says so beforehand, the operations log keeps the review
    beside the change, and `apisec compliance` lists each API's review."""
    ecds = tmp_path / "ecds" / "apisec.yaml"
    ecds.parent.mkdir()
    ecds.write_text((ROOT / "envoy/apisec-ecds.yaml").read_text())
    env = tmp_path / "demo.env"
    env.write_text("APISEC_DEMO_PARTNER_SECRET=" + base64.b64encode(b"s" * 32).decode()
                   + "\nAPISEC_AUDIT_KEY=" + base64.b64encode(b"k" * 32).decode() + "\n")
    ops = ecds.parent / "operations.log"

    def apply(doc: dict):
        f = tmp_path / "policy.json"
        f.write_text(json.dumps(doc))
        return run("policy", "apply", str(f), "--ecds", str(ecds), "--actor", "alice", "--env-file", str(env))

    doc = json.loads(run("policy", "json", str(ROOT / "policies/securities.yaml"), check=True).stdout)
    assert apply(doc).returncode == 0  # every online API of the demo went online under a review
    quote = next(a for a in doc["apis"] if a["id"] == "market.quote")
    quote["state"] = "offline"
    out = apply(doc)
    assert out.returncode != 0 and "market.quote" in out.stderr and "online -> offline" in out.stderr
    last = json.loads(ops.read_text().splitlines()[-1])
    assert last["outcome"] == "rejected" and "review" in last["reason"]
    # checked beforehand against the policy in force
    (tmp_path / "next.json").write_text(json.dumps(doc))
    check = run("policy", "check", str(tmp_path / "next.json"), "--against", str(ecds.parent / "applied-policy.json"))
    assert check.returncode != 0 and "new review record" in check.stderr
    quote["review"] = {"by": "alice", "ticket": "CHG-2026-1206", "date": "2026-12-06"}
    out = apply(doc)
    assert out.returncode == 0, out.stderr
    last = json.loads(ops.read_text().splitlines()[-1])
    change = next(c for c in last["changes"] if c.get("id") == "market.quote")
    assert change["fields"]["state"] == {"before": "online", "after": "offline"}
    assert change["fields"]["review"]["after"]["ticket"] == "CHG-2026-1206" and last["actor"] == "alice"
    # a new API added online needs its own review too
    doc["apis"].append({**quote, "id": "market.depth", "path": "/api/v1/market/depth/{symbol}", "state": "online",
                        "review": quote["review"]})
    assert apply(doc).returncode == 0, "a review whose ticket no API in force carries for it"
    del doc["apis"][-1]["review"]
    doc["apis"][-1]["id"] = "market.depth2"
    doc["apis"][-1]["path"] = "/api/v1/market/depth2/{symbol}"
    out = apply(doc)
    assert out.returncode != 0 and "added as online" in out.stderr
    # the compliance report lists each API's review
    rep = json.loads(run("compliance", str(ecds.parent / "applied-policy.json"), "--format", "json").stdout)
    cells = {a["id"]: {c["control"]: c for c in a["checks"]} for a in rep["apis"]}
    assert cells["market.quote"]["review"]["status"] == "met"
    assert "CHG-2026-1206" in cells["market.quote"]["review"]["note"]
    assert cells["market.quote"]["review"]["ids"] == "OPS-1 LVL-4"


def test_the_cli_behaves_like_one(tmp_path):
    """Issue 26: clap: --version, --help on every subcommand, flags in any order, a clear error
    with usage and exit 2 for an unknown option, shell completion."""
    out = run("--version", check=True)
    assert out.stdout.strip() == "apisec 0.1.0"
    for cmd in (["policy", "apply"], ["audit", "verify"], ["audit", "search"], ["sign"], ["sessions", "end"],
                ["credentials", "rotate"], ["apps", "add"], ["grants", "add"], ["inventory", "set-state"]):
        out = run(*cmd, "--help")
        assert out.returncode == 0 and "Usage: apisec " + " ".join(cmd) in out.stdout, (cmd, out.stderr)
    policy = str(ROOT / "policies/securities.yaml")
    first = run("grants", "list", "--app", "demo-partner", policy, check=True).stdout
    assert first == run("grants", "list", policy, "--app", "demo-partner", check=True).stdout and first
    out = run("grants", "list", policy, "--ap", "demo-partner")
    assert out.returncode == 2 and "unexpected argument '--ap'" in out.stderr and "Usage:" in out.stderr
    out = run("audit", "verify", "x.log", "--format", "yaml", "--no-checkpoints", "--key-env", "K")
    assert out.returncode == 2 and "invalid value 'yaml'" in out.stderr
    script = run("completions", "bash", check=True).stdout
    assert "complete -F" in script and "_apisec" in script and "compliance" in script


def test_env_files_are_read_as_dotenv(tmp_path):
    """--env-file is parsed by a maintained .env parser: quotes, `export`, comments."""
    secret = base64.b64encode(b"q" * 32).decode()
    env = tmp_path / "gateway.env"
    audit = "APISEC_AUDIT_KEY=" + base64.b64encode(b"k" * 32).decode() + "\n"
    env.write_text(f'# the demo partner\nexport APISEC_DEMO_PARTNER_SECRET="{secret}"  # quoted\n\n{audit}')
    signed = json.loads(run("sign", "--app", "demo-partner", "--keyid", "demo-partner-hmac", "--secret", secret,
                            "--url", "https://127.0.0.1:10443/api/v1/info/research/r-2026-001", "--format", "json",
                            check=True).stdout)
    req = tmp_path / "req.json"
    req.write_text(json.dumps(signed))
    out = run("verify", str(ROOT / "policies/securities.yaml"), str(req), "--env-file", str(env))
    assert out.returncode == 0 and "accepted" in out.stdout.lower(), out.stdout + out.stderr
    env.write_text(f'APISEC_DEMO_PARTNER_SECRET="{base64.b64encode(b"w" * 32).decode()}"\n{audit}')
    assert run("verify", str(ROOT / "policies/securities.yaml"), str(req), "--env-file", str(env)).returncode == 1


def test_policy_schema_is_generated_from_the_types_and_checks_policies(tmp_path):
    """`apisec policy schema` prints the JSON Schema of the policy file from the types the filter
    reads; the checked-in copy equals it, the example policies pass it, and a misspelt field or
    a wrong type fails it (check-jsonschema, as an editor or CI would)."""
    schema = run("policy", "schema", check=True).stdout
    checked_in = ROOT / "policies/policy.schema.json"
    assert json.loads(schema) == json.loads(checked_in.read_text()), "run: apisec policy schema > policies/policy.schema.json"
    check = [str(ROOT / ".venv/bin/check-jsonschema"), "--schemafile", str(checked_in)]
    for name in ("securities", "futures", "funds"):
        out = subprocess.run([*check, str(ROOT / f"policies/{name}.yaml")], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "policies/securities.yaml").read_text().replace("clock_skew_seconds", "clock_skew_secs"))
    out = subprocess.run([*check, str(bad)], capture_output=True, text=True)
    assert out.returncode == 1 and "clock_skew_secs" in out.stdout, out.stdout
    bad.write_text((ROOT / "policies/securities.yaml").read_text().replace("clock_skew_seconds: 300",
                                                                           "clock_skew_seconds: soon"))
    out = subprocess.run([*check, str(bad)], capture_output=True, text=True)
    assert out.returncode == 1 and "soon" in out.stdout, out.stdout


def test_onboarding_record_bounds_the_grants_and_access_is_reviewed_at_every_level(tmp_path):  # OPS-7 OPS-8
    """`apps add` records how a caller was admitted (who, ticket, date, scenario, contact, the
    APIs it asked for); a grant beyond those APIs is refused, naming the API and OPS-7, and the
    file is left as it was; `grants add` records who applied and who approved, at S1 as at S3."""
    policy = tmp_path / "policy.yaml"
    policy.write_text((ROOT / "policies/securities.yaml").read_text())
    out = run("apps", "add", str(policy), "--app", "acme", "--by", "alice", "--ticket", "ONB-1", "--scenario",
              "research", "--apis", "info.*", "--date", "2026-12-06")
    assert out.returncode == 0, out.stderr
    assert "comment line(s) are not kept" in out.stderr
    before = policy.read_text()
    out = run("grants", "add", str(policy), "--app", "acme", "--id", "acme-trading", "--apis", "trade.order.place",
              "--requested-by", "bob", "--approved-by", "alice", "--ticket", "ACC-1", "--assessment", "RA-1")
    assert out.returncode == 2
    assert "covers 'trade.order.place', which app 'acme' was not admitted for" in out.stderr and "OPS-7" in out.stderr
    assert policy.read_text() == before
    out = run("grants", "add", str(policy), "--app", "acme", "--id", "acme-research", "--apis", "info.research",
              "--requested-by", "bob", "--approved-by", "alice", "--ticket", "ACC-2", "--date", "2026-12-06")
    assert out.returncode == 0, out.stderr
    doc = json.loads(run("policy", "json", str(policy), check=True).stdout)
    grant = next(g for g in doc["grants"] if g["id"] == "acme-research")
    assert grant["approval"] == {"approver": "alice", "ticket": "ACC-2", "date": "2026-12-06", "assessment": "",
                                 "requested_by": "bob"}
    app = next(a for a in doc["apps"] if a["id"] == "acme")
    assert app["admission"] == {"by": "alice", "ticket": "ONB-1", "date": "2026-12-06", "scenario": "research",
                                "apis": ["info.*"]}
    # an incomplete onboarding record is refused by policy check, naming the field
    app["admission"]["by"] = " "
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    out = run("policy", "check", str(bad))
    assert out.returncode == 2 and "apps[" in out.stderr and "admission.by" in out.stderr
    # editing commands refuse what does not exist, and change nothing
    kept = policy.read_text()
    for args in (["credentials", "rotate", str(policy), "--app", "acme", "--credential", "nope", "--id", "x",
                  "--alg", "ecdsa-p256-sha256", "--key-out", str(tmp_path / "k")],
                 ["credentials", "revoke", str(policy), "--app", "nobody", "--credential", "x"],
                 ["apps", "add", str(policy), "--app", "acme", "--by", "a", "--ticket", "t", "--scenario", "s",
                  "--apis", "info.*"]):
        out = run(*args)
        assert out.returncode == 2 and out.stderr, args
        assert policy.read_text() == kept


def test_credentials_issue_hands_an_hmac_secret_over_once_and_keys_go_in_by_their_public_half(tmp_path):  # OPS-2
    policy = tmp_path / "policy.yaml"
    policy.write_text((ROOT / "policies/securities.yaml").read_text())
    env = tmp_path / "secrets.env"
    out = run("credentials", "issue", str(policy), "--app", "demo-partner", "--id", "demo-partner-hmac-2027",
              "--alg", "hmac-sha256", "--secret-env", "APISEC_PARTNER_SECRET_2027", "--secret-file", str(env),
              "--not-after", "2027-12-31T23:59:59+08:00")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "" and env.stat().st_mode & 0o777 == 0o600
    name, _, value = env.read_text().strip().partition("=")
    assert name == "APISEC_PARTNER_SECRET_2027" and len(base64.b64decode(value)) == 32
    doc = json.loads(run("policy", "json", str(policy), check=True).stdout)
    cred = next(c for a in doc["apps"] for c in a["credentials"] if c["id"] == "demo-partner-hmac-2027")
    assert cred == {"id": "demo-partner-hmac-2027", "alg": "hmac-sha256", "secret_env": "APISEC_PARTNER_SECRET_2027",
                    "not_after": "2027-12-31T23:59:59+08:00"}
    assert value not in policy.read_text(), "the secret never goes into the policy"
    # printed once when no file is given
    out = run("credentials", "issue", str(policy), "--app", "demo-partner", "--id", "demo-partner-sm3",
              "--alg", "hmac-sm3", "--secret-env", "APISEC_PARTNER_SM3")
    assert out.returncode == 0 and out.stdout.startswith("APISEC_PARTNER_SM3=") and "shown once" in out.stderr
    # an SM2 key: the pair generated, the public half and the ID in the policy
    out = run("credentials", "issue", str(policy), "--app", "demo-partner", "--id", "demo-partner-sm2-2027",
              "--alg", "sm2-sm3", "--key-out", str(tmp_path / "sm2"), "--sm2-id", "ALICE123@YAHOO.COM")
    assert out.returncode == 0, out.stderr
    doc = json.loads(run("policy", "json", str(policy), check=True).stdout)
    cred = next(c for a in doc["apps"] for c in a["credentials"] if c["id"] == "demo-partner-sm2-2027")
    assert cred["public_key_pem"] == (tmp_path / "sm2.pub.pem").read_text() and cred["sm2_id"] == "ALICE123@YAHOO.COM"
    assert (tmp_path / "sm2.key.pem").stat().st_mode & 0o777 == 0o600
    # refused: an HMAC credential without its variable, a key credential without a key
    kept = policy.read_text()
    assert run("credentials", "issue", str(policy), "--app", "demo-partner", "--id", "x1", "--alg",
               "hmac-sha256").returncode == 2
    assert run("credentials", "issue", str(policy), "--app", "demo-partner", "--id", "x2", "--alg",
               "ecdsa-p256-sha256").returncode == 2
    assert policy.read_text() == kept


def test_rotation_never_extends_the_old_credential(tmp_path):  # OPS-2
    """`credentials rotate` ends the old credential after the overlap, or at its own end if that
    comes first: a rotation must not lengthen the life of the key it replaces."""
    policy = tmp_path / "policy.yaml"
    doc = json.loads(run("policy", "json", str(ROOT / "policies/securities.yaml"), check=True).stdout)
    app = next(a for a in doc["apps"] if a["id"] == "demo-partner")
    p256 = next(c for c in app["credentials"] if c["id"] == "demo-partner-p256")
    p256["not_after"] = "2026-12-08T00:00:00Z"
    policy.write_text(json.dumps(doc))
    out = run("credentials", "rotate", str(policy), "--app", "demo-partner", "--credential", "demo-partner-p256",
              "--id", "demo-partner-p256-next", "--key-out", str(tmp_path / "next"), "--start", "2026-12-06T00:00:00Z",
              "--overlap-days", "7")
    assert out.returncode == 0, out.stderr
    after = json.loads(run("policy", "json", str(policy), check=True).stdout)
    creds = {c["id"]: c for a in after["apps"] for c in a["credentials"]}
    assert creds["demo-partner-p256"]["not_after"] == "2026-12-08T00:00:00Z"
    assert creds["demo-partner-p256-next"]["not_before"] == "2026-12-06T00:00:00Z"
    assert creds["demo-partner-p256-next"]["alg"] == "ecdsa-p256-sha256"
    # without an end of its own, the old one ends with the overlap
    out = run("credentials", "rotate", str(policy), "--app", "demo-partner", "--credential", "demo-partner-hmac",
              "--id", "demo-partner-hmac-next", "--secret-env", "APISEC_NEXT", "--secret-file",
              str(tmp_path / "s.env"), "--start", "2026-12-06T00:00:00Z", "--overlap-days", "7")
    assert out.returncode == 0, out.stderr
    after = json.loads(run("policy", "json", str(policy), check=True).stdout)
    creds = {c["id"]: c for a in after["apps"] for c in a["credentials"]}
    assert creds["demo-partner-hmac"]["not_after"] == "2026-12-13T00:00:00Z"
