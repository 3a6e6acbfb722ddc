"""`apisec compliance` (the per-API report for auditors, with requirement IDs and the Annex A
classification, LVL-5) and `apisec inventory` (LVL-2: listing, and drafting from OpenAPI 3)."""
from __future__ import annotations

import csv
import io
import json
import subprocess

import yaml

from conftest import CLI, ROOT
from helpers import session_policy

GATEWAY = str(ROOT / "envoy/gateway.yaml")
UPSTREAM_TLS = str(ROOT / "envoy/gateway-upstream-tls.yaml")
ECDS = str(ROOT / "envoy/apisec-ecds.yaml")


def apisec(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=60)


def compliance(policy, *extra: str) -> tuple[int, dict]:
    out = apisec("compliance", str(policy), "--format", "json", *extra)
    assert out.returncode in (0, 1, 3), out.stderr
    return out.returncode, json.loads(out.stdout)


def test_unknown_is_never_compliant_and_the_report_says_what_it_is_about(tmp_path):  # LVL-5, MON-2
    """Issue 21 item 11: without --deployment, 91ff9c0 printed "compliant" and exited 0 although
    the TLS, audit and backend-TLS cells were `?`."""
    import hashlib

    policy = ROOT / "policies/securities.yaml"
    rc, rep = compliance(policy)
    assert rc == 3 and rep["verdict"] == "unverified" and rep["compliant"] is False
    unknown = sum(c["status"] == "unchecked" for a in rep["apis"] for c in a["checks"])
    assert rep["unverified"] == unknown > 0
    about = rep["about"]
    assert about["policy_sha256"] == hashlib.sha256(policy.read_bytes()).hexdigest()
    assert {"DATA-1", "DATA-2", "LOG-1", "SES-4", "LVL-5", "DATA-5"} <= set(about["scope"])
    assert about["tool_version"] and about["generated_at"].endswith("Z") and about["deployment_files"] == []
    text = apisec("compliance", str(policy))
    assert text.returncode == 3 and "NOT verified" in text.stdout and "\ncompliant" not in text.stdout
    # with the deployment, every cell is judged, and the files are named with their hashes
    rc, rep = compliance(policy, "--deployment", UPSTREAM_TLS, "--ecds", ECDS)
    assert rep["unverified"] == 0 and rep["verdict"] in ("compliant", "not_compliant")
    assert [f for f, _ in rep["about"]["deployment_files"]] == [UPSTREAM_TLS, ECDS]
    assert dict(rep["about"]["deployment_files"])[ECDS] == hashlib.sha256((ROOT / "envoy/apisec-ecds.yaml").read_bytes()).hexdigest()
    # for auditors: Markdown and CSV
    md = apisec("compliance", str(policy), "--deployment", UPSTREAM_TLS, "--ecds", ECDS, "--format", "markdown")
    assert md.returncode == rc and md.stdout.startswith("# apisec compliance report") and "| trade.order.place | S3 |" in md.stdout
    rows = list(csv.DictReader(io.StringIO(apisec("compliance", str(policy), "--format", "csv").stdout)))
    assert {"api", "level", "control", "ids", "status", "note"} == set(rows[0])
    assert any(r["api"] == "account.balance" and r["control"] == "backend_tls" and r["status"] == "?" for r in rows)


def cells(report: dict) -> dict:
    return {a["id"]: {c["control"]: c for c in a["checks"]} for a in report["apis"]}


def write_policy(tmp_path, doc: dict, name="p.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False))
    return path


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / "policies" / name).read_text())


def test_securities_example_with_each_shipped_deployment(tmp_path):
    rc, rep = compliance(ROOT / "policies/securities.yaml", "--deployment", GATEWAY, "--ecds", ECDS)
    assert rc == 1 and rep["compliant"] is False and rep["industry"] == "securities"
    c = cells(rep)
    assert c["market.quote"]["annex_a"]["status"] == "met" and "S0 行情类" in c["market.quote"]["annex_a"]["note"]
    assert c["market.quote"]["replay"]["status"] == "should_not_provided"
    assert c["trade.order.place"]["approval"]["status"] == "met" and "RISK-2026-0117" in c["trade.order.place"]["approval"]["note"]
    assert c["trade.order.place"]["non_repudiation"]["status"] == "met"
    assert c["info.research"]["backend_tls"]["status"] == "not_required"
    # envoy/gateway.yaml sends plain HTTP to the backend: DATA-2 is not met for S2 and S3.
    assert c["account.balance"]["backend_tls"]["status"] == "not_met"
    assert c["account.balance"]["backend_tls"]["ids"] == "DATA-2"
    # The example has sessions and a login API: user-bound APIs need a two-factor user (ID-4).
    assert c["account.balance"]["user_2fa"]["status"] == "met"
    # The session endpoints are the gateway's own, not business interfaces of table A.1.
    assert c["session.create"]["annex_a"]["status"] == "met"
    assert "gateway's own session endpoint" in c["session.create"]["annex_a"]["note"]
    assert "S2 账户类" in c["user.login"]["annex_a"]["note"]
    assert rep["deployment"]["tls_listener"] and rep["deployment"]["mtls_listener"]
    assert rep["deployment"]["audit_log"] and rep["deployment"]["fail_closed"]
    unmet = {(a["id"], c["control"]) for a in rep["apis"] for c in a["checks"] if c["status"] == "not_met"}
    assert unmet == {(a, "backend_tls") for a in ["account.balance", "account.positions", "trade.order.query",
                                                   "trade.order.place", "trade.order.cancel", "user.login"]}
    # With TLS to the backend nothing is left.
    rc, rep = compliance(ROOT / "policies/securities.yaml", "--deployment", UPSTREAM_TLS, "--ecds", ECDS)
    unmet = {(a["id"], c["control"]) for a in rep["apis"] for c in a["checks"] if c["status"] == "not_met"}
    assert unmet == set() and rep["compliant"] is True
    assert rc == 0
    # The same with the native build's ECDS resource (it has no failure policy to set).
    native = str(ROOT / "envoy/apisec-native-ecds.yaml")
    rc, rep = compliance(ROOT / "policies/securities.yaml", "--deployment", UPSTREAM_TLS, "--ecds", native)
    assert rc == 0 and rep["compliant"] is True and rep["deployment"]["fail_closed"]
    # ... but another dynamic module in its place is not apisec, so not counted as failing closed.
    other = yaml.safe_load((ROOT / "envoy/apisec-native-ecds.yaml").read_text())
    other["resources"][0]["typed_config"]["dynamic_module_config"]["name"] = "something_else"
    (tmp_path / "other.yaml").write_text(json.dumps(other))
    rc, rep = compliance(ROOT / "policies/securities.yaml", "--deployment", UPSTREAM_TLS,
                         "--ecds", str(tmp_path / "other.yaml"))
    assert rc == 1 and not rep["deployment"]["fail_closed"]
    # Without sessions, user-bound APIs at S2/S3 have no verified two-factor user (ID-4).
    doc = load("securities.yaml")
    doc.pop("sessions")
    doc["apis"] = [a for a in doc["apis"] if a["id"] not in ("session.create", "session.logout", "user.login")]
    doc["grants"] = [g for g in doc["grants"] if g["id"] != "demo-partner-sessions"]
    doc["rate_limits"] = [r for r in doc["rate_limits"] if r["id"] != "sessions-per-app"]
    rc, rep = compliance(write_policy(tmp_path, doc), "--deployment", UPSTREAM_TLS, "--ecds", ECDS)
    unmet = {(a["id"], c["control"]) for a in rep["apis"] for c in a["checks"] if c["status"] == "not_met"}
    assert unmet == {(a, "user_2fa") for a in ["account.balance", "account.positions", "trade.order.query",
                                                "trade.order.place", "trade.order.cancel"]}
    assert rc == 1


def test_table_output_names_the_requirement_ids():
    out = apisec("compliance", str(ROOT / "policies/securities.yaml"), "--deployment", GATEWAY, "--ecds", ECDS)
    assert out.returncode == 1
    assert "NO  account.balance backend_tls (DATA-2)" in out.stdout
    assert "NO  user.login backend_tls (DATA-2)" in out.stdout
    assert "NO  trade.order.place user_2fa" not in out.stdout
    assert "NOT compliant" in out.stdout
    assert out.stdout.splitlines()[1].split()[:3] == ["api", "lvl", "annex"]


def test_a_compliant_policy_exits_zero(tmp_path):
    doc = load("securities.yaml")
    doc.pop("sessions")
    doc["apis"] = [a for a in doc["apis"] if a["level"] in ("S0", "S1") and not a["id"].startswith("session.")]
    doc["api_groups"] = []
    doc["grants"] = [g for g in doc["grants"] if g["id"] == "demo-partner-info"]
    doc["lists"] = []
    doc["rate_limits"] = [r for r in doc["rate_limits"] if r["id"] not in ("orders-per-user", "sessions-per-app")]
    rc, rep = compliance(write_policy(tmp_path, doc), "--deployment", UPSTREAM_TLS, "--ecds", ECDS)
    assert rc == 0 and rep["compliant"] is True


def test_annex_a_flags_an_api_below_its_table_level(tmp_path):
    """The funds example before this issue: the holdings query at S2, where table A.1 lists
    客户持仓份额查询 under the funds industry's S3 interfaces."""
    doc = load("funds.yaml")
    holdings = next(a for a in doc["apis"] if a["id"] == "account.holdings")
    assert holdings["level"] == "S3"
    holdings["level"] = "S2"
    rc, rep = compliance(write_policy(tmp_path, doc))
    assert rc == 1
    check = cells(rep)["account.holdings"]["annex_a"]
    assert check["status"] == "not_met" and check["ids"] == "LVL-5"
    assert "客户持仓份额查询" in check["note"] and "S3" in check["note"]
    # An annex_a key the table does not have is an error too; a function that is no key is
    # reported as unclassified, not as met.
    holdings["level"] = "S3"
    holdings["annex_a"] = "holdings_typo"
    rc, rep = compliance(write_policy(tmp_path, doc))
    assert rc == 1 and cells(rep)["account.holdings"]["annex_a"]["status"] == "not_met"
    del holdings["annex_a"]
    holdings["function"] = "portfolio"
    rc, rep = compliance(write_policy(tmp_path, doc))
    assert cells(rep)["account.holdings"]["annex_a"]["status"] == "unclassified"


def test_report_mode_onboarding_and_fail_open_are_visible(tmp_path):
    doc = load("securities.yaml")
    next(a for a in doc["apis"] if a["id"] == "info.research")["mode"] = "report"
    doc["gateway"]["report_only_s3"] = True
    next(a for a in doc["apps"] if a["id"] == "demo-partner")["onboarding"] = True
    rc, rep = compliance(write_policy(tmp_path, doc))
    assert rc == 1
    assert cells(rep)["info.research"]["enforced"]["status"] == "not_met"
    findings = {f["control"]: f for f in rep["findings"]}
    assert findings["report_only_s3"]["status"] == "not_met"
    assert "demo-partner" in findings["onboarding"]["note"]
    # Without a deployment, what depends on it is unchecked, not met.
    assert cells(rep)["account.balance"]["backend_tls"]["status"] == "unchecked"
    # A deployment whose filter may fail open.
    bootstrap = yaml.safe_load((ROOT / "envoy/gateway.yaml").read_text())
    ecds = yaml.safe_load((ROOT / "envoy/apisec-ecds.yaml").read_text())
    ecds["resources"][0]["typed_config"]["config"]["failure_policy"] = "FAIL_OPEN"
    (tmp_path / "ecds.yaml").write_text(json.dumps(ecds))
    (tmp_path / "gw.yaml").write_text(json.dumps(bootstrap))
    rc, rep = compliance(ROOT / "policies/securities.yaml", "--deployment", str(tmp_path / "gw.yaml"),
                         "--ecds", str(tmp_path / "ecds.yaml"))
    assert {f["control"]: f["status"] for f in rep["findings"]}["fail_closed"] == "not_met"


def test_inventory_lists_every_api():  # LVL-2
    out = apisec("inventory", str(ROOT / "policies/futures.yaml"), "--format", "csv")
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    doc = load("futures.yaml")
    assert [r["id"] for r in rows] == [a["id"] for a in doc["apis"]]
    for r, a in zip(rows, doc["apis"]):
        assert (r["method"], r["path"], r["level"], r["access"], r["function"]) == (
            a["method"], a["path"], a["level"], a["access"], a["function"])
        assert r["user_auth"] == str(a["user_auth"]).lower() and r["state"] == "online"
    js = json.loads(apisec("inventory", str(ROOT / "policies/futures.yaml"), "--format", "json").stdout)
    assert js == rows
    table = apisec("inventory", str(ROOT / "policies/futures.yaml")).stdout.splitlines()
    assert table[0].split()[:4] == ["id", "method", "path", "level"] and len(table) == len(rows) + 1


OPENAPI = {
    "openapi": "3.0.3",
    "info": {"title": "broker", "version": "1"},
    "servers": [{"url": "https://api.broker.example/api/v1"}],
    "paths": {
        "/market/quotes/{code}": {"get": {"operationId": "getQuote", "tags": ["market_data"], "summary": "Quote"}},
        "/accounts/{id}/transfers": {"post": {"operationId": "createTransfer", "tags": ["account"],
                                              "summary": "Bank transfer"}},
    },
}


def test_inventory_import_drafts_entries_a_person_must_complete(tmp_path):
    (tmp_path / "openapi.yaml").write_text(yaml.safe_dump(OPENAPI))
    out = apisec("inventory", "import", str(tmp_path / "openapi.yaml"), "--policy",
                 str(ROOT / "policies/securities.yaml"))
    assert out.returncode == 0, out.stderr
    assert "2 operation(s); 1 new" in out.stdout
    assert "# in the policy as 'market.quote', in the document as 'getQuote'" in out.stdout
    assert "# in the policy, not in the document: trade.order.place (POST /api/v1/orders)" in out.stdout
    drafted = yaml.safe_load("apis:\n" + "\n".join(l for l in out.stdout.splitlines() if not l.startswith("#")))
    (entry,) = drafted["apis"]
    assert entry["id"] == "createTransfer" and entry["path"] == "/api/v1/accounts/{id}/transfers"
    assert entry["method"] == "POST" and entry["access"] == "write" and entry["level"] == "SET-ME"
    # Until a person sets the levels, the policy is refused.
    doc = load("securities.yaml")
    doc["apis"].append(entry)
    check = apisec("policy", "check", str(write_policy(tmp_path, doc)))
    assert check.returncode != 0 and "SET-ME" in check.stderr
    entry.update(level="S2", service_object="toC", user_auth=True, personal_info=True)
    check = apisec("policy", "check", str(write_policy(tmp_path, doc)))
    assert check.returncode == 0, check.stderr


def test_sessions_with_a_login_api_meet_the_two_factor_requirement(tmp_path):  # ID-4
    doc = session_policy(idle=60, lifetime=600)
    rc, rep = compliance(write_policy(tmp_path, doc), "--deployment", UPSTREAM_TLS, "--ecds", ECDS)
    c = cells(rep)
    assert c["user.profile"]["user_2fa"]["status"] == "met" and "user.login" in c["user.profile"]["user_2fa"]["note"]
    assert c["account.balance"]["user_2fa"]["status"] == "met"
    assert c["user.news"]["user_2fa"]["status"] == "not_required"  # S1
    del doc["sessions"]["login_apis"]
    rc, rep = compliance(write_policy(tmp_path, doc), "--deployment", UPSTREAM_TLS, "--ecds", ECDS)
    assert rc == 1 and cells(rep)["user.profile"]["user_2fa"]["status"] == "not_met"


def test_rate_limits_are_reported_per_api(tmp_path):  # RL-1, RL-2, OPS-4
    rc, rep = compliance(ROOT / "policies/securities.yaml", "--deployment", UPSTREAM_TLS, "--ecds", ECDS)
    c = cells(rep)
    assert c["trade.order.place"]["rate_limit"]["ids"] == "RL-1 RL-2 OPS-4"
    assert c["trade.order.place"]["rate_limit"]["status"] == "met"
    note = c["trade.order.place"]["rate_limit"]["note"]
    assert "orders-per-user (second, minute by app+user)" in note and "per-source" in note
    assert "orders-per-user" not in c["market.quote"]["rate_limit"]["note"]
    # without limits, every API lacks them; an alerting rule alone is not a limit
    doc = load("securities.yaml")
    doc["rate_limits"] = [{"id": "watch", "by": ["app"], "apis": ["market.quote"], "per_minute": 10,
                           "action": "alert"}]
    rc, rep = compliance(write_policy(tmp_path, doc), "--deployment", UPSTREAM_TLS, "--ecds", ECDS)
    c = cells(rep)
    assert rc == 1 and rep["compliant"] is False
    assert c["market.quote"]["rate_limit"]["status"] == "not_met"
    assert "only alerting rules: watch" in c["market.quote"]["rate_limit"]["note"]
    assert c["info.research"]["rate_limit"]["status"] == "not_met"
    assert c["info.research"]["rate_limit"]["note"] == "no rate limit of the policy selects this API"


def test_national_algorithms_are_reported_per_api(tmp_path):  # DATA-5
    doc = load("securities.yaml")
    # not asked for: not required
    rc, rep = compliance(write_policy(tmp_path, doc), "--deployment", UPSTREAM_TLS, "--ecds", ECDS)
    c = cells(rep)
    assert c["trade.order.place"]["national"] == {**c["trade.order.place"]["national"], "ids": "DATA-5",
                                                  "status": "not_required"}
    # asked for, and no app granted the API has an SM credential: not met
    next(a for a in doc["apis"] if a["id"] == "trade.order.place")["crypto"] = "national"
    rc, rep = compliance(write_policy(tmp_path, doc), "--deployment", UPSTREAM_TLS, "--ecds", ECDS)
    assert rc == 1 and cells(rep)["trade.order.place"]["national"]["status"] == "not_met"
    # an hmac-sm3 credential cannot call S3: still not met; an sm2-sm3 one: met
    app = next(a for a in doc["apps"] if a["id"] == "demo-partner")
    app["credentials"].append({"id": "demo-partner-hmac-sm3", "alg": "hmac-sm3", "secret_env": "X"})
    rc, rep = compliance(write_policy(tmp_path, doc), "--deployment", UPSTREAM_TLS, "--ecds", ECDS)
    assert cells(rep)["trade.order.place"]["national"]["status"] == "not_met"
    app["credentials"].append({"id": "demo-partner-sm2", "alg": "sm2-sm3", "public_key_pem": SM2_PUB})
    rc, rep = compliance(write_policy(tmp_path, doc), "--deployment", UPSTREAM_TLS, "--ecds", ECDS)
    c = cells(rep)
    assert c["trade.order.place"]["national"]["status"] == "met"
    assert "demo-partner" in c["trade.order.place"]["national"]["note"]
    assert "TLCP" in c["trade.order.place"]["national"]["note"], "what ends the national TLS, in the report"
    assert c["market.quote"]["national"]["status"] == "not_required"


SM2_PUB = """-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoEcz1UBgi0DQgAEFOG7COsXihzSE1RSK+gsRL/ysYhp
RSDug0vyiyE3DhNlmT5bJ/i6ygR2lnrRr8j0qSEXVVGledAVmYtjB+Ylqg==
-----END PUBLIC KEY-----
"""
