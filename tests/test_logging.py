"""Central log collection (issue 26; LOG-3, LOG-6, LOG-7) with the real component a gateway team
runs: rsyslog from Debian, configured by the checked-in deploy/logging/rsyslog-gateway.conf (a
shipper beside Envoy) and rsyslog-collector.conf (the central collector), over TCP with mutual
TLS. A real Envoy loading the built filter writes the audit log and its own log; the records
arrive at the collector byte for byte and `apisec audit verify` passes there against the
checkpoints, which are filed apart from the audit log; nothing is lost or repeated while the
collector is down and restarted; a shipper the collector does not trust adds nothing; the
user operation log holds end users' logins, logouts and calls; logrotate with the checked-in
configs rotates both ends without a record lost and the chain still verifies across the files."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

import gateway as gw
from conftest import AUDIT_KEY, AUDIT_KEY_VAR, CLI, ROOT, Client, new_secret, start_gateway
from helpers import RESEARCH, session_policy, wait_for

LOGGING = ROOT / "deploy/logging"
GATEWAY_NAME = "gateway-1.gateways.apisec.internal"
MAC = "aa:bb:cc:dd:ee:01"
OPS_KEY = new_secret()


class Rsyslog:
    """rsyslogd in the foreground with one of the checked-in configs and its variables."""

    def __init__(self, conf: str, env: dict[str, str], work: Path):
        self.conf, self.env, self.work = LOGGING / conf, env, work
        self.proc: subprocess.Popen | None = None
        work.mkdir(parents=True, exist_ok=True)
        self.pidfile = work / "rsyslogd.pid"
        self.log = work / "rsyslogd.out"

    def start(self) -> "Rsyslog":
        self.pidfile.unlink(missing_ok=True)
        self.proc = subprocess.Popen(["rsyslogd", "-n", "-f", str(self.conf), "-i", str(self.pidfile)],
                                     env={**os.environ, **self.env}, stdout=open(self.log, "a"),
                                     stderr=subprocess.STDOUT)
        wait_for(lambda: self.pidfile.exists() or self.proc.poll() is not None, what=f"{self.conf.name} started")
        assert self.proc.poll() is None, self.log.read_text()
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)


def collector_env(tmp: Path, certs: Path, port: int) -> dict[str, str]:
    return {"APISEC_COLLECT_DIR": str(tmp / "central"), "APISEC_SPOOL_DIR": str(tmp / "collector"),
            "APISEC_COLLECTOR_PORT": str(port), "APISEC_LOG_CA": str(certs / "log-ca.pem"),
            "APISEC_LOG_CERT": str(certs / "log-collector.pem"), "APISEC_LOG_KEY": str(certs / "log-collector.key"),
            "APISEC_SHIPPERS": "*.gateways.apisec.internal"}


def shipper_env(g: gw.Gateway, spool: Path, port: int, cert: str = "log-shipper") -> dict[str, str]:
    certs = g.layout.certs
    return {"APISEC_GATEWAY_NAME": GATEWAY_NAME, "APISEC_AUDIT_LOG": str(g.layout.audit_log),
            "APISEC_OPS_LOG": str(g.layout.ops_log), "APISEC_ENVOY_LOG": str(g.envoy_log),
            "APISEC_SPOOL_DIR": str(spool), "APISEC_COLLECTOR": "127.0.0.1", "APISEC_COLLECTOR_PORT": str(port),
            "APISEC_COLLECTOR_NAME": "logs.apisec.internal", "APISEC_LOG_CA": str(certs / "log-ca.pem"),
            "APISEC_LOG_CERT": str(certs / f"{cert}.pem"), "APISEC_LOG_KEY": str(certs / f"{cert}.key")}


class Setup:
    def __init__(self, tmp: Path, g: gw.Gateway, secret: str):
        self.tmp, self.g, self.secret = tmp, g, secret
        self.port = gw.free_port()
        self.collector = Rsyslog("rsyslog-collector.conf", collector_env(tmp, g.layout.certs, self.port),
                                 tmp / "collector")
        self.shipper = Rsyslog("rsyslog-gateway.conf", shipper_env(g, tmp / "shipper", self.port), tmp / "shipper")
        self.central = tmp / "central"

    @property
    def audit(self) -> Path:
        return self.central / "audit" / GATEWAY_NAME / "audit.log"

    @property
    def system(self) -> Path:
        return self.central / "system" / GATEWAY_NAME / "envoy.log"

    @property
    def users(self) -> Path:
        return self.central / "users" / "users.log"

    def client(self) -> Client:
        return Client(self.g, self.secret)


@pytest.fixture(scope="module")
def logs(tmp_path_factory, secret):
    tmp = tmp_path_factory.mktemp("logging")
    doc = session_policy(idle=60, lifetime=600)
    doc["audit"]["checkpoint_seconds"] = 1
    # the operations log is sealed from its first line, the policy the gateway starts with
    os.environ["APISEC_OPS_KEY"] = OPS_KEY
    g = start_gateway(tmp / "gw", doc, secret=secret, concurrency=2, log_path=True)
    s = Setup(tmp, g, secret)
    try:
        s.collector.start()
        s.shipper.start()
        yield s
    finally:
        s.shipper.stop()
        s.collector.stop()
        g.stop()
        os.environ.pop("APISEC_OPS_KEY", None)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def files(path: Path) -> list[Path]:
    """A log and its rotated files (dated names), oldest first, uncompressed ones only."""
    rotated = sorted(p for p in path.parent.glob(path.name + "-*") if not p.name.endswith(".gz"))
    return [*rotated, path] if path.exists() else rotated


def all_lines(path: Path) -> list[str]:
    return [line for f in files(path) for line in lines(f)]


def verify(audit: list[Path], checkpoints: list[Path]) -> tuple[int, dict]:
    out = subprocess.run([str(CLI), "audit", "verify", *map(str, audit), "--key-env", AUDIT_KEY_VAR,
                          "--format", "json", *[a for c in checkpoints for a in ("--checkpoints", str(c))]],
                         capture_output=True, text=True, timeout=60, env={**os.environ, AUDIT_KEY_VAR: AUDIT_KEY})
    assert out.returncode in (0, 1, 3), out.stderr
    return out.returncode, json.loads(out.stdout)


def traffic(s: Setup, n: int) -> list[str]:
    """n requests, allowed and refused; their request ids."""
    c = s.client()
    ids = []
    for i in range(n):
        signed = c.sign("GET", RESEARCH if i % 3 else "/api/v1/not-in-inventory")
        r = c.send(signed)
        assert r.status_code in (200, 403), r.text
        ids.append(r.json()["headers"]["x-request-id"] if r.status_code == 200 else r.json()["request_id"])
    return ids


def arrived(s: Setup) -> None:
    """Waits until the collector holds every audit line the gateway wrote (read from the local
    files once Envoy has flushed them), and a checkpoint at least as new as the last one Envoy
    wrote after them; asserts the lines are the same bytes in the same order."""
    time.sleep(2.5)  # Envoy's file flush (1 s) and the checkpoint (1 s)
    local = all_lines(s.g.layout.audit_log)
    wait_for(lambda: len(all_lines(s.audit)) >= len(local), timeout=30, what="audit records at the collector")
    assert all_lines(s.audit) == local
    marks = [line for line in all_lines(s.g.envoy_log) if "apisec-audit-checkpoint" in line]
    if marks:
        wait_for(lambda: marks[-1] in all_lines(s.system), timeout=30, what="the last checkpoint at the collector")


def test_records_arrive_byte_for_byte_and_verify_at_the_collector(logs):  # LOG-3 LOG-6
    ids = traffic(logs, 12)
    arrived(logs)
    collected = all_lines(logs.audit)
    for rid in ids:
        assert sum(f'"request_id":"{rid}"' in line for line in collected) == 1, rid
    # Envoy's own log (system errors, LOG-3) is filed apart from the audit log, with the
    # checkpoints that vouch for it
    assert logs.system.parent.parent.name == "system" and logs.audit.parent.parent.name == "audit"
    assert any("apisec-audit-checkpoint" in line for line in lines(logs.system))
    assert not any("apisec-audit-checkpoint" in line for line in collected)
    code, report = verify(files(logs.audit), files(logs.system))
    assert code == 0, report
    # The collected copy is the evidence: a record changed there is found there
    edited = logs.tmp / "edited-audit.log"
    edited.write_text("\n".join(line.replace('"status":200', '"status":201', 1) for line in collected) + "\n")
    code, report = verify([edited], files(logs.system))
    assert code == 1 and report["findings"][0]["kind"] == "modified", report


def test_the_operations_log_is_collected_and_verifies(logs):  # LOG-6
    doc = session_policy(idle=60, lifetime=600)
    doc["audit"]["checkpoint_seconds"] = 1
    doc["opted_out_users"] = ["u-closed", "u-gone"]
    gw.apply_policy(json.dumps(doc), logs.g.layout, actor="alice", source="test_logging")
    ops = logs.central / "operations" / GATEWAY_NAME / "ops.log"
    local = lines(logs.g.layout.ops_log)
    wait_for(lambda: lines(ops) == local, timeout=30, what="the operations log at the collector")
    out = subprocess.run([str(CLI), "audit", "verify", str(ops), "--key-env", "APISEC_OPS_KEY", "--format", "json",
                          "--no-checkpoints"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(local[-1])["actor"] == "alice"


def test_nothing_lost_or_repeated_across_a_collector_restart(logs):  # LOG-6
    arrived(logs)
    logs.collector.stop()
    before = all_lines(logs.audit)
    ids = traffic(logs, 30)
    time.sleep(3)
    assert all_lines(logs.audit) == before, "the collector was down"
    logs.collector.start()
    arrived(logs)
    collected = all_lines(logs.audit)
    for rid in ids:
        assert sum(f'"request_id":"{rid}"' in line for line in collected) == 1, rid
    code, report = verify(files(logs.audit), files(logs.system))
    assert code == 0, report


def test_a_shipper_the_collector_does_not_trust_adds_nothing(logs):  # LOG-6
    """A shipper with a certificate from another CA (the partners' CA), and a plain TCP sender,
    both try to add a forged audit line; the collector files neither."""
    forged = '{"ts":1,"request_id":"forged-by-rogue","decision":"allow","status":200}'
    rogue_dir = logs.tmp / "rogue"
    rogue_dir.mkdir()
    rogue_audit = rogue_dir / "audit.log"
    rogue_audit.write_text(forged + "\n")
    env = {**shipper_env(logs.g, rogue_dir / "spool", logs.port, cert="log-shipper-rogue"),
           "APISEC_AUDIT_LOG": str(rogue_audit), "APISEC_OPS_LOG": str(rogue_dir / "ops.log"),
           "APISEC_ENVOY_LOG": str(rogue_dir / "envoy.log")}
    rogue = Rsyslog("rsyslog-gateway.conf", env, rogue_dir / "spool").start()
    try:
        with socket.create_connection(("127.0.0.1", logs.port), timeout=5) as plain:
            msg = f"<14>1 - {GATEWAY_NAME} apisec-audit - - - {forged}"
            plain.sendall(f"{len(msg)} {msg}".encode())
        time.sleep(6)
        # the honest gateway's records still arrive after the attempts
        ids = traffic(logs, 3)
        arrived(logs)
        collected = "\n".join(all_lines(logs.audit))
        assert all(rid in collected for rid in ids)
        assert "forged-by-rogue" not in collected
        assert not any("forged-by-rogue" in p.read_text() for p in logs.central.rglob("*") if p.is_file())
    finally:
        rogue.stop()


def test_user_operation_log_holds_logins_logouts_and_calls(logs):  # LOG-7
    c = logs.client()
    body = json.dumps({"caller_code": "demo-partner", "mac": MAC, "ip": "10.1.2.3"}).encode()
    r = c.send(c.sign("POST", "/apisec/v1/sessions", body=body))
    assert r.status_code == 201, r.text
    sid = r.json()["session_id"]
    session_headers = ["--header", f"x-session-id: {sid}", "--header", f"x-device-mac: {MAC}",
                       "--cover", "x-session-id", "--cover", "x-device-mac"]

    def in_session(method: str, path: str):
        return c.send(c.sign(method, path, extra=session_headers))

    assert in_session("GET", "/api/v1/watchlist").status_code == 200
    # the firm's login API (the demo login service reports the user it logged in)
    assert in_session("POST", "/api/v1/users/login?report=user%3DU-Carol%3B%20factors%3D1").status_code == 200
    news = in_session("GET", "/api/v1/users/news")
    assert news.status_code == 200, news.text
    assert in_session("DELETE", "/apisec/v1/sessions").status_code == 200
    plain = c.send(c.sign("GET", RESEARCH))  # no session, no user: not a user operation
    assert plain.status_code == 200
    arrived(logs)
    wait_for(lambda: any('"event":"logged_out"' in line for line in lines(logs.users)), timeout=30,
             what="the logout in the user operation log")
    ops = [json.loads(line) for line in lines(logs.users)]
    mine = [o for o in ops if o["session"] == ops[-1]["session"]]
    assert [(o["event"], o["user"], o["api"], o["decision"]) for o in mine] == [
        ("created", "", "session.create", "allow"), ("", "", "info.watchlist", "allow"),
        ("user_logged_in", "u-carol", "user.login", "allow"), ("", "u-carol", "user.news", "allow"),
        ("logged_out", "u-carol", "session.logout", "allow")], mine  # the user logged in on the session ended
    assert mine[3]["function"] == "user_news" and mine[3]["request_id"] == news.json()["headers"]["x-request-id"]
    assert all(o["gateway"] == GATEWAY_NAME and o["app"] == "demo-partner" for o in mine)
    assert sid not in logs.users.read_text(), "the session ID itself is never logged"
    assert plain.json()["headers"]["x-request-id"] not in logs.users.read_text()


def rendered(conf: str, tmp: Path, old: str, new: str, **extra: str) -> Path:
    """A checked-in logrotate config with its directory (and the reopen command) for this test."""
    text = (LOGGING / conf).read_text().replace(old, new)
    for k, v in extra.items():
        text = text.replace(k, v)
    out = tmp / conf
    out.write_text(text)
    return out


def test_rotation_at_both_ends_keeps_every_record_and_the_chain(logs):  # LOG-6
    traffic(logs, 3)
    arrived(logs)
    layout = logs.g.layout
    gw_conf = rendered("logrotate-gateway.conf", logs.tmp, "/var/log/apisec/", f"{layout.build}/",
                       **{"127.0.0.1:9901": f"127.0.0.1:{layout.admin_port}"})
    subprocess.run(["logrotate", "-f", "-s", str(logs.tmp / "gw.state"), str(gw_conf)], check=True, timeout=60)
    assert len(files(layout.audit_log)) == 2 and len(files(logs.g.envoy_log)) == 2
    ids = traffic(logs, 9)
    arrived(logs)  # new records in Envoy's reopened files, and at the collector
    assert lines(layout.audit_log), "Envoy did not reopen the audit log"
    code, report = verify(files(layout.audit_log), files(logs.g.envoy_log))
    assert code == 0, report["findings"]
    # The collector: rotated, told to reopen (SIGHUP), and the chain verifies across its files
    col_conf = rendered("logrotate-collector.conf", logs.tmp, "/var/log/apisec-central/", f"{logs.central}/",
                        **{"/run/apisec-collector.pid": str(logs.collector.pidfile)})
    subprocess.run(["logrotate", "-f", "-s", str(logs.tmp / "col.state"), str(col_conf)], check=True, timeout=60)
    assert len(files(logs.audit)) == 1 and not logs.audit.exists()  # renamed; reopened on the next record
    more = traffic(logs, 6)
    arrived(logs)
    assert len(files(logs.audit)) == 2 and lines(logs.audit), "the collector did not reopen its file"
    collected = "\n".join(all_lines(logs.audit))
    assert all(collected.count(f'"request_id":"{rid}"') == 1 for rid in ids + more)
    code, report = verify(files(logs.audit), files(logs.system))
    assert code == 0, report


def test_the_checked_in_configs_are_valid(tmp_path):  # LOG-6
    """rsyslog checks both of its configs (-N1) with their variables set, and logrotate parses
    both of its configs (-d: what it would do, nothing done)."""
    for conf in ("rsyslog-gateway.conf", "rsyslog-collector.conf"):
        env = {**os.environ, "APISEC_SPOOL_DIR": "/tmp", "APISEC_LOG_CA": "/dev/null", "APISEC_LOG_CERT": "/dev/null",
               "APISEC_LOG_KEY": "/dev/null", "APISEC_COLLECTOR_PORT": "6514", "APISEC_COLLECTOR": "127.0.0.1",
               "APISEC_COLLECT_DIR": "/tmp", "APISEC_SHIPPERS": "*.example", "APISEC_AUDIT_LOG": "/tmp/a",
               "APISEC_OPS_LOG": "/tmp/o", "APISEC_ENVOY_LOG": "/tmp/e", "APISEC_COLLECTOR_NAME": "logs.example",
               "APISEC_GATEWAY_NAME": "gw.example"}
        out = subprocess.run(["rsyslogd", "-N1", "-f", str(LOGGING / conf)], env=env, capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0, out.stdout + out.stderr
    for conf in ("logrotate-gateway.conf", "logrotate-collector.conf"):
        out = subprocess.run(["logrotate", "-d", "-s", str(tmp_path / "state"), str(LOGGING / conf)],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and "error" not in out.stderr.lower(), out.stderr
