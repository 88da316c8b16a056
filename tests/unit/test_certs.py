"""Coordinator TLS certificates and site authentication keys, in the formats Flower reads."""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.cli.supernode.register import try_load_public_key
from flwr.common.args import try_obtain_server_certificates
from flwr.supercore.primitives.asymmetric import (
    bytes_to_public_key,
    sign_message,
    verify_signature,
)
from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

from fedhaven.deploy.certs import (
    check_is_ca,
    check_issued_by,
    check_valid_now,
    init_ca,
    read_certificates,
    site_keys,
)
from fedhaven.errors import FedhavenError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _snapshot(paths: dict[str, Path]) -> dict[str, bytes]:
    return {k: p.read_bytes() for k, p in paths.items()}


def test_init_ca_writes_flowers_file_names_with_private_keys_0600(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    paths = init_ca(out)
    assert {p.name for p in paths.values()} == {"ca.crt", "ca.key", "server.pem", "server.key"}
    assert all(p.parent == out and p.is_file() for p in paths.values())
    assert _mode(paths["ca_key"]) == 0o600
    assert _mode(paths["server_key"]) == 0o600
    assert _mode(out) == 0o700
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths.values())


def test_server_cert_is_issued_by_the_ca_with_the_sans_and_valid_now(tmp_path: Path) -> None:
    paths = init_ca(tmp_path, sans=("coordinator.example.org", "10.0.0.5", "::1"), days=30)
    ca, server = _cert(paths["ca_cert"]), _cert(paths["server_cert"])
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["coordinator.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("::1"),
    ]
    now = dt.datetime.now(dt.UTC)
    for cert in (ca, server):
        assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc
    assert server.not_valid_after_utc - now < dt.timedelta(days=31)
    # the server key is the certificate's key
    key = serialization.load_pem_private_key(paths["server_key"].read_bytes(), None)
    assert key.public_key() == server.public_key()


def test_default_sans_are_localhost_and_loopback(tmp_path: Path) -> None:
    san = (
        _cert(init_ca(tmp_path)["server_cert"])
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_superlink_loads_the_certificates(tmp_path: Path) -> None:
    paths = init_ca(tmp_path)
    args = argparse.Namespace(
        ssl_ca_certfile=str(paths["ca_cert"]),
        ssl_certfile=str(paths["server_cert"]),
        ssl_keyfile=str(paths["server_key"]),
    )
    ca, cert, key = try_obtain_server_certificates(args)
    assert (ca, cert, key) == (
        paths["ca_cert"].read_bytes(),
        paths["server_cert"].read_bytes(),
        paths["server_key"].read_bytes(),
    )


@pytest.mark.parametrize("sans", [("not a host",), ("bad_name.example",), ()])
def test_bad_sans_are_refused(tmp_path: Path, sans: tuple[str, ...]) -> None:
    with pytest.raises(FedhavenError, match="name"):
        init_ca(tmp_path / "pki", sans=sans)
    assert not (tmp_path / "pki").exists()


def test_init_ca_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    paths = init_ca(tmp_path)
    before = _snapshot(paths)
    with pytest.raises(FedhavenError, match=r"ca\.crt.*--force"):
        init_ca(tmp_path)
    assert _snapshot(paths) == before
    paths["ca_cert"].unlink()  # one file missing: the others are still protected
    with pytest.raises(FedhavenError, match=r"ca\.key.*--force"):
        init_ca(tmp_path)
    assert not paths["ca_cert"].exists()
    assert paths["ca_key"].read_bytes() == before["ca_key"]


def test_init_ca_force_regenerates(tmp_path: Path) -> None:
    paths = init_ca(tmp_path)
    before = _snapshot(paths)
    again = init_ca(tmp_path, force=True)
    assert again == paths
    after = _snapshot(again)
    assert all(after[k] != before[k] for k in paths)
    assert _mode(paths["ca_key"]) == _mode(paths["server_key"]) == 0o600
    _cert(paths["server_cert"]).verify_directly_issued_by(_cert(paths["ca_cert"]))
    assert not list(tmp_path.glob(".*.tmp"))


def test_replaced_files_keep_their_modes(tmp_path: Path) -> None:
    # written whole (fileio.write_atomic) with the mode set before the first byte
    for _ in range(2):
        paths = {**init_ca(tmp_path / "pki", force=True), **site_keys("a", tmp_path, force=True)}
        modes = {k: _mode(p) for k, p in paths.items()}
        assert modes == {
            "ca_key": 0o600,
            "server_key": 0o600,
            "private_key": 0o600,
            "ca_cert": 0o644,
            "server_cert": 0o644,
            "public_key": 0o644,
        }
    assert not list(tmp_path.rglob(".*.tmp"))


def test_site_keys_are_a_matching_p384_pair_flower_loads(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    paths = site_keys("hospital-a", out)
    assert paths["private_key"] == out / "hospital-a.key"
    assert paths["public_key"] == out / "hospital-a.pub"
    assert _mode(paths["private_key"]) == 0o600
    assert _mode(out) == 0o700
    # the loaders flower-supernode and `flwr supernode register` use
    private, public = _try_setup_client_authentication(
        argparse.Namespace(
            auth_supernode_private_key=str(paths["private_key"]),
            auth_supernode_public_key=None,
        )
    )
    registered = bytes_to_public_key(try_load_public_key(paths["public_key"]))
    assert isinstance(private.curve, ec.SECP384R1)
    assert registered.public_numbers() == public.public_numbers()
    message = b"fedhaven"
    signature = sign_message(private, message)
    assert verify_signature(registered, message, signature)
    assert not verify_signature(registered, b"tampered", signature)
    registered.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    kind, _, comment = paths["public_key"].read_text().split()
    assert (kind, comment) == ("ecdsa-sha2-nistp384", "hospital-a")


def test_two_sites_get_different_keys(tmp_path: Path) -> None:
    a, b = site_keys("a", tmp_path), site_keys("b", tmp_path)
    assert a["public_key"].read_bytes() != b["public_key"].read_bytes()


def test_site_keys_refuse_to_overwrite_without_force(tmp_path: Path) -> None:
    paths = site_keys("bank_1", tmp_path)
    before = _snapshot(paths)
    with pytest.raises(FedhavenError, match=r"bank_1\.key.*--force"):
        site_keys("bank_1", tmp_path)
    assert _snapshot(paths) == before
    again = site_keys("bank_1", tmp_path, force=True)
    after = _snapshot(again)
    assert all(after[k] != before[k] for k in paths)
    assert _mode(again["private_key"]) == 0o600


@pytest.mark.parametrize("name", ["", "site a", "../evil", "a/b", "naïve", "x.y"])
def test_bad_site_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(FedhavenError, match="letters, digits"):
        site_keys(name, tmp_path / "keys")
    assert not (tmp_path / "keys").exists()


def test_a_file_where_the_directory_should_be_is_an_error(tmp_path: Path) -> None:
    blocker = tmp_path / "pki"
    blocker.write_text("not a directory")
    with pytest.raises(FedhavenError, match="not a directory"):
        init_ca(blocker)
    assert blocker.read_text() == "not a directory"


def test_cli_creates_keys_and_refuses_to_overwrite_in_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fedhaven.cli", "certs", *args],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    assert cli("site", "site-a", str(tmp_path)).returncode == 0
    before = (tmp_path / "site-a.key").read_bytes()
    again = cli("site", "site-a", str(tmp_path))
    assert again.returncode == 2
    (line,) = again.stderr.strip().splitlines()
    assert line.startswith("error: ") and "pass --force" in line
    assert (tmp_path / "site-a.key").read_bytes() == before
    assert cli("init", str(tmp_path / "pki"), "--san", "coordinator.example").returncode == 0
    assert (tmp_path / "pki" / "server.pem").is_file()


# ---------------------------------------------------------------- checks before a handshake


def reissue(pki: Path, name: str, *, start: dt.datetime, end: dt.datetime) -> Path:
    """Replace ``pki/name`` (ca.crt or server.pem) by the same certificate — subject, key,
    extensions — valid from ``start`` to ``end`` only, signed by ``pki/ca.key``."""
    path = pki / name
    old = _cert(path)
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    builder = (
        x509.CertificateBuilder()
        .subject_name(old.subject)
        .issuer_name(old.issuer)
        .public_key(old.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
    )
    for ext in old.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    cert = builder.sign(ca_key, hashes.SHA384())  # type: ignore[arg-type]
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_checks_pass_what_init_ca_wrote_and_a_chain_ending_in_the_ca(tmp_path: Path) -> None:
    paths = init_ca(tmp_path)
    chain_file = tmp_path / "chain.pem"
    chain_file.write_bytes(paths["server_cert"].read_bytes() + paths["ca_cert"].read_bytes())
    (ca,) = read_certificates(paths["ca_cert"], "certificate", "fix")
    chain = read_certificates(chain_file, "certificate", "fix")
    assert [c.subject for c in chain] == [_cert(paths["server_cert"]).subject, ca.subject]
    check_is_ca(ca, paths["ca_cert"], "fix")
    check_issued_by(chain[:1], paths["server_cert"], ca, paths["ca_cert"], "fix")
    check_issued_by(chain, chain_file, ca, paths["ca_cert"], "fix")
    for cert in chain:
        check_valid_now(cert, chain_file, "certificate", "renew")


def test_a_certificate_of_another_ca_is_refused(tmp_path: Path) -> None:
    ours, theirs = init_ca(tmp_path / "ours"), init_ca(tmp_path / "theirs")
    server = read_certificates(ours["server_cert"], "certificate", "fix")
    (other_ca,) = read_certificates(theirs["ca_cert"], "certificate", "fix")
    with pytest.raises(FedhavenError) as info:
        check_issued_by(server, ours["server_cert"], other_ca, theirs["ca_cert"], "the fix")
    assert str(info.value) == (
        f"'{ours['server_cert']}' was not issued by '{theirs['ca_cert']}' (from another "
        "`fedhaven certs init`?): the fix"
    )


def test_validity_window_is_checked_at_both_ends(tmp_path: Path) -> None:
    init_ca(tmp_path)
    start = dt.datetime(2030, 1, 2, 3, 4, tzinfo=dt.UTC)
    path = reissue(tmp_path, "server.pem", start=start, end=start + dt.timedelta(days=1))
    cert = _cert(path)
    check_valid_now(cert, path, "certificate", "renew it", now=start)
    check_valid_now(cert, path, "certificate", "renew it", now=start + dt.timedelta(days=1))
    with pytest.raises(FedhavenError) as early:
        check_valid_now(cert, path, "certificate", "renew it", now=start - dt.timedelta(seconds=1))
    assert str(early.value) == (
        f"certificate '{path}' is not valid before 2030-01-02 03:04 UTC: check this machine's "
        "clock, or renew it"
    )
    with pytest.raises(FedhavenError) as late:
        check_valid_now(
            cert, path, "certificate", "renew it", now=start + dt.timedelta(days=1, seconds=1)
        )
    assert str(late.value) == f"certificate '{path}' expired on 2030-01-03: renew it"


def test_a_server_certificate_is_no_ca_and_garbage_no_certificate(tmp_path: Path) -> None:
    paths = init_ca(tmp_path)
    with pytest.raises(FedhavenError, match=r"server\.pem' is not a CA certificate.*: fix$"):
        check_is_ca(_cert(paths["server_cert"]), paths["server_cert"], "fix")
    garbage = tmp_path / "garbage.crt"
    garbage.write_bytes(b"\x00\x01 not a certificate")
    with pytest.raises(FedhavenError, match=r"CA certificate '.*garbage\.crt' is not a PEM"):
        read_certificates(garbage, "CA certificate", "fix")
