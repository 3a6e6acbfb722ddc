"""The checked-in Envoy configuration (envoy/*.yaml) users read and copy: every file passes
`envoy --mode validate` (which loads the .wasm and runs the filter's configure on the policy),
the configuration `make run` and the tests start is these files with only ports and paths
changed, and the upstream TLS variant works end to end (DATA-2)."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import time

import pytest

from conftest import ROOT, WASM, audit_lines, base_policy, certs_mod, gw, read_audit, start_gateway

FILES = ["gateway.yaml", "gateway-upstream-tls.yaml", "apisec-filter.yaml", "apisec-ecds.yaml",
         "apisec-native-ecds.yaml"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working directory laid out as the repository after `make build demo-assets` and one
    `apisec policy apply`: the relative paths in the checked-in files resolve here."""
    d = tmp_path_factory.mktemp("envoy-config")
    certs_mod.generate(d / "build/certs")
    (d / "build/ecds").mkdir(parents=True)
    (d / "build/ecds/apisec.yaml").write_text((ROOT / "envoy/apisec-ecds.yaml").read_text())
    (d / gw.REL_WASM).parent.mkdir(parents=True)
    (d / gw.REL_WASM).symlink_to(WASM)
    return d


def validate(workdir, doc_or_path, env: dict | None = None) -> subprocess.CompletedProcess:
    if isinstance(doc_or_path, dict):
        path = workdir / "candidate.yaml"
        path.write_text(json.dumps(doc_or_path))
    else:
        path = doc_or_path
    return subprocess.run([gw.envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "error"],
                          cwd=workdir, capture_output=True, text=True, timeout=120, env=env)


def with_inline_filter(typed_config: dict) -> dict:
    """envoy/gateway.yaml's plain listener alone, with the apisec filter configured inline."""
    doc = gw.load_yaml(gw.GATEWAY_YAML)
    lst = doc["static_resources"]["listeners"][0]
    gw._hcm(lst)["http_filters"] = [{"name": "apisec", "typed_config": typed_config},
                                    gw.gateway_filter("apisec-guard"), gw.ROUTER]
    doc["static_resources"]["listeners"] = [lst]
    return doc


def test_every_checked_in_yaml_file_is_listed():
    assert sorted(p.name for p in (ROOT / "envoy").glob("*.yaml")) == sorted(FILES)


@pytest.mark.parametrize("name", ["gateway.yaml", "gateway-upstream-tls.yaml"])
def test_every_listener_guards_the_filter(name):  # LVL-1, ATK-1
    """Issue 21 item 0: in every HTTP connection manager of the shipped gateways, apisec is
    followed at once by the guard (RBAC on wasm.apisec_passed), and the guard's refusal is 503
    apisec_unavailable."""
    doc = gw.load_yaml(ROOT / "envoy" / name)
    guard = gw.gateway_filter("apisec-guard")
    assert guard["typed_config"]["rules"]["action"] == "ALLOW"
    for lst in doc["static_resources"]["listeners"]:
        hcm = gw._hcm(lst)
        names = [f["name"] for f in hcm["http_filters"]]
        assert names[names.index("apisec") + 1] == "apisec-guard", (lst["name"], names)
        assert hcm["http_filters"][names.index("apisec-guard")] == guard
        mapper = hcm["local_reply_config"]["mappers"][0]
        assert mapper["status_code"] == 503
        assert mapper["body_format_override"]["json_format"]["error"] == "apisec_unavailable"


@pytest.mark.parametrize("name", ["gateway.yaml", "gateway-upstream-tls.yaml"])
def test_complete_gateway_validates(workdir, name):
    out = validate(workdir, ROOT / "envoy" / name)
    assert out.returncode == 0, out.stderr
    assert f"configuration '{ROOT / 'envoy' / name}' OK" in out.stdout


def test_filter_entry_and_ecds_resource_validate_with_the_wasm(workdir):
    entry = gw.load_yaml(gw.FILTER_YAML)
    assert [e["name"] for e in entry] == ["apisec", "apisec-guard"]
    assert entry[1] == gw.gateway_filter("apisec-guard")
    ecds = gw.load_yaml(gw.ECDS_YAML)["resources"][0]
    # One filter configuration, two ways of delivering it.
    assert entry[0]["typed_config"] == ecds["typed_config"]
    assert ecds["name"] == "apisec"
    cfg = ecds["typed_config"]["config"]
    assert cfg["failure_policy"] == "FAIL_CLOSED" and cfg["allow_on_headers_stop_iteration"] is True
    out = validate(workdir, with_inline_filter(entry[0]["typed_config"]))
    assert out.returncode == 0, out.stderr


def test_validation_runs_the_filter_on_the_policy(workdir):
    """What makes the validation above worth something: a policy the filter refuses, or a
    missing .wasm, fails `envoy --mode validate`."""
    tc = gw.load_yaml(gw.FILTER_YAML)[0]["typed_config"]
    bad_policy = copy.deepcopy(tc)
    bad_policy["config"]["configuration"]["value"] = json.dumps({"version": 1, "apis": []})
    out = validate(workdir, with_inline_filter(bad_policy))
    assert out.returncode != 0 and "Unable to create Wasm plugin apisec" in out.stderr
    no_wasm = copy.deepcopy(tc)
    no_wasm["config"]["vm_config"]["code"]["local"]["filename"] = "missing.wasm"
    assert validate(workdir, with_inline_filter(no_wasm)).returncode != 0


def test_shipped_policies_validate_inside_the_filter(workdir):
    """Each example policy, as `apisec policy apply` would write it, loads in Envoy (LVL-5)."""
    for name in ("securities.yaml", "futures.yaml", "funds.yaml"):
        tc = gw.load_yaml(gw.FILTER_YAML)[0]["typed_config"]
        tc["config"]["configuration"]["value"] = gw.policy_to_json(ROOT / "policies" / name)
        env_names = gw.secret_env_names(tc["config"]["configuration"]["value"])
        tc["config"]["vm_config"]["environment_variables"]["host_env_keys"] = env_names
        # Any 32-byte secret: configure checks that each named secret is there and well formed.
        env = {**os.environ, **{n: "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTMyYnk=" for n in env_names}}
        out = validate(workdir, with_inline_filter(tc), env=env)
        assert out.returncode == 0, f"{name}: {out.stderr}"


def test_upstream_tls_variant_changes_only_the_backend_cluster():
    plain = gw.load_yaml(gw.GATEWAY_YAML)
    tls = gw.load_yaml(gw.UPSTREAM_TLS_YAML)
    backend = tls["static_resources"]["clusters"][0]
    sock = backend.pop("transport_socket")
    assert plain == tls
    ctx = sock["typed_config"]
    assert ctx["sni"] == certs_mod.BACKEND_NAME
    vc = ctx["common_tls_context"]["validation_context"]
    assert vc["trusted_ca"]["filename"] == "build/certs/backend-ca.pem"
    assert vc["match_typed_subject_alt_names"] == [{"san_type": "DNS", "matcher": {"exact": certs_mod.BACKEND_NAME}}]


def delocalize(doc, layout: gw.Layout):
    """The inverse of gw.localize for one layout: this layout's paths back to the relative ones."""
    if isinstance(doc, dict):
        return {k: delocalize(v, layout) for k, v in doc.items()}
    if isinstance(doc, list):
        return [delocalize(v, layout) for v in doc]
    if isinstance(doc, str):
        if doc == str(layout.wasm):
            return gw.REL_WASM
        if doc.startswith(f"{layout.certs}/"):
            return gw.REL_CERTS + doc[len(f"{layout.certs}/"):]
        if doc.startswith(f"{layout.build}/"):
            return gw.REL_BUILD + doc[len(f"{layout.build}/"):]
    return doc


@pytest.mark.parametrize("backend_tls", [False, True])
def test_rendered_configuration_is_the_checked_in_one(tmp_path, backend_tls):
    """`make run` and every end-to-end test start what envoy/gateway.yaml says: rendered with the
    checked-in ports, the bootstrap is the checked-in file with only paths changed, and the ECDS
    resource is envoy/apisec-ecds.yaml with only the policy, its secret names and a version."""
    layout = gw.Layout(build=tmp_path / "b", wasm=WASM, certs=tmp_path / "c", backend_tls=backend_tls, native=None)
    policy = base_policy()
    gw.render(json.dumps(policy), layout)
    rendered = json.loads(layout.bootstrap.read_text())
    checked_in = gw.load_yaml(gw.UPSTREAM_TLS_YAML if backend_tls else gw.GATEWAY_YAML)
    assert delocalize(rendered, layout) == checked_in
    ecds = json.loads((layout.ecds_dir / gw.ECDS_FILE).read_text())
    template = gw.load_yaml(gw.ECDS_YAML)
    assert ecds.pop("version_info")
    cfg = ecds["resources"][0]["typed_config"]["config"]
    assert json.loads(cfg["configuration"]["value"]) == policy
    assert cfg["vm_config"]["environment_variables"]["host_env_keys"] == ["APISEC_AUDIT_KEY",
                                                                          "APISEC_DEMO_PARTNER_SECRET"]
    tcfg = template["resources"][0]["typed_config"]["config"]
    cfg["configuration"]["value"] = tcfg["configuration"]["value"]
    cfg["vm_config"]["environment_variables"]["host_env_keys"] = []
    assert delocalize(ecds, layout) == template


def native_validate(workdir, typed_config: dict, env: dict | None = None) -> subprocess.CompletedProcess:
    """`envoy --mode validate` of the plain listener with the native build's filter inline,
    libapisec_native.so found as `make run NATIVE=1` finds it."""
    env = {**os.environ, **(env or {}), "ENVOY_DYNAMIC_MODULES_SEARCH_PATH": str(gw.NATIVE_DIR)}
    return validate(workdir, with_inline_filter(typed_config), env=env)


def test_native_ecds_resource_validates_and_runs_the_filter_on_the_policy(workdir):
    """envoy/apisec-native-ecds.yaml (the native build) validates with the built library, the
    shipped policies load in it, and a policy it refuses, a library of another name or a
    configuration of another filter fails validation: Envoy runs the module's config_new."""
    ecds = gw.load_yaml(gw.NATIVE_ECDS_YAML)["resources"][0]
    tc = ecds["typed_config"]
    assert ecds["name"] == "apisec" and tc["dynamic_module_config"] == {"name": "apisec_native", "do_not_close": True}
    out = native_validate(workdir, tc)
    assert out.returncode == 0, out.stderr
    for name in ("securities.yaml", "futures.yaml", "funds.yaml"):
        good = copy.deepcopy(tc)
        good["filter_config"]["value"] = gw.policy_to_json(ROOT / "policies" / name)
        names = gw.secret_env_names(good["filter_config"]["value"])
        out = native_validate(workdir, good, env={n: "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTMyYnk=" for n in names})
        assert out.returncode == 0, f"{name}: {out.stderr}"
    bad = copy.deepcopy(tc)
    bad["filter_config"]["value"] = json.dumps({"version": 1, "apis": []})
    out = native_validate(workdir, bad)
    assert out.returncode != 0 and "Failed to initialize dynamic module" in out.stderr, out.stderr
    missing = copy.deepcopy(tc)
    missing["dynamic_module_config"]["name"] = "apisec_missing"
    assert native_validate(workdir, missing).returncode != 0


def test_rendered_native_configuration_is_the_checked_in_one(tmp_path):
    """The native build's run (`make run NATIVE=1`, APISEC_BUILD=native) starts the same
    envoy/gateway.yaml, with envoy/apisec-native-ecds.yaml in the watched file: only the policy
    and a version differ."""
    layout = gw.Layout(build=tmp_path / "b", wasm=WASM, certs=tmp_path / "c", native=gw.NATIVE_DIR)
    policy = base_policy()
    gw.render(json.dumps(policy), layout)
    assert delocalize(json.loads(layout.bootstrap.read_text()), layout) == gw.load_yaml(gw.GATEWAY_YAML)
    ecds = json.loads((layout.ecds_dir / gw.ECDS_FILE).read_text())
    template = gw.load_yaml(gw.NATIVE_ECDS_YAML)
    assert ecds.pop("version_info")
    tc = ecds["resources"][0]["typed_config"]
    assert json.loads(tc["filter_config"]["value"]) == policy
    tc["filter_config"]["value"] = template["resources"][0]["typed_config"]["filter_config"]["value"]
    assert ecds == template


@pytest.fixture(scope="module")
def tls_backend_gateway(tmp_path_factory, secret):
    g = start_gateway(tmp_path_factory.mktemp("gw-backend-tls"), base_policy(), secret=secret, concurrency=1,
                      backend_tls=True)
    yield g
    g.stop()


def test_backend_over_tls_with_the_gateway_certificate(tls_backend_gateway):  # DATA-2
    g = tls_backend_gateway
    r = g_client_get(g, "/api/v1/market/quotes/600000")
    assert r.status_code == 200, r.text
    echoed = r.json()
    assert echoed["path"] == "/api/v1/market/quotes/600000"
    assert echoed["headers"]["x-apisec-app"] == "demo-partner"
    assert g.stat("cluster.backend.ssl.handshake") >= 1
    record = read_audit(g, echoed["headers"]["x-request-id"])
    assert record["upstream"] == f"127.0.0.1:{g.layout.upstream_port}"


def test_backend_with_a_certificate_from_another_ca_gets_nothing(tmp_path, secret):  # DATA-2
    """A backend (or anyone on the path) presenting a certificate for the right name from a CA
    the gateway does not trust for backends: the TLS handshake fails, no request is sent."""
    g = start_gateway(tmp_path, base_policy(), secret=secret, concurrency=1, backend_tls=True,
                      upstream_cert="backend-rogue")
    try:
        r = g_client_get(g, "/api/v1/market/quotes/600000")
        assert r.status_code == 503
        assert g.stat("cluster.backend.ssl.fail_verify_error") >= 1
        assert g.stat("cluster.backend.ssl.handshake") == 0
        assert g.stat("cluster.backend.upstream_rq_200") == 0
        # The audit record: the filter let the S0 call through, Envoy found no trusted backend.
        deadline = time.time() + 8
        while time.time() < deadline and not g.layout.audit_log.exists():
            time.sleep(0.2)
        time.sleep(1.5)
        (record,) = audit_lines(g)
        assert record["status"] == 503, record
        assert record["details"].startswith("upstream_reset_before_response_started"), record
        assert record["audit"]["app"] == "demo-partner"
    finally:
        g.stop()


def g_client_get(g: gw.Gateway, path: str):
    import requests

    s = requests.Session()
    s.trust_env = False
    return s.get(f"http://127.0.0.1:{g.layout.http_port}{path}", headers={"x-app-id": "demo-partner"}, timeout=10)
