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

from fedhaven.deploy.certs import init_ca, site_keys
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
