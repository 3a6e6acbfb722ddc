"""`make dist` (run by `make test` before this suite): the .wasm with its SHA-256, and an OCI image
of it that is reproducible, survives a push to and a pull from a real registry (Debian's
docker-registry on loopback, with skopeo, a standard client), and whose plugin.wasm a real
Envoy loads and runs."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import requests

from conftest import ROOT, WASM, base_policy, gw, read_audit, start_gateway
from helpers import loads_in_envoy, manifest_docs

sys.path.insert(0, str(ROOT / "release"))
import oci_image  # noqa: E402

DIST = ROOT / "dist"
VERSION = re.search(r'^version = "(.*)"', (ROOT / "Cargo.toml").read_text(), re.M).group(1)
ARCHIVE = DIST / f"apisec-filter-{VERSION}.oci.tar"


def test_dist_holds_the_built_wasm_and_its_sha256():
    wasm = (DIST / "apisec_filter.wasm").read_bytes()
    assert wasm == WASM.read_bytes(), "dist/ is stale: run `make dist`"
    line = (DIST / "apisec_filter.wasm.sha256").read_text()
    assert line == f"{hashlib.sha256(wasm).hexdigest()}  apisec_filter.wasm\n"
    # `sha256sum -c` is how a user checks a download.
    assert subprocess.run(["sha256sum", "-c", "apisec_filter.wasm.sha256"], cwd=DIST,
                          capture_output=True).returncode == 0


def test_dist_holds_the_native_library_its_sha256_and_the_resource_that_loads_it(tmp_path, monkeypatch, secret):
    """The native build's artefacts: libapisec_native.so for this platform (the built one), a
    checksum `sha256sum -c` accepts, and the ECDS resource; a real Envoy loads the library from
    dist/ (as ENVOY_DYNAMIC_MODULES_SEARCH_PATH names it) and validates the shipped resource."""
    platform = f"linux-{os.uname().machine}-gnu"
    folder = DIST / "native" / platform
    lib = (folder / "libapisec_native.so").read_bytes()
    assert lib == (gw.NATIVE_DIR / "libapisec_native.so").read_bytes(), "dist/ is stale: run `make dist`"
    line = (folder / "libapisec_native.so.sha256").read_text()
    assert line == f"{hashlib.sha256(lib).hexdigest()}  libapisec_native.so\n"
    assert subprocess.run(["sha256sum", "-c", "libapisec_native.so.sha256"], cwd=folder,
                          capture_output=True).returncode == 0
    resource = DIST / "native/apisec-native-ecds.yaml"
    assert resource.read_text() == gw.NATIVE_ECDS_YAML.read_text()
    # The library in dist/ is one a real Envoy loads and runs (the search path on dist/): an S0
    # call is let through with its audit record, a call of an unknown app refused unsent.
    monkeypatch.setenv("APISEC_BUILD", "native")
    monkeypatch.setattr(gw, "NATIVE_DIR", folder)
    g = start_gateway(tmp_path / "gw", base_policy(), secret=secret, concurrency=1)
    try:
        assert g.layout.native == folder
        url = f"http://127.0.0.1:{g.layout.http_port}/api/v1/market/quotes/600000"
        r = requests.get(url, headers={"x-app-id": "demo-partner"}, timeout=10)
        assert r.status_code == 200, r.text
        assert read_audit(g, r.json()["headers"]["x-request-id"])["audit"]["decision"] == "allow"
        before = g.stat("cluster.backend.upstream_rq_total")
        r = requests.get(url, headers={"x-app-id": "nobody"}, timeout=10)
        assert r.status_code == 401 and r.json()["error"] == "unknown_app", r.text
        assert read_audit(g, r.json()["request_id"])["audit"]["code"] == "unknown_app"
        assert g.stat("cluster.backend.upstream_rq_total") == before
        assert "Dynamic module ABI version v0.2.0 matched." in g.envoy_log.read_text(errors="replace")
    finally:
        g.stop()


def test_image_is_reproducible_and_holds_the_wasm(tmp_path):
    wasm = WASM.read_bytes()
    digest = (DIST / f"apisec-filter-{VERSION}.oci.digest").read_text().strip()
    # The same .wasm gives the same bytes, hence the same manifest digest, built again elsewhere.
    out = subprocess.run([sys.executable, str(ROOT / "release/oci_image.py"), str(WASM), "--tag", VERSION,
                          "--out", str(tmp_path / "again.tar")], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == digest
    assert (tmp_path / "again.tar").read_bytes() == ARCHIVE.read_bytes()
    inner, mdigest = oci_image.wasm_from_archive(ARCHIVE.read_bytes(), VERSION)
    assert inner == wasm and mdigest == digest
    # A different module gives a different image.
    _, _, other = oci_image.build(wasm + b"\0", VERSION)
    assert other != digest
    # The compat variant's marks, which Istio's and Envoy Gateway's fetchers look for.
    blobs, manifest, d = oci_image.build(wasm, VERSION)
    assert d == digest
    assert manifest["annotations"]["module.wasm.image/variant"] == "compat"
    assert [layer["mediaType"] for layer in manifest["layers"]] == ["application/vnd.oci.image.layer.v1.tar+gzip"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A real OCI registry (Debian's docker-registry, the CNCF distribution server) on loopback."""
    d = tmp_path_factory.mktemp("registry")
    port = gw.free_port()
    (d / "config.yml").write_text(json.dumps({
        "version": 0.1, "log": {"level": "warn"},
        "storage": {"filesystem": {"rootdirectory": str(d / "data")}},
        "http": {"addr": f"127.0.0.1:{port}"},
    }))
    proc = subprocess.Popen([shutil.which("docker-registry") or "docker-registry", "serve", str(d / "config.yml")],
                            stdout=subprocess.DEVNULL, stderr=open(d / "registry.log", "w"))
    deadline = time.time() + 20
    while True:
        try:
            if requests.get(f"http://127.0.0.1:{port}/v2/", timeout=1).status_code == 200:
                break
        except requests.RequestException:
            pass
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError((d / "registry.log").read_text())
        time.sleep(0.1)
    yield f"127.0.0.1:{port}"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)


def skopeo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=120)


def test_push_pull_back_and_envoy_runs_the_pulled_module(registry, tmp_path, secret):
    digest = (DIST / f"apisec-filter-{VERSION}.oci.digest").read_text().strip()
    ref = f"docker://{registry}/apisec/apisec-filter"
    # Push as documented in docs/operators.md "Deploy".
    out = skopeo("copy", "--dest-tls-verify=false", f"oci-archive:{ARCHIVE}:{VERSION}", f"{ref}:{VERSION}")
    assert out.returncode == 0, out.stderr
    # The registry serves the very manifest built here: the digest a WasmPlugin pins.
    raw = skopeo("inspect", "--raw", "--tls-verify=false", f"{ref}:{VERSION}")
    assert raw.returncode == 0, raw.stderr
    assert "sha256:" + hashlib.sha256(raw.stdout.encode()).hexdigest() == digest
    # Pull back by digest, as Istio does with a pinned image.
    pulled = tmp_path / "pulled.tar"
    out = skopeo("copy", "--src-tls-verify=false", f"{ref}@{digest}", f"oci-archive:{pulled}:pulled")
    assert out.returncode == 0, out.stderr
    wasm, mdigest = oci_image.wasm_from_archive(pulled.read_bytes(), "pulled")
    assert mdigest == digest and wasm == WASM.read_bytes()
    # A digest the registry does not hold is not pulled (a pinned image cannot be swapped).
    wrong = "sha256:" + "0" * 64
    assert skopeo("copy", "--src-tls-verify=false", f"{ref}@{wrong}", f"oci-archive:{tmp_path / 'x.tar'}:x").returncode != 0
    # The module from the registry is the filter: a real Envoy loads it and enforces the policy.
    module = tmp_path / "plugin.wasm"
    module.write_bytes(wasm)
    g = start_gateway(tmp_path / "gw", base_policy(), secret=secret, concurrency=1, wasm=module, with_tls=False)
    try:
        s = requests.Session()
        s.trust_env = False
        ok = s.get(f"http://127.0.0.1:{g.layout.http_port}/api/v1/market/quotes/600000",
                   headers={"x-app-id": "demo-partner"}, timeout=10)
        assert ok.status_code == 200
        refused = s.get(f"http://127.0.0.1:{g.layout.http_port}/api/v1/market/quotes/600000",
                        headers={"x-app-id": "nobody"}, timeout=10)
        assert refused.status_code == 401 and refused.json()["error"] == "unknown_app"
        record = read_audit(g, refused.json()["request_id"])
        assert record["audit"]["code"] == "unknown_app" and record["audit"]["decision"] == "deny"
        assert g.stat("cluster.backend.upstream_rq_total") == 1
    finally:
        g.stop()
    assert os.path.getsize(module) > 0


# --- deployment manifests (deploy/) ------------------------------------------------------------

def policy_env(policy: dict) -> list[str]:
    return gw.secret_env_names(json.dumps(policy))


def test_istio_wasmplugin(tmp_path):
    (plugin,) = manifest_docs(ROOT / "deploy/istio/wasmplugin.yaml")
    spec = plugin["spec"]
    assert plugin["kind"] == "WasmPlugin" and plugin["apiVersion"] == "extensions.istio.io/v1alpha1"
    assert spec["failStrategy"] == "FAIL_CLOSE"
    assert spec["pluginName"] == gw.load_yaml(gw.FILTER_YAML)[0]["typed_config"]["config"]["root_id"]
    assert spec["phase"] == "AUTHN" and spec["type"] == "HTTP"
    assert spec["url"].endswith(f"/apisec-filter:{VERSION}") and spec["url"].startswith("oci://")
    # Secrets come from the proxy's environment, never inline.
    names = policy_env(spec["pluginConfig"])
    assert names and sorted(e["name"] for e in spec["vmConfig"]["env"]) == names
    assert all(e.get("valueFrom") == "HOST" and "value" not in e for e in spec["vmConfig"]["env"])
    secret, deployment = manifest_docs(ROOT / "deploy/istio/gateway-secret-env.yaml")
    assert sorted(secret["stringData"]) == names
    (proxy,) = deployment["spec"]["template"]["spec"]["containers"]
    assert proxy["name"] == "istio-proxy" and sorted(e["name"] for e in proxy["env"]) == names
    out = loads_in_envoy(tmp_path, spec["pluginConfig"], names)
    assert out.returncode == 0, out.stderr
    # `make dist` pins the manifest to the image it built.
    (pinned,) = manifest_docs(DIST / "deploy/istio/wasmplugin.yaml")
    digest = (DIST / f"apisec-filter-{VERSION}.oci.digest").read_text().strip()
    assert pinned["spec"].pop("sha256") == digest.split(":", 1)[1]
    assert spec.pop("sha256") == "0" * 64
    assert pinned == plugin
    # the secrets' environment and the guard ship beside it
    for name in ("gateway-secret-env.yaml", "apisec-guard.yaml"):
        assert manifest_docs(DIST / "deploy/istio" / name) == manifest_docs(ROOT / "deploy/istio" / name)


def test_envoy_gateway_extension_policy(tmp_path):
    (policy,) = manifest_docs(ROOT / "deploy/envoy-gateway/envoy-extension-policy.yaml")
    assert policy["kind"] == "EnvoyExtensionPolicy"
    (wasm,) = policy["spec"]["wasm"]
    assert wasm["failOpen"] is False and wasm["rootID"] == "apisec"
    assert wasm["code"]["type"] == "Image" and wasm["code"]["image"]["url"].endswith(f":{VERSION}")
    names = policy_env(wasm["config"])
    assert names and wasm["env"]["hostKeys"] == names
    secret, proxy = manifest_docs(ROOT / "deploy/envoy-gateway/envoy-proxy-secret-env.yaml")
    assert sorted(secret["stringData"]) == names
    env = proxy["spec"]["provider"]["kubernetes"]["envoyDeployment"]["container"]["env"]
    assert sorted(e["name"] for e in env) == names
    out = loads_in_envoy(tmp_path, wasm["config"], names)
    assert out.returncode == 0, out.stderr
    (pinned,) = manifest_docs(DIST / "deploy/envoy-gateway/envoy-extension-policy.yaml")
    digest = (DIST / f"apisec-filter-{VERSION}.oci.digest").read_text().strip()
    assert pinned["spec"]["wasm"][0]["code"]["image"]["sha256"] == digest.split(":", 1)[1]
    for name in ("envoy-proxy-secret-env.yaml", "apisec-guard.yaml"):
        assert manifest_docs(DIST / "deploy/envoy-gateway" / name) == manifest_docs(ROOT / "deploy/envoy-gateway" / name)


def test_manifest_check_refuses_a_broken_policy(tmp_path):
    """The Envoy check above is not a formality: a policy the filter refuses fails it."""
    (plugin,) = manifest_docs(ROOT / "deploy/istio/wasmplugin.yaml")
    broken = dict(plugin["spec"]["pluginConfig"])
    broken["grants"] = [{"id": "g", "app": "nobody", "apis": ["info.research"]}]
    out = loads_in_envoy(tmp_path, broken, policy_env(plugin["spec"]["pluginConfig"]))
    assert out.returncode != 0 and "Unable to create Wasm plugin apisec" in out.stderr


def test_kubernetes_manifests_carry_the_guard():  # LVL-1, ATK-1
    """Issue 21 item 0: the Istio and Envoy Gateway deployments ship the native guard after the
    apisec Wasm filter, the same RBAC entry as envoy/gateway.yaml."""
    guard = gw.gateway_filter("apisec-guard")
    (istio,) = manifest_docs(ROOT / "deploy/istio/apisec-guard.yaml")
    assert istio["kind"] == "EnvoyFilter"
    (patch,) = istio["spec"]["configPatches"]
    assert patch["patch"]["operation"] == "INSERT_BEFORE"
    assert patch["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == "envoy.filters.http.router"
    assert patch["patch"]["value"] == guard
    (plugin,) = manifest_docs(ROOT / "deploy/istio/wasmplugin.yaml")
    assert istio["spec"]["workloadSelector"]["labels"] == plugin["spec"]["selector"]["matchLabels"]
    (eg,) = manifest_docs(ROOT / "deploy/envoy-gateway/apisec-guard.yaml")
    assert eg["kind"] == "EnvoyPatchPolicy"
    (op,) = eg["spec"]["jsonPatches"]
    assert op["operation"]["value"] == guard
    (policy,) = manifest_docs(ROOT / "deploy/envoy-gateway/envoy-extension-policy.yaml")
    assert eg["spec"]["targetRef"]["name"] == policy["spec"]["targetRefs"][0]["name"]
