#!/usr/bin/env python3
"""Generates the demo PKI: a CA and a server certificate for 127.0.0.1 / localhost, partner
client certificates, and a separate backend PKI for the TLS hop from the gateway to the backend
(envoy/gateway-upstream-tls.yaml): a backend CA, the backend's server certificate and the
gateway's client certificate. Demo material only: real gateways use the firm's own PKI."""
import argparse
import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "apisec demo"), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


# The name the gateway expects the backend's certificate to carry (SNI and SAN check).
BACKEND_NAME = "backend.apisec.internal"
# The central log collector's name, and a gateway's name as its log shipper (deploy/logging).
LOG_COLLECTOR = "logs.apisec.internal"
LOG_SHIPPER = "gateway-1.gateways.apisec.internal"


def issue_server(out: Path, name: str, sans: list, ca, ca_key, now, cn: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (out / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(out / f"{name}.key", key)


def issue_client(out: Path, name: str, uri: str, ca, ca_key, now, dns: str | None = None) -> None:
    """A client certificate for an app, with the app's identity as a URI SAN (mTLS, ID-3); with
    `dns`, a DNS name instead (the log shipper's name the collector checks)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)] if dns else [x509.UniformResourceIdentifier(uri)]),
                       critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (out / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(out / f"{name}.key", key)


# Demo client identities: one per demo app, bound in the policy by URI SAN.
CLIENTS = {
    "client-demo-partner": "spiffe://apisec.demo/app/demo-partner",
    "client-demo-desk": "spiffe://apisec.demo/app/demo-desk",
}


def _ca(name: str, now):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca, ca_key = _ca("apisec demo CA", now)
    (out / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_key(out / "ca.key", ca_key)
    issue_server(out, "server", [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                 ca, ca_key, now, "localhost")
    for name, uri in CLIENTS.items():
        issue_client(out, name, uri, ca, ca_key, now)
    # A client certificate from a CA the gateway does not trust, for the refusal tests.
    rogue_ca, rogue_key = _ca("rogue CA", now)
    issue_client(out, "client-rogue", CLIENTS["client-demo-partner"], rogue_ca, rogue_key, now)
    # The backend hop (DATA-2): its own CA, so that a partner certificate can never pass as the
    # backend or as the gateway; the backend's certificate; the gateway's client certificate.
    backend_ca, backend_ca_key = _ca("apisec demo backend CA", now)
    (out / "backend-ca.pem").write_bytes(backend_ca.public_bytes(serialization.Encoding.PEM))
    issue_server(out, "backend", [x509.DNSName(BACKEND_NAME)], backend_ca, backend_ca_key, now, BACKEND_NAME)
    issue_client(out, "gateway-client", "spiffe://apisec.demo/gateway", backend_ca, backend_ca_key, now)
    # Operators (SES-4, OPS-6): their own CA, trusted only by the operator listener; one
    # operator named in the demo policy, and one the policy does not name.
    operator_ca, operator_key = _ca("apisec demo operator CA", now)
    (out / "operator-ca.pem").write_bytes(operator_ca.public_bytes(serialization.Encoding.PEM))
    issue_client(out, "operator-alice", "spiffe://apisec.demo/operator/alice", operator_ca, operator_key, now)
    issue_client(out, "operator-mallory", "spiffe://apisec.demo/operator/mallory", operator_ca, operator_key, now)
    # A backend certificate from a CA the gateway does not trust for backends (the partner CA).
    issue_server(out, "backend-rogue", [x509.DNSName(BACKEND_NAME)], ca, ca_key, now, BACKEND_NAME)
    # Central log collection (LOG-3, LOG-6; deploy/logging): its own CA, the collector's server
    # certificate, a gateway's shipper certificate, and a shipper from a CA the collector does
    # not trust.
    log_ca, log_ca_key = _ca("apisec demo logging CA", now)
    (out / "log-ca.pem").write_bytes(log_ca.public_bytes(serialization.Encoding.PEM))
    issue_server(out, "log-collector", [x509.DNSName(LOG_COLLECTOR)], log_ca, log_ca_key, now, LOG_COLLECTOR)
    issue_client(out, "log-shipper", "", log_ca, log_ca_key, now, dns=LOG_SHIPPER)
    issue_client(out, "log-shipper-rogue", "", ca, ca_key, now, dns=LOG_SHIPPER)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    generate(Path(ap.parse_args().out))
