"""`apisec render istio|envoy-gateway` (issue 26): the manifests for Istio and Envoy Gateway made
from the policy with the same validation as `policy apply`, one resource per file, each valid
against the project's published schema (deploy/schemas, check-jsonschema, unknown fields
refused); the policy they carry loads in a real Envoy with the built filter; they fail closed,
are pinned to the image `make dist` built, take every secret (the audit chain key among them)
from a Secret, and carry the audit access log. No Kubernetes cluster is started."""
from __future__ import annotations

import json
import re
import subprocess

import pytest

from conftest import CLI, ROOT
from helpers import REVIEW, loads_in_envoy, manifest_docs

DIGEST = ROOT / "dist" / ("apisec-filter-%s.oci.digest" % re.search(
    r'^version = "(.*)"', (ROOT / "Cargo.toml").read_text(), re.M).group(1))
SCHEMAS = ROOT / "deploy/schemas"
POLICY = ROOT / "policies/securities.yaml"
ISTIO = {"wasmplugin.yaml": "wasmplugin-v1alpha1", "apisec-guard.yaml": "envoyfilter-v1alpha3",
         "audit-telemetry.yaml": "telemetry-v1"}
EG = {"envoy-extension-policy.yaml": "envoyextensionpolicy-v1alpha1", "apisec-guard.yaml": "envoypatchpolicy-v1alpha1",
      "envoy-proxy.yaml": "envoyproxy-v1alpha1", "backend-traffic-policy.yaml": "backendtrafficpolicy-v1alpha1"}


def render(target: str, out, policy=POLICY, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), "render", target, str(policy), "--digest", str(DIGEST), "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=60)


def schema_check(schema: str, path) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / ".venv/bin/check-jsonschema"), "--schemafile", str(SCHEMAS / f"{schema}.json"),
                           str(path)], capture_output=True, text=True, timeout=60)


def secret_names() -> list[str]:
    out = subprocess.run([str(CLI), "policy", "env", str(POLICY)], capture_output=True, text=True, check=True)
    return sorted(out.stdout.split())


def one(path) -> dict:
    (doc,) = manifest_docs(path)
    return doc


@pytest.mark.parametrize("target,files", [("istio", ISTIO), ("envoy-gateway", EG)])
def test_rendered_manifests_are_valid_against_the_published_schemas(tmp_path, target, files):
    out = render(target, tmp_path)
    assert out.returncode == 0, out.stderr
    for name, schema in files.items():
        check = schema_check(schema, tmp_path / name)
        assert check.returncode == 0, (name, check.stdout)
    # the schemas are strict: a misspelt field or a wrong type is found
    first = tmp_path / next(iter(files))
    text = first.read_text()
    key, value, wrong = (("failStrategy", '"FAIL_CLOSE"', '"FAIL_SOMETIMES"') if target == "istio"
                         else ("failOpen", "false", '"no"'))
    assert f'"{key}": {value}' in text
    first.write_text(text.replace(f'"{key}":', f'"{key.lower()}":', 1))
    assert schema_check(files[first.name], first).returncode == 1
    first.write_text(text.replace(f'"{key}": {value}', f'"{key}": {wrong}', 1))
    assert schema_check(files[first.name], first).returncode == 1


def test_istio_manifests_carry_the_policy_the_secrets_and_the_audit_log(tmp_path):
    assert render("istio", tmp_path).returncode == 0
    plugin = one(tmp_path / "wasmplugin.yaml")["spec"]
    assert plugin["failStrategy"] == "FAIL_CLOSE" and plugin["phase"] == "AUTHN" and plugin["pluginName"] == "apisec"
    assert plugin["sha256"] == DIGEST.read_text().strip().split(":", 1)[1]
    names = secret_names()
    assert "APISEC_AUDIT_KEY" in names
    assert sorted(e["name"] for e in plugin["vmConfig"]["env"]) == names
    assert all(e == {"name": e["name"], "valueFrom": "HOST"} for e in plugin["vmConfig"]["env"])
    assert sorted(one(tmp_path / "secret.yaml")["stringData"]) == names
    patch = one(tmp_path / "gateway-secret-env.yaml")
    (proxy,) = patch["spec"]["template"]["spec"]["containers"]
    assert proxy["name"] == "istio-proxy" and sorted(e["name"] for e in proxy["env"]) == names
    assert all(e["valueFrom"]["secretKeyRef"]["name"] == "apisec-secrets" for e in proxy["env"])
    telemetry = one(tmp_path / "audit-telemetry.yaml")["spec"]["accessLogging"][0]
    assert telemetry["filter"]["expression"] == "'wasm.apisec_audit' in filter_state"
    provider = one(tmp_path / "mesh-config.yaml")["extensionProviders"][0]
    assert provider["name"] == telemetry["providers"][0]["name"]
    assert provider["envoyFileAccessLog"]["logFormat"]["text"] == "%FILTER_STATE(wasm.apisec_audit:PLAIN)%\n"
    out = loads_in_envoy(tmp_path, plugin["pluginConfig"], names)
    assert out.returncode == 0, out.stderr


def test_envoy_gateway_manifests_carry_the_policy_the_secrets_and_the_audit_log(tmp_path):
    assert render("envoy-gateway", tmp_path, POLICY, "--gateway", "brokers", "--namespace", "apis").returncode == 0
    (wasm,) = one(tmp_path / "envoy-extension-policy.yaml")["spec"]["wasm"]
    assert wasm["failOpen"] is False and wasm["code"]["image"]["sha256"] == DIGEST.read_text().strip()[7:]
    names = secret_names()
    assert wasm["env"]["hostKeys"] == names
    proxy = one(tmp_path / "envoy-proxy.yaml")["spec"]
    assert sorted(e["name"] for e in proxy["provider"]["kubernetes"]["envoyDeployment"]["container"]["env"]) == names
    audit, envoy_own = proxy["telemetry"]["accessLog"]["settings"]
    assert audit["format"]["text"] == "%FILTER_STATE(wasm.apisec_audit:PLAIN)%\n"
    assert audit["matches"] == ["'wasm.apisec_audit' in filter_state"]
    assert envoy_own["matches"] == ["!('wasm.apisec_audit' in filter_state)"]
    guard = one(tmp_path / "apisec-guard.yaml")
    assert guard["spec"]["targetRef"]["name"] == "brokers" and guard["metadata"]["namespace"] == "apis"
    assert guard["spec"]["jsonPatches"][0]["name"] == "apis/brokers/https"
    assert one(tmp_path / "backend-traffic-policy.yaml")["spec"]["targetRefs"][0]["name"] == "brokers"
    out = loads_in_envoy(tmp_path, wasm["config"], names)
    assert out.returncode == 0, out.stderr


def test_render_validates_as_policy_apply_does_and_writes_nothing_on_refusal(tmp_path):  # LVL-6
    doc = json.loads(subprocess.run([str(CLI), "policy", "json", str(POLICY)], capture_output=True, text=True,
                                    check=True).stdout)
    broken = dict(doc, grants=doc["grants"] + [{"id": "g", "app": "nobody", "apis": ["info.research"]}])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(broken))
    out = render("istio", tmp_path / "out", bad)
    assert out.returncode == 2 and "no app 'nobody'" in out.stderr and not (tmp_path / "out").exists()
    # a level change without a new review, against the policy in force
    changed = json.loads(json.dumps(doc))
    next(a for a in changed["apis"] if a["id"] == "info.research")["level"] = "S2"
    (tmp_path / "next.json").write_text(json.dumps(changed))
    out = render("envoy-gateway", tmp_path / "out", tmp_path / "next.json", "--against", str(POLICY))
    assert out.returncode == 2 and "new review record" in out.stderr and not (tmp_path / "out").exists()
    next(a for a in changed["apis"] if a["id"] == "info.research")["review"] = {**REVIEW, "ticket": "CHG-render-1"}
    (tmp_path / "next.json").write_text(json.dumps(changed))
    assert render("envoy-gateway", tmp_path / "out", tmp_path / "next.json", "--against", str(POLICY)).returncode == 0
    out = subprocess.run([str(CLI), "render", "istio", str(POLICY), "--digest", "sha256:abc", "--out", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "64 hex digits" in out.stderr
