"""Certificates and keys for the local control plane, made with `cryptography`.

One cluster CA signs the API server's serving certificate and a client certificate per identity
(admin, controller-manager, scheduler). A separate RSA key pair signs service-account tokens.
Add-ons (Kueue) get their certificates later from the same CA with ``issue_client`` and
``issue_serving``, so the API server trusts the webhooks they serve on loopback.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = dt.timedelta(days=365)
SERVING_DNS = [
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
]
SERVING_IPS = ["127.0.0.1", "10.0.0.1"]


@dataclass(frozen=True)
class ClientIdentity:
    """A client certificate subject: CN is the user name, O entries are groups."""

    file_stem: str
    user: str
    groups: tuple[str, ...] = ()


CLIENTS = (
    ClientIdentity("admin", "kubernetes-admin", ("system:masters",)),
    ClientIdentity("controller-manager", "system:kube-controller-manager"),
    ClientIdentity("scheduler", "system:kube-scheduler"),
    # The API server's identity towards kubelets (a real node binds it to system:kubelet-api-admin).
    ClientIdentity("apiserver-kubelet-client", "kube-apiserver-kubelet-client"),
)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
    )


def generate(pki_dir: Path) -> None:
    """Write ca.{crt,key}, apiserver.{crt,key}, sa.{key,pub} and <client>.{crt,key} into pki_dir."""
    pki_dir.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "research-operator-local-ca")])
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(pki_dir / "ca.key", ca_key)
    _write_cert(pki_dir / "ca.crt", ca_cert)

    serving_key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in SERVING_DNS]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in SERVING_IPS]
    serving = (
        _builder(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]),
            ca_name,
            serving_key.public_key(),
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(pki_dir / "apiserver.key", serving_key)
    _write_cert(pki_dir / "apiserver.crt", serving)

    for client in CLIENTS:
        key = ec.generate_private_key(ec.SECP256R1())
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in client.groups]
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, client.user))
        cert = (
            _builder(x509.Name(attrs), ca_name, key.public_key())
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        _write_key(pki_dir / f"{client.file_stem}.key", key)
        _write_cert(pki_dir / f"{client.file_stem}.crt", cert)

    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write_key(pki_dir / "sa.key", sa_key)
    (pki_dir / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def _load_ca(pki_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate((pki_dir / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((pki_dir / "ca.key").read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{pki_dir / 'ca.key'} is not the EC key localkube generates")
    return cert, key


def issue_client(pki_dir: Path, client: ClientIdentity, out_dir: Path | None = None) -> None:
    """Write <stem>.{crt,key} (into ``out_dir``, default ``pki_dir``): a client certificate of the
    cluster CA for one more identity."""
    ca_cert, ca_key = _load_ca(pki_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in client.groups]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, client.user))
    cert = (
        _builder(x509.Name(attrs), ca_cert.subject, key.public_key())
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out_dir = out_dir or pki_dir
    _write_key(out_dir / f"{client.file_stem}.key", key)
    _write_cert(out_dir / f"{client.file_stem}.crt", cert)


def issue_serving(out_dir: Path, pki_dir: Path, common_name: str, ips: tuple[str, ...] = ("127.0.0.1",)) -> None:
    """Write out_dir/tls.{crt,key} (the names controller-runtime's webhook server reads): a serving
    certificate of the cluster CA for ``ips``, so the API server trusts a webhook served there."""
    ca_cert, ca_key = _load_ca(pki_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    sans.append(x509.DNSName("localhost"))
    cert = (
        _builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]), ca_cert.subject, key.public_key())
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(out_dir / "tls.key", key)
    _write_cert(out_dir / "tls.crt", cert)
