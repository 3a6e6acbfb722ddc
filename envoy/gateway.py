#!/usr/bin/env python3
"""Run the apisec demo gateway: envoy/gateway.yaml (the checked-in, commented Envoy
configuration) with this run's ports and paths, the filter delivered by ECDS from a watched
file, and the demo upstream.

The same code starts the configuration for `make run`, the end-to-end tests and the
benchmarks, so that what is tested is what users read and run.

    python envoy/gateway.py run [--policy policies/securities.yaml]
    python envoy/gateway.py apply POLICY --build build      # hot reload (ECDS, atomic rename)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import state_store  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ECDS_NAME = "apisec"
ECDS_FILE = "apisec.yaml"

# The checked-in Envoy configuration users read and copy (envoy/*.yaml). `make run`, the tests
# and the benchmarks start these files, with only ports and paths changed (`localize`).
GATEWAY_YAML = ROOT / "envoy/gateway.yaml"
UPSTREAM_TLS_YAML = ROOT / "envoy/gateway-upstream-tls.yaml"
ECDS_YAML = ROOT / "envoy/apisec-ecds.yaml"
# The native build's ECDS resource (Envoy's dynamic modules; libapisec_native.so).
NATIVE_ECDS_YAML = ROOT / "envoy/apisec-native-ecds.yaml"
# Where `cargo build --release` puts libapisec_native.so.
NATIVE_DIR = ROOT / "target/release"
# How Envoy names the native build's stats: `dynamicmodulescustom.apisec.*` in /stats (the Wasm
# build's are `wasmcustom.apisec.*`), `envoy_dynamicmodulescustom_apisec_*` in the Prometheus
# output (the Wasm build's `apisec_*`; monitoring/prometheus.yml relabels the native ones).
NATIVE_STAT_PREFIX = "dynamicmodulescustom."
NATIVE_PROMETHEUS_PREFIX = "envoy_dynamicmodulescustom_"
FILTER_YAML = ROOT / "envoy/apisec-filter.yaml"
# The relative paths the checked-in files use (Envoy resolves them against its working directory).
REL_WASM = "target/wasm32-wasip1/release/apisec_filter.wasm"
REL_CERTS = "build/certs/"
REL_BUILD = "build/"


def load_yaml(path: Path):
    """A checked-in YAML file as plain data; anchors and aliases become independent copies."""
    return json.loads(json.dumps(yaml.safe_load(path.read_text())))


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port nobody listens on, never one this process handed out before: the kernel
    may give a just-closed ephemeral port again, and two listeners of one Envoy (or an Envoy and
    its store) on one port fail to start."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no fresh loopback port after 100 tries")


def apisec_cli() -> Path:
    for p in (ROOT / "target/release/apisec", ROOT / "target/debug/apisec"):
        if p.exists():
            return p
    raise SystemExit("apisec CLI not built: run `make build`")


def policy_to_json(policy_path: Path) -> str:
    """Validates the policy with the same core the filter uses and returns its JSON form."""
    out = subprocess.run(
        [str(apisec_cli()), "policy", "json", str(policy_path)], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise ValueError(out.stderr.strip())
    return out.stdout.strip()


def secret_env_names(policy_json: str) -> list[str]:
    """The environment variables Envoy must hand the VM (`apisec policy env`, the core's own
    list). Text the CLI cannot read names none: the filter itself refuses it."""
    fd, tmp = tempfile.mkstemp(suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(policy_json)
        out = subprocess.run([str(apisec_cli()), "policy", "env", tmp], capture_output=True, text=True)
    finally:
        os.unlink(tmp)
    return out.stdout.split() if out.returncode == 0 else []


def default_native() -> Path | None:
    """The native build's directory when APISEC_BUILD=native (the suite and `make run
    NATIVE=1` run the native build that way), else None: the Wasm build."""
    return NATIVE_DIR if os.environ.get("APISEC_BUILD") == "native" else None


@dataclass
class Layout:
    build: Path
    wasm: Path
    http_port: int = 10000
    https_port: int = 10443
    mtls_port: int = 10444
    # Operators only (ending sessions): mutual TLS with operator certificates, loopback.
    operator_port: int = 10445
    admin_port: int = 9901
    upstream_port: int = 18080
    certs: Path | None = None
    concurrency: int = 1
    extra_listeners: list = field(default_factory=list)
    # Envoy local rate limits per verified app (x-apisec-app): {app: (requests, per_seconds)}.
    app_rate_limits: dict = field(default_factory=dict)
    # The webdis port of the cluster state store, when the policy keeps state there, and the CA
    # its TLS terminator's certificate is checked against (TLS to the store), if any.
    state_port: int | None = None
    state_tls_ca: Path | None = None
    # TLS from the gateway to the backend (envoy/gateway-upstream-tls.yaml, DATA-2).
    backend_tls: bool = False
    # The directory of libapisec_native.so when the gateway runs the native build (Envoy's
    # dynamic modules, envoy/apisec-native-ecds.yaml) instead of the .wasm.
    native: Path | None = field(default_factory=default_native)

    @property
    def ecds_dir(self) -> Path:
        return self.build / "ecds"

    @property
    def ops_log(self) -> Path:
        """The one operations log: where `apisec policy apply --ecds build/ecds/apisec.yaml`
        writes it by default (beside the ECDS file), for `make run`, the tests and an operator."""
        return self.ecds_dir / "operations.log"

    @property
    def audit_log(self) -> Path:
        return self.build / "audit.log"

    @property
    def bootstrap(self) -> Path:
        return self.build / "envoy.yaml"


def localize(doc, layout: "Layout"):
    """A checked-in document with its relative paths turned into this layout's."""
    if isinstance(doc, dict):
        return {k: localize(v, layout) for k, v in doc.items()}
    if isinstance(doc, list):
        return [localize(v, layout) for v in doc]
    if isinstance(doc, str):
        if doc == REL_WASM:
            return str(layout.wasm)
        if doc.startswith(REL_CERTS) and layout.certs is not None:
            return f"{layout.certs}/{doc[len(REL_CERTS):]}"
        if doc.startswith(REL_BUILD):
            return f"{layout.build}/{doc[len(REL_BUILD):]}"
    return doc


def wasm_filter_config(policy_json: str, layout: Layout) -> dict:
    """The filter's typed_config: envoy/apisec-ecds.yaml with this policy and its secret names."""
    config = localize(load_yaml(ECDS_YAML)["resources"][0]["typed_config"], layout)
    config["config"]["configuration"]["value"] = policy_json
    config["config"]["vm_config"]["environment_variables"]["host_env_keys"] = secret_env_names(policy_json)
    return config


def native_filter_config(policy_json: str, layout: Layout) -> dict:
    """The native build's typed_config: envoy/apisec-native-ecds.yaml with this policy."""
    config = localize(load_yaml(NATIVE_ECDS_YAML)["resources"][0]["typed_config"], layout)
    config["filter_config"]["value"] = policy_json
    return config


def filter_config(policy_json: str, layout: Layout) -> dict:
    """The apisec filter's typed_config for this layout's build."""
    if layout.native is not None:
        return native_filter_config(policy_json, layout)
    return wasm_filter_config(policy_json, layout)


def write_ecds(policy_json: str, layout: Layout) -> None:
    """Atomically replaces the ECDS resource (envoy/apisec-ecds.yaml with this policy), bypassing
    `apisec policy apply`: a temp file, then a rename into the watched directory."""
    layout.ecds_dir.mkdir(parents=True, exist_ok=True)
    doc = load_yaml(NATIVE_ECDS_YAML if layout.native is not None else ECDS_YAML)
    doc["version_info"] = str(time.time_ns())
    doc["resources"][0]["typed_config"] = filter_config(policy_json, layout)
    fd, tmp = tempfile.mkstemp(dir=layout.ecds_dir, prefix=".apisec-", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
    os.chmod(tmp, 0o600)
    os.rename(tmp, layout.ecds_dir / ECDS_FILE)


def rate_limit_descriptors(layout: Layout) -> list[dict]:
    """Envoy local rate limits per verified app (the descriptors of the local_ratelimit filter
    that follows apisec in envoy/gateway.yaml)."""
    return [
        {
            "entries": [{"key": "app", "value": app}],
            "token_bucket": {"max_tokens": n, "tokens_per_fill": n, "fill_interval": f"{per}s"},
        }
        for app, (n, per) in sorted(layout.app_rate_limits.items())
    ]


def apply_policy(policy_json: str, layout: Layout, actor: str, source: str, wait: bool = True) -> dict:
    """Applies a policy the documented way, `apisec policy apply`: validated by the core code,
    written into the ECDS file atomically, and (with `wait`, when Envoy runs) confirmed loaded
    or rejected by Envoy; the outcome and every change go to the operations log. Returns that
    log record."""
    fd, tmp = tempfile.mkstemp(dir=layout.build, prefix=".policy-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        f.write(policy_json)
    args = [str(apisec_cli()), "policy", "apply", tmp, "--ecds", str(layout.ecds_dir / ECDS_FILE),
            "--actor", actor, "--source", source, "--envoy-log", str(layout.build / "envoy.log")]
    if wait:
        args += ["--admin", f"127.0.0.1:{layout.admin_port}"]
    env_file = layout.build / "demo.env"
    if env_file.exists():
        args += ["--env-file", str(env_file)]
    try:
        out = subprocess.run(args, capture_output=True, text=True)
    finally:
        os.unlink(tmp)
    if out.returncode != 0:
        raise PolicyRejected(out.stderr.strip() or out.stdout.strip())
    return json.loads(layout.ops_log.read_text().splitlines()[-1])


class PolicyRejected(RuntimeError):
    """`apisec policy apply` did not get the policy loaded (invalid, or Envoy refused it)."""


def _hcm(listener: dict) -> dict:
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def gateway_template(layout: Layout) -> dict:
    """envoy/gateway.yaml (or its upstream TLS variant) with this layout's ports and paths."""
    doc = localize(load_yaml(UPSTREAM_TLS_YAML if layout.backend_tls else GATEWAY_YAML), layout)
    doc["admin"]["address"]["socket_address"]["port_value"] = layout.admin_port
    ports = {"http": layout.http_port, "https": layout.https_port, "mtls": layout.mtls_port,
             "operator": layout.operator_port}
    listeners = doc["static_resources"]["listeners"]
    for lst in listeners:
        lst["address"]["socket_address"]["port_value"] = ports[lst["name"]]
    if layout.certs is None:
        listeners[:] = [lst for lst in listeners if lst["name"] == "http"]
    backend = doc["static_resources"]["clusters"][0]
    backend["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"][
        "port_value"] = layout.upstream_port
    return doc


def gateway_filter(name: str) -> dict:
    """One HTTP filter entry of envoy/gateway.yaml, by name."""
    filters = _hcm(load_yaml(GATEWAY_YAML)["static_resources"]["listeners"][0])["http_filters"]
    return next(f for f in filters if f["name"] == name)


def apisec_filter() -> dict:
    """The apisec filter entry of envoy/gateway.yaml (delivered by ECDS from the watched file)."""
    return gateway_filter("apisec")


ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}


def listener(name: str, port: int, layout: Layout, tls: bool, http_filters: list[dict]) -> dict:
    """A listener of envoy/gateway.yaml (the TLS one, or the plain one) under another name and
    port, with other HTTP filters: the benchmark's variants."""
    doc = gateway_template(layout)
    lst = next(x for x in doc["static_resources"]["listeners"] if x["name"] == ("https" if tls else "http"))
    lst["name"] = name
    lst["address"]["socket_address"]["port_value"] = port
    _hcm(lst)["stat_prefix"] = name
    _hcm(lst)["http_filters"] = localize(http_filters, layout)
    return lst


def render(policy_json: str, layout: Layout) -> Path:
    """Writes the ECDS resource (through `apisec policy apply`, as an operator would) and the
    bootstrap: envoy/gateway.yaml with this layout's ports and paths, plus what a test asks for
    (per-app rate limits, extra listeners, the cluster state store)."""
    layout.build.mkdir(parents=True, exist_ok=True)
    write_ecds(policy_json, layout)
    apply_policy(policy_json, layout, actor=os.environ.get("USER", "operator"), source="startup", wait=False)
    bootstrap = gateway_template(layout)
    descriptors = rate_limit_descriptors(layout)
    for lst in bootstrap["static_resources"]["listeners"]:
        for f in _hcm(lst)["http_filters"]:
            if f["name"] == "envoy.filters.http.local_ratelimit":
                f["typed_config"]["descriptors"] = descriptors
    bootstrap["static_resources"]["listeners"].extend(layout.extra_listeners)
    if layout.state_port is not None:
        bootstrap["static_resources"]["clusters"].append(
            state_store.state_cluster(layout.state_port, layout.state_tls_ca))
    layout.bootstrap.write_text(json.dumps(bootstrap, indent=1))
    return layout.bootstrap


def envoy_binary() -> str:
    venv = ROOT / ".venv/bin/envoy"
    if venv.exists():
        return str(venv)
    found = shutil.which("envoy")
    if not found:
        raise SystemExit("envoy not found: run `make setup`")
    return found


class Gateway:
    """A running Envoy (and the demo upstream) for one layout."""

    def __init__(self, layout: Layout, env: dict[str, str] | None = None, upstream: bool = True,
                 upstream_cert: str = "backend", memory_limit: int | None = None, log_path: bool = False):
        self.layout = layout
        # Envoy writes its own log with `--log-path` (reopened by the admin's /reopen_logs, so
        # logrotate can rename it; deploy/logging) instead of to stderr.
        self.log_path = log_path
        # An address-space limit (bytes) for Envoy, as `ulimit -v` sets it: the guard's test
        # starts Envoy where a worker's Wasm VM cannot be created.
        self.memory_limit = memory_limit
        # With TLS to the backend: the certificate (in layout.certs) the demo upstream serves.
        self.upstream_cert = upstream_cert
        self.env = {**os.environ, **(env or {})}
        if layout.native is not None:
            self.env["ENVOY_DYNAMIC_MODULES_SEARCH_PATH"] = str(layout.native)
        self.with_upstream = upstream
        self.envoy: subprocess.Popen | None = None
        self.upstream: subprocess.Popen | None = None
        self.envoy_log = layout.build / "envoy.log"

    def start(self, timeout: float = 60.0) -> "Gateway":
        if self.with_upstream:
            cmd = [sys.executable, str(ROOT / "envoy/demo_upstream.py"), "--port", str(self.layout.upstream_port)]
            if self.layout.backend_tls and self.layout.certs is not None:
                c = self.layout.certs
                cmd += ["--tls-cert", str(c / f"{self.upstream_cert}.pem"), "--tls-key", str(c / f"{self.upstream_cert}.key"),
                        "--client-ca", str(c / "backend-ca.pem")]
            self.upstream = subprocess.Popen(
                cmd,
                stdout=subprocess.DEVNULL,
                stderr=open(self.layout.build / "upstream.log", "a"),
            )
        self.envoy = subprocess.Popen(
            [
                envoy_binary(),
                "-c", str(self.layout.bootstrap),
                "--concurrency", str(self.layout.concurrency),
                "--base-id", str(self.layout.admin_port),
                # Audit records reach the disk within a second (Envoy's default is 10 s).
                "--file-flush-interval-msec", "1000",
                "--component-log-level", "wasm:info,dynamic_modules:info",
                "--log-level", "warning",
                *(["--log-path", str(self.envoy_log)] if self.log_path else []),
            ],
            env=self.env,
            stdout=subprocess.DEVNULL,
            # appended, never truncated: it holds the audit chain's checkpoints
            stderr=open(self.envoy_log, "a"),
            preexec_fn=self._limit if self.memory_limit else None,
        )
        self.wait_ready(timeout)
        return self

    def _limit(self) -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (self.memory_limit, self.memory_limit))

    def admin(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.layout.admin_port}{path}", timeout=5) as r:
            return r.read().decode()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.envoy is not None and self.envoy.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.envoy.returncode}:\n{self.log_tail()}")
            try:
                if self.admin("/ready").strip() == "LIVE":
                    if self.with_upstream:
                        with socket.create_connection(("127.0.0.1", self.layout.upstream_port), timeout=1):
                            pass
                    # the admin port that answered is this Envoy's, not another one's
                    time.sleep(0.2)
                    if self.envoy is not None and self.envoy.poll() is not None:
                        raise RuntimeError(f"envoy exited with {self.envoy.returncode}:\n{self.log_tail()}")
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"envoy not ready after {timeout}s:\n{self.log_tail()}")

    def stat(self, name: str) -> int:
        """A stat from /stats, by the Wasm build's name (the native build's is found by it)."""
        if self.layout.native is not None and name.startswith("wasmcustom."):
            name = NATIVE_STAT_PREFIX + name.removeprefix("wasmcustom.")
        for line in self.admin(f"/stats?filter=^{name}$").splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return 0

    def log_tail(self, n: int = 80) -> str:
        try:
            return "\n".join(self.envoy_log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no envoy log)"

    def stop(self) -> None:
        for p in (self.envoy, self.upstream):
            state_store.stop(p)


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if "=" in line and not line.startswith("#"):
                k, v = line.split("=", 1)
                env[k.strip()] = v.strip()
    return env


DEMO_MAC = "AA-BB-CC-DD-EE-01"


def session_commands(layout: Layout, secret_env: str) -> list[str]:
    """The session walk-through `make run` prints (and tests/test_demo.py runs line by line): run
    from the checkout, it establishes a session, logs the user in with two factors, calls an S2
    and an S3 API on it, logs out, and shows the session refused afterwards."""
    cli = apisec_cli().relative_to(ROOT)
    https = f"https://127.0.0.1:{layout.https_port}"
    mtls = f"https://127.0.0.1:{layout.mtls_port}"
    certs = "build/certs"
    hmac = f"{cli} sign --app demo-partner --keyid demo-partner-hmac --secret-env {secret_env}"
    p256 = f"{cli} sign --app demo-partner --keyid demo-partner-p256 --key policies/demo-keys/demo-partner.key.pem"
    on = f'--session "$SID" --mac {DEMO_MAC}'
    balance = (f"  curl -sS --cacert {certs}/ca.pem --cert {certs}/client-demo-partner.pem "
               f"--key {certs}/client-demo-partner.key {mtls}/api/v1/accounts/8800123/balance "
               f"-H 'x-app-id: demo-partner' -H \"x-session-id: $SID\" -H 'x-device-mac: {DEMO_MAC}'")
    return [
        "  # establish (S1, signed with the app's secret); the gateway answers it itself",
        f"  SID=$(eval \"$({hmac} --url {https}/apisec/v1/sessions "
        f"--data '{{\"caller_code\":\"demo-partner\",\"mac\":\"{DEMO_MAC}\"}}')\" "
        "| python3 -c 'import json,sys; print(json.load(sys.stdin)[\"session_id\"])'); echo \"session $SID\"",
        "  # the user logs in through the firm's login API (S2, key pair); the demo login service",
        "  # reports 'user=u-demo; factors=2' in x-apisec-login, which the gateway records and strips",
        f"  eval \"$({p256} --method POST --url {https}/api/v1/users/login {on})\"",
        "  # S2 account balance with the app's client certificate; x-apisec-user: u-demo goes upstream,",
        "  # and the grant hides id_number and mobile from the answer",
        balance,
        "  # S3: place an order with a key-pair signature; content-digest binds the body",
        f"  eval \"$({p256} --url {https}/api/v1/orders {on} "
        "--data '{\"symbol\":\"600000\",\"side\":\"buy\",\"qty\":100}')\"",
        "  # log out (SES-3); the same call is then refused 401 session_invalid",
        f"  eval \"$({hmac} --method DELETE --url {https}/apisec/v1/sessions {on})\"",
        balance,
    ]


def operator_command(layout: Layout) -> str:
    """An operator ends every session of the demo app (printed by `make run`, run by test_demo.py)."""
    cli = apisec_cli().relative_to(ROOT)
    certs = "build/certs"
    return (f"  {cli} sessions end --url https://localhost:{layout.operator_port} "
            f"--cert {certs}/operator-alice.pem --key {certs}/operator-alice.key --ca {certs}/ca.pem --app demo-partner")


def example_commands(layout: Layout, env: dict[str, str]) -> str:
    cli = apisec_cli().relative_to(ROOT)
    http = f"http://127.0.0.1:{layout.http_port}"
    https = f"https://127.0.0.1:{layout.https_port}"
    mtls = f"https://127.0.0.1:{layout.mtls_port}"
    secret = env.get("APISEC_DEMO_PARTNER_SECRET", "")
    certs = "build/certs"
    lines = [
        "",
        "apisec demo gateway is up.",
        f"  http  {http}   https {https}   mTLS {mtls}   (CA: {certs}/ca.pem)",
        f"  admin http://127.0.0.1:{layout.admin_port}    audit log: {layout.audit_log}",
        "",
        "S0 (market data) needs only a known App_ID, over plain HTTP or TLS:",
        f"  curl -sS {http}/api/v1/market/quotes/600000 -H 'x-app-id: demo-partner'",
        "",
        "S1 (licensed research) needs TLS and an RFC 9421 signature with the app's secret:",
        f"  export APISEC_DEMO_PARTNER_SECRET={secret}",
        f"  eval \"$({cli} sign --app demo-partner --keyid demo-partner-hmac "
        f"--secret-env APISEC_DEMO_PARTNER_SECRET --url {https}/api/v1/info/research/r-2026-001)\"",
        "",
        "S2 (accounts) and S3 (trading) APIs are user-bound (ID-4): they need a session (SES-1) on",
        "which the user logged in with two factors. Paste this block as a whole:",
        *session_commands(layout, secret_env="APISEC_DEMO_PARTNER_SECRET"),
        "",
        "An operator ends every session of an app at once (SES-4, OPS-6), on the loopback operator",
        "listener, with an operator certificate:",
        operator_command(layout),
        "",
        "Drop the eval to print the request instead of sending it. Change one byte and the gateway",
        "answers 401 {\"error\":\"signature_invalid\"} (digest_mismatch for the body); send it twice",
        "and the second gets 401 {\"error\":\"nonce_replayed\"}; send S1 over plain HTTP and get",
        "403 {\"error\":\"tls_required\"}.",
        "",
        "Why a request is refused, offline (add --format json to apisec sign, save it, then):",
        f"  {cli} verify policies/securities.yaml request.json --env-file build/demo.env",
        "What the standard requires per API and what this gateway provides (for auditors):",
        f"  {cli} compliance policies/securities.yaml --deployment envoy/gateway.yaml --ecds {layout.ecds_dir / ECDS_FILE}",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="render and run the demo gateway in the foreground")
    run.add_argument("--policy", default=str(ROOT / "policies/securities.yaml"))
    run.add_argument("--build", default=str(ROOT / "build"))
    run.add_argument("--wasm", default=str(ROOT / "target/wasm32-wasip1/release/apisec_filter.wasm"))
    for name, default in DEMO_PORTS.items():
        run.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    runc = sub.add_parser("run-cluster", help="start the cluster state store and two gateway instances sharing it")
    runc.add_argument("--policy", default=str(ROOT / "policies/securities.yaml"))
    runc.add_argument("--build", default=str(ROOT / "build"))
    runc.add_argument("--wasm", default=str(ROOT / "target/wasm32-wasip1/release/apisec_filter.wasm"))
    apply_ = sub.add_parser("apply", help="validate a policy and hot-reload it into the running gateway")
    apply_.add_argument("policy")
    apply_.add_argument("--actor", default=os.environ.get("USER", "operator"), help="who makes the change (operations log)")
    apply_.add_argument("--build", default=str(ROOT / "build"))
    apply_.add_argument("--wasm", default=str(ROOT / "target/wasm32-wasip1/release/apisec_filter.wasm"))
    args = ap.parse_args()

    build = Path(args.build).resolve()
    ports = {k: getattr(args, k) for k in DEMO_PORTS} if args.cmd == "run" else {}
    # a second demo in another build directory shares the first one's certificates and secrets
    assets = build if (build / "certs").exists() else ROOT / "build"
    layout = Layout(build=build, wasm=Path(args.wasm).resolve(), certs=assets / "certs", **ports)
    try:
        policy_json = policy_to_json(Path(args.policy))
    except ValueError as e:
        print(f"policy refused: {e}", file=sys.stderr)
        return 2
    if args.cmd == "apply":
        # The same as `apisec policy apply POLICY --ecds build/ecds/apisec.yaml --admin 127.0.0.1:9901`.
        try:
            record = apply_policy(policy_json, layout, actor=args.actor, source=str(args.policy))
        except PolicyRejected as e:
            print(e, file=sys.stderr)
            return 1
        print(f"applied {args.policy}: Envoy loaded it; {len(record['changes'])} change(s) logged to "
              f"{layout.ops_log}")
        return 0

    env = read_env_file(assets / "demo.env")
    missing = [k for k in secret_env_names(policy_json) if k not in env and k not in os.environ]
    if missing:
        print(f"policy needs these secrets in the environment: {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.cmd == "run-cluster":
        return run_cluster(policy_json, layout, env)
    # Before anything is written: another run's files, logs and ports are left alone.
    busy = busy_ports(layout)
    if busy:
        for port, holder in busy:
            print(f"port {port} is in use by {holder}", file=sys.stderr)
        print("another gateway (or program) holds the demo's ports; stop it, or choose others, e.g. "
              "make run HTTP_PORT=20000 HTTPS_PORT=20443 MTLS_PORT=20444 OPERATOR_PORT=20445 "
              "ADMIN_PORT=19901 UPSTREAM_PORT=28080 BUILD=build-2", file=sys.stderr)
        return 1
    lock = claim(layout.build)
    if lock is None:
        return 1
    render(policy_json, layout)
    gw = Gateway(layout, env=env)
    try:
        gw.start()
    except RuntimeError as e:
        print(e, file=sys.stderr)
        gw.stop()
        return 1
    print(example_commands(layout, {**os.environ, **env}), flush=True)
    return serve([gw])


# `make run`'s ports (make variables HTTP_PORT, HTTPS_PORT, ... pass others).
DEMO_PORTS = {"http_port": 10000, "https_port": 10443, "mtls_port": 10444, "operator_port": 10445,
              "admin_port": 9901, "upstream_port": 18080}


def port_holder(port: int) -> str:
    """Who listens on a loopback TCP port, from /proc (the process and its pid), if it can tell."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f[9])
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            for fd in (pid_dir / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    cmd = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                    return f"pid {pid_dir.name} ({cmd[:120]})"
        except OSError:
            continue
    return "another process"


def busy_ports(layout: Layout) -> list[tuple[int, str]]:
    """The layout's ports something already listens on, each with who holds it."""
    busy = []
    for port in (layout.http_port, layout.https_port, layout.mtls_port, layout.operator_port,
                 layout.admin_port, layout.upstream_port):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                busy.append((port, port_holder(port)))
    return busy


def claim(build: Path):
    """One run per build directory: a lock file naming the running pid. Returns the lock's path,
    or None (after saying who holds it) when a live run has it."""
    build.mkdir(parents=True, exist_ok=True)
    lock = build / ".run.pid"
    try:
        other = int(lock.read_text().strip())
    except (OSError, ValueError):
        other = None
    if other and other != os.getpid() and Path(f"/proc/{other}").exists():
        print(f"{build} is in use by a running gateway (pid {other}); its logs are left alone", file=sys.stderr)
        return None
    lock.write_text(str(os.getpid()))
    return lock


def serve(gateways: list[Gateway], store: state_store.StateStore | None = None) -> int:
    """Runs until SIGINT/SIGTERM or until an Envoy exits, then stops everything."""
    stop = {"now": False}

    def on_signal(*_):
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        while not stop["now"] and all(g.envoy is not None and g.envoy.poll() is None for g in gateways):
            time.sleep(0.5)
    finally:
        for g in gateways:
            g.stop()
        if store is not None:
            store.stop()
    failed = False
    for g in gateways:
        if g.envoy is not None and g.envoy.returncode not in (0, -signal.SIGTERM, None):
            print(f"envoy exited with {g.envoy.returncode}:\n{g.log_tail()}", file=sys.stderr)
            failed = True
    return 1 if failed or not stop["now"] else 0


# `make run-cluster`: documented ports (docs/operators.md "State: local or cluster").
CLUSTER_REDIS_PORT = 16379
CLUSTER_WEBDIS_PORT = 17379


def run_cluster(policy_json: str, layout: Layout, env: dict[str, str]) -> int:
    """The store (Redis + webdis) and two gateway instances sharing it, on documented ports."""
    doc = state_store.with_cluster_state(json.loads(policy_json))
    store = state_store.StateStore(layout.build / "state-store", CLUSTER_REDIS_PORT, CLUSTER_WEBDIS_PORT)
    layouts = [
        Layout(build=layout.build / "cluster-a", wasm=layout.wasm, certs=layout.certs, state_port=CLUSTER_WEBDIS_PORT),
        Layout(build=layout.build / "cluster-b", wasm=layout.wasm, certs=layout.certs, state_port=CLUSTER_WEBDIS_PORT,
               http_port=11000, https_port=11443, mtls_port=11444, operator_port=11445, admin_port=9902,
               upstream_port=18081),
    ]
    gateways = []
    try:
        store.start()
        for lay in layouts:
            render(json.dumps(doc), lay)
            gateways.append(Gateway(lay, env=env).start())
    except RuntimeError as e:
        print(e, file=sys.stderr)
        for g in gateways:
            g.stop()
        store.stop()
        return 1
    a, b = layouts
    cli = apisec_cli().relative_to(ROOT)
    print(example_commands(a, {**os.environ, **env}), flush=True)
    print("\n".join([
        "Cluster state: both instances keep nonces, grant uses, refusal counters and bans in one",
        f"Redis (port {CLUSTER_REDIS_PORT}, append-only file, fsync always) behind webdis (port {CLUSTER_WEBDIS_PORT}).",
        f"  instance A: http {a.http_port}  https {a.https_port}  mTLS {a.mtls_port}  admin {a.admin_port}",
        f"  instance B: http {b.http_port}  https {b.https_port}  mTLS {b.mtls_port}  admin {b.admin_port}",
        "",
        "A replay to the other instance is refused (both serve one name, as behind a load balancer):",
        f"  req=\"$({cli} sign --app demo-partner --keyid demo-partner-hmac --secret-env APISEC_DEMO_PARTNER_SECRET "
        f"--url https://127.0.0.1:{a.https_port}/api/v1/info/research/r-2026-001)\"",
        "  eval \"$req\"                                                  # instance A: 200",
        f"  eval \"$req --connect-to 127.0.0.1:{a.https_port}:127.0.0.1:{b.https_port}\"    # instance B: 401 nonce_replayed",
        "",
        "Sessions hold on every instance: after the session block above (before its logout), the",
        "S2 call on instance B's mTLS listener serves the session established and logged in on A:",
        f"  curl -sS --cacert build/certs/ca.pem --cert build/certs/client-demo-partner.pem "
        f"--key build/certs/client-demo-partner.key https://127.0.0.1:{b.mtls_port}/api/v1/accounts/8800123/balance "
        f"-H 'x-app-id: demo-partner' -H \"x-session-id: $SID\" -H 'x-device-mac: {DEMO_MAC}'",
        "",
    ]), flush=True)
    return serve(gateways, store)


if __name__ == "__main__":
    sys.exit(main())
