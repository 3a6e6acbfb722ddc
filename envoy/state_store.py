"""The cluster state store for demos and tests: a real Redis (append-only file, fsync on every
write, so recorded nonces and grant uses survive a restart) behind a real webdis HTTP bridge,
both from Debian's packages, on loopback ports of our choosing. Production runs its own Redis;
docs/operators.md "State: local or cluster" says how to size and deploy it."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


class StateStore:
    """redis-server + webdis, started and stopped as plain processes (no daemons, no root)."""

    def __init__(self, directory: Path, redis_port: int, http_port: int, credentials: str | None = None):
        self.dir = directory
        self.redis_port = redis_port
        self.http_port = http_port
        self.credentials = credentials  # "user:password" webdis requires, if any
        self.redis: subprocess.Popen | None = None
        self.webdis: subprocess.Popen | None = None

    def start(self) -> "StateStore":
        self.dir.mkdir(parents=True, exist_ok=True)
        self.start_redis()
        self.start_webdis()
        return self

    def start_redis(self) -> None:
        conf = self.dir / "redis.conf"
        conf.write_text("\n".join([
            "bind 127.0.0.1",
            f"port {self.redis_port}",
            f"dir {self.dir}",
            "daemonize no",
            'save ""',
            "appendonly yes",
            "appendfsync always",
            # A full store refuses writes (every request then fails closed) instead of evicting.
            "maxmemory-policy noeviction",
            f"logfile {self.dir / 'redis.log'}",
            "",
        ]))
        self.redis = subprocess.Popen(["redis-server", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.redis_port, self.redis, "redis-server")
        # Still loading its append-only file: wait until it answers PING with PONG.
        deadline = time.time() + 20
        while time.time() < deadline:
            if self.redis_cli("PING") == "PONG":
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server never answered PING")

    def start_webdis(self) -> None:
        acl = [{"disabled": ["*"]}]
        if self.credentials:
            acl.append({"http_basic_auth": self.credentials, "enabled": ["EVAL", "EVALSHA"]})
        else:
            acl.append({"ip": "127.0.0.1/32", "enabled": ["EVAL", "EVALSHA"]})
        conf = self.dir / "webdis.json"
        conf.write_text(json.dumps({
            "redis_host": "127.0.0.1", "redis_port": self.redis_port, "redis_auth": None,
            "http_host": "127.0.0.1", "http_port": self.http_port,
            "threads": 2, "pool_size": 16, "daemonize": False, "websockets": False, "database": 0,
            "acl": acl, "verbosity": 3, "logfile": str(self.dir / "webdis.log"),
        }, indent=1))
        self.webdis = subprocess.Popen(["webdis", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.http_port, self.webdis, "webdis")

    def redis_cli(self, *args: str) -> str:
        out = subprocess.run(["redis-cli", "-p", str(self.redis_port), *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip()

    def freeze(self) -> None:
        """The store hangs (answers nothing): SIGSTOP to Redis."""
        if self.redis:
            self.redis.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self.redis:
            self.redis.send_signal(signal.SIGCONT)

    def stop_redis(self) -> None:
        stop(self.redis)
        self.redis = None

    def stop(self) -> None:
        self.thaw()
        stop(self.webdis)
        stop(self.redis)
        self.webdis = self.redis = None

    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def stop(p: subprocess.Popen | None) -> None:
    if p is not None and p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_port(port: int, proc: subprocess.Popen, name: str, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{name} not listening on {port} after {timeout}s")


def state_cluster(port: int, tls_ca: Path | None = None) -> dict:
    """The Envoy cluster the filter's callouts go through (HTTP/1.1 keep-alive to webdis).
    Circuit breakers bound the callouts in flight: beyond them a callout is refused at once and
    the request gets 503 state_unavailable (fail closed). With `tls_ca`, the hop is TLS: the
    store's side must present a certificate for `localhost` issued by that CA."""
    cluster = {
        "name": "apisec_state",
        "type": "STATIC",
        "connect_timeout": "0.25s",
        "circuit_breakers": {"thresholds": [{"max_connections": 256, "max_pending_requests": 4096, "max_requests": 4096}]},
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "common_http_protocol_options": {"idle_timeout": "60s"},
                "explicit_http_config": {"http_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": "apisec_state",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}],
        },
    }
    if tls_ca is not None:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": "localhost",
                "common_tls_context": {
                    "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                    "validation_context": {
                        "trusted_ca": {"filename": str(tls_ca)},
                        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": "localhost"}}],
                    },
                },
            },
        }
    return cluster


def tls_terminator(build: Path, listen_port: int, target_port: int, certs: Path, admin_port: int) -> Path:
    """An Envoy that terminates TLS in front of webdis (webdis has none of its own): the
    store-side half of TLS between the gateways and the store. Returns its bootstrap."""
    build.mkdir(parents=True, exist_ok=True)
    boot = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "store_tls",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                "filter_chains": [{
                    "transport_socket": {
                        "name": "envoy.transport_sockets.tls",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                            "common_tls_context": {"tls_certificates": [{
                                "certificate_chain": {"filename": str(certs / "server.pem")},
                                "private_key": {"filename": str(certs / "server.key")}}]},
                        },
                    },
                    "filters": [{
                        "name": "envoy.filters.network.tcp_proxy",
                        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                                         "stat_prefix": "store", "cluster": "webdis"},
                    }],
                }],
            }],
            "clusters": [{
                "name": "webdis", "type": "STATIC", "connect_timeout": "0.25s",
                "load_assignment": {"cluster_name": "webdis", "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": target_port}}}}]}]},
            }],
        },
    }
    path = build / "store-tls.json"
    path.write_text(json.dumps(boot, indent=1))
    return path


def with_cluster_state(policy: dict, timeout_ms: int = 500, credentials_env: str | None = None,
                       app_share: int | None = None) -> dict:
    """The policy with its state on the cluster store (through the `apisec_state` cluster)."""
    doc = json.loads(json.dumps(policy))
    cluster = {"envoy_cluster": "apisec_state", "timeout_ms": timeout_ms}
    if app_share is not None:
        cluster["app_share"] = app_share
    if credentials_env:
        cluster["credentials_env"] = credentials_env
    doc["state"] = {"backend": "cluster", "cluster": cluster}
    return doc
