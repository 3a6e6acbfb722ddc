"""The policy field reference (docs/policy.md) covers every field: a policy that sets every field the
schema has (the schema refuses unknown fields, so none is invented here) is validated by the
core and printed back; every field path it contains must be in its table, and a field
the core prints that this policy does not set (a new field with a default) fails the test."""
from __future__ import annotations

import json
import re
import subprocess

import yaml

from conftest import CLI, ROOT

EVERY_FIELD = """
version: 1
industry: securities
gateway:
  clock_skew_seconds: 300
  nonce_lifetime_seconds: 900
  replay: {slots: 64, entries_per_slot: 16, app_entries_per_slot: 8}
  rate_limit_store: {slots: 64, entries_per_slot: 8}
  max_body_bytes: 65536
  max_held_body_bytes: 1048576
  max_body_seconds: 30
  max_signature_header_bytes: 8192
  max_covered_components: 24
  max_signature_base_bytes: 16384
  required_components: [x-app-id]
  default_timezone: Asia/Shanghai
  override_headers: refuse
  mode: report
  report_only_s3: true
  per_code_counters: true
  identity_headers: [app, api, user]
  national_levels: [S2]
apis:
  - {id: a, method: POST, path: "/a/{x}", level: S3, service_object: toC, access: write, user_auth: true,
     personal_info: true, function: trading, description: d, state: online, mode: report, annex_a: trading,
     session: required, crypto: national, review: {by: b, ticket: t, date: "2026-12-01"}}
  - {id: sc, method: POST, path: /s, level: S0, service_object: toB, access: write, user_auth: false,
     personal_info: false, function: s}
  - {id: sl, method: DELETE, path: /s, level: S0, service_object: toB, access: write, user_auth: false,
     personal_info: false, function: s}
api_groups:
  - {id: g, apis: [a], state: online}
apps:
  - id: app
    name: n
    suspended: false
    allowed_ips: [10.0.0.0/8]
    onboarding: true
    sdk: {minimum: "2.1.0", known_bad: ["2.3.1"], action: flag}
    admission: {by: alice, ticket: ONB-1, date: "2026-01-01", scenario: s, contact: c, apis: [a]}
    credentials:
      - {id: k1, alg: hmac-sha256, secret_env: S, not_before: "2026-01-01T00:00:00+08:00", not_after: "2099-01-01T00:00:00+08:00"}
      - id: k2
        alg: ecdsa-p256-sha256
        public_key_pem: |
          -----BEGIN PUBLIC KEY-----
          MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAESacegqY3JPFFRsC3DSAeA24T6T+y
          hVlRlRYMZXrfgov2z5CXQwqdwQznQ+BPuQ3qBUcAYFr2cAan7w40gJ3L5g==
          -----END PUBLIC KEY-----
      - id: k5
        alg: sm2-sm3
        sm2_id: ALICE123@YAHOO.COM
        public_key_pem: |
          -----BEGIN PUBLIC KEY-----
          MFkwEwYHKoZIzj0CAQYIKoEcz1UBgi0DQgAEFOG7COsXihzSE1RSK+gsRL/ysYhp
          RSDug0vyiyE3DhNlmT5bJ/i6ygR2lnrRr8j0qSEXVVGledAVmYtjB+Ylqg==
          -----END PUBLIC KEY-----
      - {id: k6, alg: hmac-sm3, secret_env: S}
      - {id: k3, certificate: {sha256: "%s"}}
      - {id: k4, certificate: {uri_san: "spiffe://x/app"}}
grants:
  - id: gr
    app: app
    apis: [a]
    functions: [trading]
    users: [u1]
    not_before: "2026-01-01T00:00:00+08:00"
    not_after: "2027-01-01T00:00:00+08:00"
    max_uses: 10
    once: false
    windows: [{days: [mon], from: "09:00", to: "15:00"}]
    timezone: Asia/Shanghai
    approval: {approver: r, ticket: T-1, date: "2026-01-01", assessment: ok, requested_by: q}
    forbid_request_fields: [x.y]
    hide_response_fields: [z]
lists:
  - {id: l, mode: deny, apis: [a], entries: [{app: app, ip: 192.0.2.1, user: u2}]}
opted_out_users: [u3]
bans:
  threshold: 5
  window_seconds: 60
  ban_seconds: 60
  ip_slots: 64
  entries_per_slot: 16
  ipv6_prefix: 64
  lifted: [{app: app, at: "2026-01-01T00:00:00+08:00", by: ops, reason: r}]
state:
  backend: cluster
  cluster: {envoy_cluster: c, authority: c, timeout_ms: 500, key_prefix: "apisec:", credentials_env: C, app_share: 100}
routes:
  - {name: r, apis: [a], mode: report}
sessions:
  create_api: sc
  logout_api: sl
  idle_timeout_seconds: 60
  max_lifetime_seconds: 600
  slots: 16
  entries_per_slot: 4
  ip_unbound_apps: [app]
  operator_route: op
  operators: ["spiffe://x/op"]
  login_apis: [a]
  login_header: x-apisec-login
  max_per_app: 32
  establish_per_minute: 100
  establish_per_source_per_minute: 10
audit:
  chain_key_env: K
  checkpoint_seconds: 10
  mask: {keep_head: 3, keep_tail: 4, account_fields: [account_id]}
anomalies:
  working_hours:
    - {id: h, timezone: "+08:00", days: [mon], from: "09:00", to: "15:00", apis: [a], apps: [app], action: alert}
  usual_sources:
    - {id: s, app: app, ranges: [10.1.0.0/16], action: block}
  bulk_pulls:
    - {id: b, apps: [app], apis: [a], window_seconds: 60, max_calls: 10, max_response_bytes: 1000, action: alert}
  new_sources:
    - {id: n, apps: [app], learn_until: "2027-01-01T00:00:00+08:00", approved: [10.2.0.0/16], max_sources: 8,
       forget_days: 30, action: block}
  signature_failures:
    - {id: f, apps: [app], threshold: 5, window_seconds: 300, ban_seconds: 600, action: block}
rate_limits:
  - {id: rl, by: [app, api, function, user, source], apis: [a], functions: [trading], apps: [app], per_second: 5,
     per_minute: 100, per_hour: 1000, per_day: 10000, quota: {per_day: 5000, per_month: 100000, timezone: UTC},
     action: refuse, count_toward_ban: true, source_prefix_v4: 24, source_prefix_v6: 56}
""" % ("ab" * 32)


def paths(doc, prefix=""):
    """Dotted field paths; list elements as `name[]`."""
    out = set()
    if isinstance(doc, dict):
        for k, v in doc.items():
            p = f"{prefix}.{k}" if prefix else k
            out.add(p)
            out |= paths(v, p)
    elif isinstance(doc, list):
        for v in doc:
            out |= paths(v, prefix + "[]")
    return out


def readme_fields() -> str:
    text = (ROOT / "docs/policy.md").read_text()
    section = text.split("### Field reference", 1)[1].split("\n### ", 1)[0]
    rows = [line.replace("\\|", "/") for line in section.splitlines() if line.startswith("| `")]
    return "\n".join(row.split("|")[1] for row in rows)


def documented(path: str, table: str) -> bool:
    """`apps[].credentials[].alg` is documented by a cell naming it, or by a cell that names its
    parent and lists the leaf (`grants[].windows[]` (`days`, `from`, `to`))."""
    if f"`{path}`" in table:
        return True
    leaf = path.rsplit(".", 1)[-1].replace("[]", "")
    parent = path.rsplit(".", 1)[0] if "." in path else ""
    for line in table.splitlines():
        if parent and f"`{parent}" in line and re.search(rf"`\.?{re.escape(leaf)}`", line):
            return True
        if parent and re.search(rf"`{re.escape(parent)}`", line) and f"`{leaf}`" in line:
            return True
    return False


def variants() -> list[dict]:
    """Every field, in two policies: sessions are refused on the cluster backend."""
    full = yaml.safe_load(EVERY_FIELD)
    cluster = json.loads(json.dumps(full))
    del cluster["sessions"]
    del cluster["apis"][0]["session"]
    local = json.loads(json.dumps(full))
    local["state"] = {"backend": "local"}
    return [cluster, local]


def test_every_policy_field_is_in_the_readme_reference(tmp_path):
    table = readme_fields()
    given_all = set()
    for i, doc in enumerate(variants()):
        src = tmp_path / f"every{i}.json"
        src.write_text(json.dumps(doc))
        out = subprocess.run([str(CLI), "policy", "json", str(src)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        printed = paths(json.loads(out.stdout))
        given = paths(doc)
        assert printed - given == set(), "fields the core has that this test does not set"
        given_all |= given
    assert given_all == paths(yaml.safe_load(EVERY_FIELD))
    leaves = {p for p in given_all if not any(q.startswith(p + ".") or q.startswith(p + "[]") for q in given_all)}
    missing = sorted(p for p in leaves if not documented(p, table))
    assert missing == [], f"docs/policy.md field reference lacks: {missing}"
