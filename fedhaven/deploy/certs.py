"""TLS certificates for the coordinator and authentication keys for the sites.

The files are the ones Flower 1.42's own flags read:

- ``init_ca``: ``ca.crt`` (+ ``ca.key``, kept by the coordinator), ``server.pem`` and
  ``server.key``, for ``flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem
  --ssl-keyfile server.key``; sites and the ``flwr`` CLI trust ``ca.crt``
  (``flower-supernode --root-certificates``, ``root-certificates`` of a connection).
- ``site_keys``: an ECDSA P-384 key pair in OpenSSH format, ``NAME.key`` for
  ``flower-supernode --auth-supernode-private-key`` (read with ``load_ssh_private_key``) and
  ``NAME.pub`` for ``flwr supernode register`` (read with ``load_ssh_public_key``) on a
  SuperLink started with ``--enable-supernode-auth``.

Private keys are created with mode 0600, and nothing that exists is replaced unless asked
(``force``): a replaced CA or key invalidates everything issued with or registered for it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedhaven.deploy.process import readable_file
from fedhaven.errors import FedhavenError
from fedhaven.fileio import write_atomic

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
PRIVATE_KEY_SUFFIX, PUBLIC_KEY_SUFFIX = ".key", ".pub"
PRIVATE_MODE, PUBLIC_MODE, DIR_MODE = 0o600, 0o644, 0o700

_CURVE = ec.SECP384R1  # Flower's own choice for node keys; any NIST curve is accepted
_SITE_NAME = re.compile(r"[A-Za-z0-9_-]+")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"(\*\.)?{_LABEL}(\.{_LABEL})*")
_CLOCK_SKEW = dt.timedelta(minutes=5)


def init_ca(
    directory: str | os.PathLike[str],
    *,
    sans: Iterable[str] = ("localhost", "127.0.0.1"),
    days: int = 365,
    force: bool = False,
) -> dict[str, Path]:
    """Create a CA and the coordinator's (SuperLink's) TLS key and certificate, signed by it.

    ``sans`` are the names the sites use to reach the coordinator: IP addresses become IP
    SANs, anything else a DNS SAN. Returns the paths as ``ca_cert``, ``ca_key``,
    ``server_cert`` and ``server_key``.
    """
    if days < 1:
        raise FedhavenError(f"days={days}: a certificate must be valid for at least 1 day")
    names = _parse_sans(sans)
    out = Path(directory)
    paths = {
        "ca_cert": out / CA_CERT,
        "ca_key": out / CA_KEY,
        "server_cert": out / SERVER_CERT,
        "server_key": out / SERVER_KEY,
    }
    _refuse_existing(paths.values(), force)

    now = dt.datetime.now(dt.UTC)
    start, end = now - _CLOCK_SKEW, now + dt.timedelta(days=days)
    ca_key = ec.generate_private_key(_CURVE())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedhaven coordinator CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(_CURVE())
    first = names[0].value
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(first))]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )

    _make_dir(out)
    _write_file(paths["ca_key"], _pem_private(ca_key), PRIVATE_MODE)
    _write_file(paths["server_key"], _pem_private(server_key), PRIVATE_MODE)
    _write_file(paths["ca_cert"], ca_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)
    _write_file(
        paths["server_cert"], server_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE
    )
    return paths


def site_keys(
    name: str, directory: str | os.PathLike[str], *, force: bool = False
) -> dict[str, Path]:
    """Create site ``name``'s SuperNode authentication key pair in ``directory``.

    Returns ``private_key`` (``NAME.key``, OpenSSH private key, stays at the site) and
    ``public_key`` (``NAME.pub``, one OpenSSH line, registered at the coordinator).
    """
    if not isinstance(name, str) or not _SITE_NAME.fullmatch(name):
        raise FedhavenError(
            f"site name {name!r} is not valid: use letters, digits, '-' and '_' only"
        )
    out = Path(directory)
    paths = {
        "private_key": out / f"{name}{PRIVATE_KEY_SUFFIX}",
        "public_key": out / f"{name}{PUBLIC_KEY_SUFFIX}",
    }
    _refuse_existing(paths.values(), force)

    key = ec.generate_private_key(_CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _make_dir(out)
    _write_file(paths["private_key"], private, PRIVATE_MODE)
    _write_file(paths["public_key"], public + f" {name}\n".encode(), PUBLIC_MODE)
    return paths


# --- checks before anything starts: what a TLS handshake would refuse, said in one line ---


def read_certificates(path: Path, what: str, fix: str) -> list[x509.Certificate]:
    """The PEM certificates in ``path``, first to last (a leaf may come with its chain)."""
    raw = readable_file(path, what, fix)
    try:
        certs = x509.load_pem_x509_certificates(raw)
    except ValueError:
        certs = []
    if not certs:
        raise FedhavenError(f"{what} '{path}' is not a PEM certificate: {fix}")
    return certs


def check_valid_now(
    cert: x509.Certificate, path: Path, what: str, renew: str, now: dt.datetime | None = None
) -> None:
    """Refuse a certificate outside its validity window, as every TLS peer would."""
    now = now or dt.datetime.now(dt.UTC)
    if cert.not_valid_after_utc < now:
        raise FedhavenError(
            f"{what} '{path}' expired on {cert.not_valid_after_utc:%Y-%m-%d}: {renew}"
        )
    if cert.not_valid_before_utc > now:
        raise FedhavenError(
            f"{what} '{path}' is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} "
            f"UTC: check this machine's clock, or {renew}"
        )


def check_is_ca(cert: x509.Certificate, path: Path, fix: str) -> None:
    """Refuse a certificate that may not issue others (e.g. server.pem given as ca.crt)."""
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise FedhavenError(
            f"'{path}' is not a CA certificate (the coordinator's {SERVER_CERT}?): {fix}"
        )


def check_issued_by(
    chain: list[x509.Certificate], path: Path, ca: x509.Certificate, ca_path: Path, fix: str
) -> None:
    """Check that each certificate of ``chain`` is signed by the next, the last by ``ca``."""
    for child, parent in zip(chain, [*chain[1:], ca], strict=True):
        if child == parent:  # the CA itself at the end of the chain
            continue
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            raise FedhavenError(
                f"'{path}' was not issued by '{ca_path}' (from another `fedhaven certs "
                f"init`?): {fix}"
            ) from None


def _parse_sans(sans: Iterable[str]) -> list[x509.GeneralName]:
    if isinstance(sans, str):
        sans = sans.split(",")
    names: list[x509.GeneralName] = []
    for raw in sans:
        san = str(raw).strip()
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(san)))
            continue
        except ValueError:
            pass
        if len(san) > 253 or not _DNS_NAME.fullmatch(san):
            raise FedhavenError(
                f"{san!r} is neither an IP address nor a DNS name: give the names the sites "
                "use to reach the coordinator, e.g. coordinator.example.org or 10.0.0.5"
            )
        names.append(x509.DNSName(san))
    names = list(dict.fromkeys(names))  # a name given twice is listed once
    if not names:
        raise FedhavenError(
            "no subject alternative names: give at least one host name or IP address"
        )
    return names


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _refuse_existing(paths: Iterable[Path], force: bool) -> None:
    for path in paths:
        if path.is_dir():
            raise FedhavenError(f"'{path}' is a directory: choose another output directory")
        if path.exists() and not force:
            raise FedhavenError(
                f"'{path}' already exists: refusing to overwrite it; pass --force to replace "
                "it (what was issued with or registered for the old file stops working)"
            )


def _make_dir(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise FedhavenError(f"'{path}' is not a directory: choose another output directory")
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """``data`` swapped in whole, with ``mode`` from its first byte on."""
    write_atomic(path, lambda f: f.write(data), mode=mode)
