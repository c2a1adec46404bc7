"""Mutual TLS between nation KAS clusters: a tiny coalition PKI for dev and tests, and SSL contexts.

A nation's TLS identity is a certificate + key and the CA file that authenticates the *other* side.
Peer certificates name their nation in the subject: ``O=<nation code>`` and ``CN=kas-<nation>``;
:func:`peer_nation_from_cert` reads it back (and refuses a subject where the two disagree).

    ca = make_ca(tmp)                                        # real X.509, EC P-256
    usa = issue_cert(ca, tmp, "USA", usage="server")         # the USA federation gateway
    fra = issue_cert(ca, tmp, "FRA", usage="client")         # FRA's KAS calling USA
    httpx.post(url, json=..., verify=client_ssl_context(fra))

The dev PKI is for development and tests only: no revocation (CRL/OCSP), keys unencrypted on disk
(mode 0600). Production identities come from each nation's PKI; only the file paths are configured.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import ssl
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import BaseModel, ConfigDict

from kas_ray.config import TlsIdentity

Usage = Literal["server", "client", "both"]
DEFAULT_HOSTNAMES = ("127.0.0.1", "localhost")
#: TLS 1.2 suites (TLS 1.3 suites are not affected): forward secrecy and AEAD only.
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
_NATION = re.compile(r"[A-Za-z]{2,10}")
_CN_NATION = re.compile(r"kas-([A-Za-z]{2,10})", re.IGNORECASE)


class TlsFiles(Protocol):
    """Anything with the three paths (:class:`~kas_ray.config.TlsIdentity`, :class:`CertFiles`)."""

    @property
    def cert_file(self) -> str: ...

    @property
    def key_file(self) -> str: ...

    @property
    def ca_file(self) -> str: ...


class CaFiles(BaseModel):
    """A dev CA: its certificate (what peers trust) and its signing key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cert_file: str
    key_file: str


class CertFiles(TlsIdentity):
    """An issued identity: certificate, key, and the issuing CA's certificate (usable as a :class:`TlsIdentity`)."""

    def identity(self) -> TlsIdentity:
        return TlsIdentity(cert_file=self.cert_file, key_file=self.key_file, ca_file=self.ca_file)


# --- dev PKI ---------------------------------------------------------------------------------------
def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), 0o600)  # an existing file keeps its mode through O_CREAT
        fh.write(pem)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _window(not_before: dt.datetime | None, days: float) -> tuple[dt.datetime, dt.datetime]:
    if days <= 0:
        raise ValueError("certificate validity must be positive")
    start = not_before or _now() - dt.timedelta(minutes=5)  # a little slack for clock skew
    return start, start + dt.timedelta(days=days)


def make_ca(directory: str | os.PathLike[str], name: str = "kas-ray coalition dev CA", *, days: float = 30,
            stem: str = "coalition-ca", not_before: dt.datetime | None = None) -> CaFiles:
    """Create a self-signed EC P-256 CA in ``directory`` (``<stem>.cert.pem``, ``<stem>.key.pem`` mode 0600)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kas-ray coalition")])
    start, end = _window(not_before, days)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    files = CaFiles(cert_file=str(out / f"{stem}.cert.pem"), key_file=str(out / f"{stem}.key.pem"))
    _write_key(Path(files.key_file), key)
    _write_cert(Path(files.cert_file), cert)
    return files


def _san(hostnames: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def issue_cert(ca: CaFiles, directory: str | os.PathLike[str], nation: str,
               hostnames: Iterable[str] = DEFAULT_HOSTNAMES, usage: Usage = "server", *, days: float = 1,
               not_before: dt.datetime | None = None, stem: str | None = None) -> CertFiles:
    """Issue ``CN=kas-<nation>, O=<NATION>`` signed by ``ca``, with SAN ``hostnames`` and the EKU of ``usage``.

    Files: ``<stem>.cert.pem`` and ``<stem>.key.pem`` (0600), default stem ``kas-<nation>-<usage>``.
    ``days`` (default 1) and ``not_before`` set the validity window (a past window gives an expired cert);
    it never ends after the CA's.
    """
    if not _NATION.fullmatch(nation):
        raise ValueError(f"nation code {nation!r} must be 2-10 letters")
    if usage not in ("server", "client", "both"):
        raise ValueError(f"usage must be server, client or both, not {usage!r}")
    code = nation.upper()
    ca_cert = x509.load_pem_x509_certificate(Path(ca.cert_file).read_bytes())
    ca_key = serialization.load_pem_private_key(Path(ca.key_file).read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca.key_file} is not an EC private key")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _window(not_before, days)
    end = min(end, ca_cert.not_valid_after_utc)
    if end <= start:
        raise ValueError("the certificate would end before it starts (the CA expires too soon)")
    ekus = {"server": [ExtendedKeyUsageOID.SERVER_AUTH], "client": [ExtendedKeyUsageOID.CLIENT_AUTH],
            "both": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]}[usage]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"kas-{code.lower()}"),
                                 x509.NameAttribute(NameOID.ORGANIZATION_NAME, code)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
        .add_extension(_san(hostnames), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    stem = stem or f"kas-{code.lower()}-{usage}"
    files = CertFiles(cert_file=str(out / f"{stem}.cert.pem"), key_file=str(out / f"{stem}.key.pem"),
                      ca_file=str(ca.cert_file))
    _write_key(Path(files.key_file), key)
    _write_cert(Path(files.cert_file), cert)
    return files


# --- SSL contexts ----------------------------------------------------------------------------------
def _harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def client_ssl_context(identity: TlsFiles) -> ssl.SSLContext:
    """Client side of mutual TLS: verify the server (chain to ``ca_file`` + host name), present our certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    _harden(ctx)
    ctx.load_verify_locations(cafile=identity.ca_file)
    ctx.load_cert_chain(identity.cert_file, identity.key_file)
    return ctx


def server_ssl_context(identity: TlsFiles) -> ssl.SSLContext:
    """Server side of mutual TLS: a client certificate chaining to ``ca_file`` is REQUIRED in the handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    ctx.load_cert_chain(identity.cert_file, identity.key_file)
    ctx.load_verify_locations(cafile=identity.ca_file)
    ctx.verify_mode = ssl.CERT_REQUIRED  # OpenSSL also checks the clientAuth EKU when the cert has an EKU
    ctx.num_tickets = 0  # no TLS 1.3 resumption: every connection verifies the client certificate afresh
    return ctx


# --- peer identity ---------------------------------------------------------------------------------
def _names_from_dict(cert: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """O and CN values of an ``SSLSocket.getpeercert()`` dict (subject = tuple of RDNs of (name, value))."""
    orgs: list[str] = []
    cns: list[str] = []
    for rdn in cert.get("subject", ()):
        for name, value in rdn:
            if name == "organizationName":
                orgs.append(str(value))
            elif name == "commonName":
                cns.append(str(value))
    return orgs, cns


def _names_from_x509(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    def values(oid: x509.ObjectIdentifier) -> list[str]:
        return [str(a.value) for a in cert.subject.get_attributes_for_oid(oid)]

    return values(NameOID.ORGANIZATION_NAME), values(NameOID.COMMON_NAME)


def load_certificate(cert: bytes | str | x509.Certificate) -> x509.Certificate:
    """DER bytes, PEM bytes/str, or an already parsed certificate."""
    if isinstance(cert, x509.Certificate):
        return cert
    data = cert.encode() if isinstance(cert, str) else bytes(cert)
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def peer_nation_from_cert(cert: bytes | str | x509.Certificate | Mapping[str, Any] | None) -> str | None:
    """The nation a (verified) peer certificate names: ``O=<nation>`` and/or ``CN=kas-<nation>``, upper case.

    Accepts DER/PEM, a parsed certificate, or the dict of ``SSLSocket.getpeercert()``. Returns None when
    the subject names no nation, names several, or O and CN disagree: such a peer is not trusted as any
    nation. This reads the subject only; the chain must already have been verified (by the TLS handshake).
    """
    if not cert:
        return None
    try:
        orgs, cns = _names_from_dict(cert) if isinstance(cert, Mapping) else _names_from_x509(load_certificate(cert))
    except (ValueError, TypeError):
        return None
    if len(orgs) > 1 or len(cns) > 1:
        return None
    from_o = orgs[0].upper() if orgs and _NATION.fullmatch(orgs[0]) else None
    match = _CN_NATION.fullmatch(cns[0]) if cns else None
    from_cn = match.group(1).upper() if match else None
    if from_o and from_cn and from_o != from_cn:
        return None
    return from_o or from_cn
