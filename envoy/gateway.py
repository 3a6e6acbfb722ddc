#!/usr/bin/env python3
"""Render and run the apisec demo gateway: one Envoy, the apisec filter delivered by ECDS from
a watched file, a plain HTTP listener, a TLS listener, the admin port, and the demo upstream.

The same code renders the configuration for `make run`, the end-to-end tests and the
benchmarks, so that what is tested is what runs.

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import state_store  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ECDS_NAME = "apisec"
ECDS_FILE = "apisec.yaml"
VM_ID = "apisec.v1"

# Audit record per request (LOG-4): the filter's record from filter state plus what only
# Envoy knows at the end of the stream (final status, duration, upstream host).
ACCESS_LOG_FORMAT = {
    "audit": "%FILTER_STATE(wasm.apisec_audit:PLAIN)%",
    "status": "%RESPONSE_CODE%",
    "details": "%RESPONSE_CODE_DETAILS%",
    # Requests Envoy refused or ended itself (codec errors: DPE; client gone: DC; request
    # timeout) carry no apisec record; their flags make them visible.
    "flags": "%RESPONSE_FLAGS%",
    "duration_ms": "%DURATION%",
    "upstream": "%UPSTREAM_HOST%",
    "client": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "start": "%START_TIME%",
}

# TLS 1.2+ with forward-secret AEAD suites only (DATA-1, DATA-2).
TLS_PARAMS = {
    "tls_minimum_protocol_version": "TLSv1_2",
    "tls_maximum_protocol_version": "TLSv1_3",
    "cipher_suites": [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ],
    "ecdh_curves": ["X25519", "P-256"],
}


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
    """The environment variables Envoy must hand the VM. Unparseable text names none: the filter
    itself refuses it."""
    try:
        doc = json.loads(policy_json)
    except ValueError:
        return []
    if not isinstance(doc, dict):
        return []
    names = {c["secret_env"] for a in doc.get("apps", []) for c in a.get("credentials", []) if c.get("secret_env")}
    cluster = (doc.get("state") or {}).get("cluster") or {}
    if cluster.get("credentials_env"):
        names.add(cluster["credentials_env"])
    return sorted(names)


@dataclass
class Layout:
    build: Path
    wasm: Path
    http_port: int = 10000
    https_port: int = 10443
    mtls_port: int = 10444
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

    @property
    def ecds_dir(self) -> Path:
        return self.build / "ecds"

    @property
    def audit_log(self) -> Path:
        return self.build / "audit.log"

    @property
    def bootstrap(self) -> Path:
        return self.build / "envoy.yaml"


def wasm_filter_config(policy_json: str, layout: Layout) -> dict:
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
        "config": {
            "name": "apisec",
            "root_id": "apisec",
            "vm_config": {
                # A unique vm_id: shared data (replay cache) is per vm_id and survives reloads.
                "vm_id": VM_ID,
                "runtime": "envoy.wasm.runtime.v8",
                "code": {"local": {"filename": str(layout.wasm)}},
                # Secrets reach the VM from Envoy's environment, never from a config file.
                "environment_variables": {"host_env_keys": secret_env_names(policy_json)},
            },
            "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": policy_json},
            # A filter that cannot run refuses; never FAIL_OPEN for a security filter.
            "failure_policy": "FAIL_CLOSED",
            # Hold headers while the body is read and verified before anything goes upstream.
            "allow_on_headers_stop_iteration": True,
        },
    }


def write_ecds(policy_json: str, layout: Layout) -> None:
    """Atomically replaces the ECDS resource: write a temp file, then rename into the watched dir."""
    layout.ecds_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "version_info": str(time.time_ns()),
        "resources": [
            {
                "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
                "name": ECDS_NAME,
                "typed_config": wasm_filter_config(policy_json, layout),
            }
        ],
    }
    fd, tmp = tempfile.mkstemp(dir=layout.ecds_dir, prefix=".apisec-", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
    os.chmod(tmp, 0o600)
    os.rename(tmp, layout.ecds_dir / ECDS_FILE)


def local_rate_limit(layout: Layout) -> dict:
    """Envoy's own local rate limiter, after apisec so it sees the verified app. Its 429s come
    back through apisec, which audits them and counts them toward automatic bans (RL-3)."""
    descriptors = [
        {
            "entries": [{"key": "app", "value": app}],
            "token_bucket": {"max_tokens": n, "tokens_per_fill": n, "fill_interval": f"{per}s"},
        }
        for app, (n, per) in sorted(layout.app_rate_limits.items())
    ]
    return {
        "name": "envoy.filters.http.local_ratelimit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            "stat_prefix": "apisec_local_rl",
            # The default bucket is a process-wide ceiling; per-app buckets are the descriptors.
            "token_bucket": {"max_tokens": 100000, "tokens_per_fill": 100000, "fill_interval": "1s"},
            "filter_enabled": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}, "runtime_key": "apisec_rl_enabled"},
            "filter_enforced": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}, "runtime_key": "apisec_rl_enforced"},
            "descriptors": descriptors,
        },
    }


def apply_policy(policy_json: str, layout: Layout, actor: str, source: str, wait: bool = True) -> dict:
    """Applies a policy the documented way, `apisec policy apply`: validated by the core code,
    written into the ECDS file atomically, and (with `wait`, when Envoy runs) confirmed loaded
    or rejected by Envoy; the outcome and every change go to the operations log. Returns that
    log record."""
    fd, tmp = tempfile.mkstemp(dir=layout.build, prefix=".policy-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        f.write(policy_json)
    args = [str(apisec_cli()), "policy", "apply", tmp, "--ecds", str(layout.ecds_dir / ECDS_FILE),
            "--actor", actor, "--source", source, "--ops-log", str(layout.build / "operations.log")]
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
    return json.loads((layout.build / "operations.log").read_text().splitlines()[-1])


class PolicyRejected(RuntimeError):
    """`apisec policy apply` did not get the policy loaded (invalid, or Envoy refused it)."""


def apisec_filter() -> dict:
    """The apisec filter, delivered by ECDS from the watched file."""
    return {
        "name": ECDS_NAME,
        "config_discovery": {
            "config_source": {
                "resource_api_version": "V3",
                "path_config_source": {
                    "path": "{ecds_file}",
                    "watched_directory": {"path": "{ecds_dir}"},
                },
            },
            "type_urls": ["type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"],
        },
    }


ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}


def default_filters(layout: Layout) -> list[dict]:
    return [apisec_filter(), local_rate_limit(layout), ROUTER]


def hcm(stat_prefix: str, layout: Layout, http_filters: list[dict] | None = None) -> dict:
    filters = json.loads(
        json.dumps(http_filters if http_filters is not None else default_filters(layout))
        .replace("{ecds_file}", str(layout.ecds_dir / ECDS_FILE))
        .replace("{ecds_dir}", str(layout.ecds_dir))
    )
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix,
            # The filter matches APIs on the path Envoy normalised (DESIGN.md).
            "normalize_path": True,
            "merge_slashes": True,
            "path_with_escaped_slashes_action": "REJECT_REQUEST",
            # Client IP is the connection peer; X-Forwarded-For from clients is not trusted.
            "use_remote_address": True,
            "xff_num_trusted_hops": 0,
            "request_headers_timeout": "10s",
            "stream_idle_timeout": "30s",
            # The whole request, body included, within the policy's max_body_seconds (30 s by
            # default): a slow body cannot hold a worker's memory for longer.
            "request_timeout": "30s",
            # One connection cannot multiplex an unbounded number of held bodies.
            "http2_protocol_options": {"max_concurrent_streams": 100},
            "common_http_protocol_options": {"headers_with_underscores_action": "REJECT_REQUEST"},
            "access_log": [
                {
                    "name": "envoy.access_loggers.file",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                        "path": str(layout.audit_log),
                        "log_format": {"json_format": ACCESS_LOG_FORMAT},
                    },
                }
            ],
            "route_config": {
                "name": "apis",
                "virtual_hosts": [
                    {
                        "name": "apis",
                        "domains": ["*"],
                        "routes": [
                            {
                                "match": {"prefix": "/"},
                                "route": {
                                    "cluster": "backend",
                                    "timeout": "30s",
                                    # Descriptors from the verified identity the filter sets (RL-2).
                                    "rate_limits": [
                                        {"actions": [{"request_headers": {"header_name": "x-apisec-app", "descriptor_key": "app"}}]}
                                    ],
                                },
                            }
                        ],
                    }
                ],
            },
            "http_filters": filters,
        },
    }


def listener(name: str, port: int, layout: Layout, tls: bool, mtls: bool = False,
             http_filters: list[dict] | None = None) -> dict:
    chain: dict = {"filters": [hcm(name, layout, http_filters)]}
    if tls:
        assert layout.certs is not None
        tls_context: dict = {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        }
        if mtls:
            # Mutual TLS (ID-3): only certificates from the configured client CA complete the
            # handshake; the filter then binds the certificate to an app.
            tls_context["require_client_certificate"] = True
        chain["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                **tls_context,
                "common_tls_context": {
                    "tls_params": TLS_PARAMS,
                    "tls_certificates": [
                        {
                            "certificate_chain": {"filename": str(layout.certs / "server.pem")},
                            "private_key": {"filename": str(layout.certs / "server.key")},
                        }
                    ],
                    "alpn_protocols": ["h2", "http/1.1"],
                    **(
                        {"validation_context": {"trusted_ca": {"filename": str(layout.certs / "ca.pem")}}}
                        if mtls
                        else {}
                    ),
                },
            },
        }
    out = {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        # Above the policy's max_body_bytes ceiling, so the filter (not Envoy) decides and audits.
        "per_connection_buffer_limit_bytes": 17 * 1024 * 1024,
        "filter_chains": [chain],
    }
    if tls:
        # Handshake deadline against slow-handshake floods (DATA-1).
        out["listener_filters_timeout"] = "5s"
        chain["transport_socket_connect_timeout"] = "5s"
    return out


def render(policy_json: str, layout: Layout) -> Path:
    layout.build.mkdir(parents=True, exist_ok=True)
    write_ecds(policy_json, layout)
    apply_policy(policy_json, layout, actor=os.environ.get("USER", "operator"), source="startup", wait=False)
    listeners = [listener("http", layout.http_port, layout, tls=False)]
    if layout.certs is not None:
        listeners.append(listener("https", layout.https_port, layout, tls=True))
        listeners.append(listener("mtls", layout.mtls_port, layout, tls=True, mtls=True))
    listeners.extend(layout.extra_listeners)
    bootstrap = {
        "node": {"id": "apisec-gateway", "cluster": "apisec"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": layout.admin_port}}},
        "static_resources": {
            "listeners": listeners,
            "clusters": [
                {
                    "name": "backend",
                    "type": "STATIC",
                    "connect_timeout": "2s",
                    "load_assignment": {
                        "cluster_name": "backend",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {"address": "127.0.0.1", "port_value": layout.upstream_port}
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
        },
    }
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

    def __init__(self, layout: Layout, env: dict[str, str] | None = None, upstream: bool = True):
        self.layout = layout
        self.env = {**os.environ, **(env or {})}
        self.with_upstream = upstream
        self.envoy: subprocess.Popen | None = None
        self.upstream: subprocess.Popen | None = None
        self.envoy_log = layout.build / "envoy.log"

    def start(self, timeout: float = 60.0) -> "Gateway":
        if self.with_upstream:
            self.upstream = subprocess.Popen(
                [sys.executable, str(ROOT / "envoy/demo_upstream.py"), "--port", str(self.layout.upstream_port)],
                stdout=subprocess.DEVNULL,
                stderr=open(self.layout.build / "upstream.log", "w"),
            )
        self.envoy = subprocess.Popen(
            [
                envoy_binary(),
                "-c", str(self.layout.bootstrap),
                "--concurrency", str(self.layout.concurrency),
                "--base-id", str(self.layout.admin_port),
                # Audit records reach the disk within a second (Envoy's default is 10 s).
                "--file-flush-interval-msec", "1000",
                "--component-log-level", "wasm:info",
                "--log-level", "warning",
            ],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=open(self.envoy_log, "w"),
        )
        self.wait_ready(timeout)
        return self

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
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"envoy not ready after {timeout}s:\n{self.log_tail()}")

    def stat(self, name: str) -> int:
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
        "S2 (account balance) with the app's client certificate on the mTLS listener; the grant",
        "hides id_number and mobile from the response:",
        f"  curl -sS --cacert {certs}/ca.pem --cert {certs}/client-demo-partner.pem --key {certs}/client-demo-partner.key \\",
        f"    {mtls}/api/v1/accounts/8800123/balance -H 'x-app-id: demo-partner'",
        "",
        "S3 (place an order) needs the app's key-pair signature; the body is bound by content-digest:",
        f"  eval \"$({cli} sign --app demo-partner --keyid demo-partner-p256 "
        f"--key policies/demo-keys/demo-partner.key.pem --url {https}/api/v1/orders "
        "--data '{\\\"symbol\\\":\\\"600000\\\",\\\"side\\\":\\\"buy\\\",\\\"qty\\\":100}')\"",
        "",
        "Drop the eval to print the request instead of sending it. Change one byte and the gateway",
        "answers 401 {\"error\":\"signature_invalid\"} (digest_mismatch for the body); send it twice",
        "and the second gets 401 {\"error\":\"nonce_replayed\"}; send S1 over plain HTTP and get",
        "403 {\"error\":\"tls_required\"}.",
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
    layout = Layout(build=build, wasm=Path(args.wasm).resolve(), certs=build / "certs")
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
              f"{layout.build / 'operations.log'}")
        return 0

    env = read_env_file(build / "demo.env")
    missing = [k for k in secret_env_names(policy_json) if k not in env and k not in os.environ]
    if missing:
        print(f"policy needs these secrets in the environment: {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.cmd == "run-cluster":
        return run_cluster(policy_json, layout, env)
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
    for g in gateways:
        if g.envoy is not None and g.envoy.returncode not in (0, -signal.SIGTERM, None):
            print(g.log_tail(), file=sys.stderr)
    return 0


# `make run-cluster`: documented ports (README "Cluster state").
CLUSTER_REDIS_PORT = 16379
CLUSTER_WEBDIS_PORT = 17379


def run_cluster(policy_json: str, layout: Layout, env: dict[str, str]) -> int:
    """The store (Redis + webdis) and two gateway instances sharing it, on documented ports."""
    doc = state_store.with_cluster_state(json.loads(policy_json))
    store = state_store.StateStore(layout.build / "state-store", CLUSTER_REDIS_PORT, CLUSTER_WEBDIS_PORT)
    layouts = [
        Layout(build=layout.build / "cluster-a", wasm=layout.wasm, certs=layout.certs, state_port=CLUSTER_WEBDIS_PORT),
        Layout(build=layout.build / "cluster-b", wasm=layout.wasm, certs=layout.certs, state_port=CLUSTER_WEBDIS_PORT,
               http_port=11000, https_port=11443, mtls_port=11444, admin_port=9902, upstream_port=18081),
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
    ]), flush=True)
    return serve(gateways, store)


if __name__ == "__main__":
    sys.exit(main())
