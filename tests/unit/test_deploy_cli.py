"""`fedhaven coordinator` and `fedhaven site`: the Flower command lines they build, and bad
input refused with one `error:` line, exit 2, before anything starts or is written."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.config import parse_config_args
from test_certs import reissue

from fedhaven.cli import main
from fedhaven.config import DATA_PATH, DELTA, EPSILON_BUDGET, LABEL_RULE, MIN_PER_CLASS, STATE_DIR
from fedhaven.datacheck import DataRules
from fedhaven.deploy import coordinator, site
from fedhaven.deploy.certs import init_ca, site_keys
from fedhaven.errors import FedhavenError

ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0


# ---------------------------------------------------------------- command lines


def test_superlink_command_with_tls_and_node_auth() -> None:
    certs = {"ca": Path("/p/ca.crt"), "cert": Path("/p/server.pem"), "key": Path("/p/server.key")}
    assert coordinator.superlink_command(
        certs=certs, database=Path("/s/superlink.db"), host="0.0.0.0", port=9093
    ) == [
        "flower-superlink",
        "--ssl-ca-certfile",
        "/p/ca.crt",
        "--ssl-certfile",
        "/p/server.pem",
        "--ssl-keyfile",
        "/p/server.key",
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host",
        "0.0.0.0",
        "--port",
        "9093",
        "--database",
        "/s/superlink.db",
    ]


def test_superlink_command_insecure() -> None:
    assert coordinator.superlink_command(
        certs=None, database=Path("/s/l.db"), port=1234, executable="/bin/flower-superlink"
    ) == [
        "/bin/flower-superlink",
        "--insecure",
        "--disable-runtime-dependency-installation",
        "--host",
        "127.0.0.1",
        "--port",
        "1234",
        "--database",
        "/s/l.db",
    ]


def test_supernode_command() -> None:
    assert site.supernode_command(
        superlink="link.example.org:9093",
        root_certificates=Path("/c/ca.crt"),
        private_key=Path("/k/site-a.key"),
        node_config="data-path='/d.csv'",
        port=9100,
        max_wait_s=30,
    ) == [
        "flower-supernode",
        "--root-certificates",
        "/c/ca.crt",
        "--superlink",
        "link.example.org:9093",
        "--auth-supernode-private-key",
        "/k/site-a.key",
        "--node-config",
        "data-path='/d.csv'",
        "--host",
        "127.0.0.1",
        "--port",
        "9100",
        "--max-wait-time",
        "30",
    ]


def test_supernode_command_insecure_never_installs_dependencies() -> None:
    command = site.supernode_command(
        superlink="127.0.0.1:9093", root_certificates=None, private_key=None, node_config=""
    )
    assert command[:2] == ["flower-supernode", "--insecure"]
    assert "--auth-supernode-private-key" not in command
    # Flower 1.42's SuperNode installs nothing unless this flag is given
    assert "--allow-runtime-dependency-installation" not in command


@pytest.mark.parametrize(
    "data",
    ["/data/site a.csv", "/data/it's.csv", "C:\\data\\x.csv", "/d/key=value.toml", "/d/ü.csv"],
)
def test_node_config_reads_back_through_flowers_parser(data: str) -> None:
    text = site.node_config_text(site.site_from_flags(Path(data), Path("/state dir"), 8, 1e-5))
    assert parse_config_args([text]) == {
        DATA_PATH: str(Path(data)),
        STATE_DIR: "/state dir",
        EPSILON_BUDGET: 8.0,
        DELTA: 1e-5,
    }


def test_node_config_carries_the_sites_data_rules() -> None:
    text = site.node_config_text(
        site.site_from_flags(Path("/d.csv"), Path("/s"), rules=DataRules("map", 3))
    )
    assert parse_config_args([text]) == {
        DATA_PATH: "/d.csv",
        STATE_DIR: "/s",
        LABEL_RULE: "map",
        MIN_PER_CLASS: 3,
    }
    assert DataRules.from_node(parse_config_args([text])) == DataRules("map", 3)


def test_node_config_leaves_out_unset_budget() -> None:
    text = site.node_config_text(site.site_from_flags(Path("/d.csv"), Path("/s")))
    assert text == "data-path='/d.csv' state-dir='/s'"


def test_node_config_refuses_a_path_flower_cannot_pass() -> None:
    with pytest.raises(FedhavenError, match="both"):
        site.node_config_text(site.site_from_flags(Path('/d/it\'s "x".csv'), Path("/s")))


def test_connection_config_and_run_line(tmp_path: Path) -> None:
    text = coordinator.connection_config("127.0.0.1:9093", Path("/p/ca.crt"))
    assert tomllib.loads(text)["superlink"] == {
        "default": coordinator.CONNECTION,
        coordinator.CONNECTION: {"address": "127.0.0.1:9093", "root-certificates": "/p/ca.crt"},
    }
    insecure = tomllib.loads(coordinator.connection_config("127.0.0.1:9093", None))
    assert insecure["superlink"][coordinator.CONNECTION]["insecure"] is True
    line = coordinator.run_line(tmp_path / "my home", "flwr", "/app", 3)
    assert line == (
        f"FLWR_HOME='{tmp_path}/my home' flwr run /app fedhaven --stream "
        "--run-config federation.sites=3"
    )


@pytest.mark.parametrize("address", ["127.0.0.1", "host:", ":9093", "https://h:9093", "h:99999"])
def test_bad_coordinator_address(address: str) -> None:
    with pytest.raises(FedhavenError, match="--coordinator"):
        site.parse_coordinator(address)


def test_ipv6_coordinator_address() -> None:
    assert site.parse_coordinator("[::1]:9093") == ("::1", 9093)


# ---------------------------------------------------------------- bad input, through the CLI


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` and its content (None for a directory)."""
    return {
        str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pki")
    init_ca(root / "pki")
    keys = site_keys("site-a", root / "keys")
    data = root / "site-a.csv"
    data.write_text("review,rating\ngood,positive\n")
    pem = root / "pem.key"
    pem.write_bytes(
        ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return {
        "certs": root / "pki",
        "key": keys["private_key"],
        "sites": root / "keys",
        "data": data,
        "pem": pem,
    }


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _cli(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["fedhaven", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def _refused(
    args: list[str], fragment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> str:
    """Exit 2, one `error:` line containing ``fragment``, nothing under tmp_path changed."""
    before = _tree(tmp_path)
    code, out, err = _cli(args, monkeypatch, capsys)
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2, (out, err)
    assert len(errors) == 1 and fragment in errors[0], err
    assert "Traceback" not in err + out
    assert "started" not in out  # no Flower process was started
    assert _tree(tmp_path) == before
    return err


def test_coordinator_missing_certs_dir(tmp_path: Path, monkeypatch, capsys) -> None:
    missing = tmp_path / "no-pki"
    err = _refused(
        ["coordinator", "--certs", str(missing), "--state", str(tmp_path / "state")],
        f"certificate directory '{missing}' not found",
        tmp_path,
        monkeypatch,
        capsys,
    )
    assert f"fedhaven certs init {missing}" in err


def test_coordinator_missing_server_cert(tmp_path: Path, monkeypatch, capsys) -> None:
    init_ca(tmp_path / "pki")
    (tmp_path / "pki" / "server.pem").unlink()
    err = _refused(
        ["coordinator", "--certs", str(tmp_path / "pki"), "--state", str(tmp_path / "state")],
        f"'{tmp_path / 'pki' / 'server.pem'}' not found",
        tmp_path,
        monkeypatch,
        capsys,
    )
    assert "fedhaven certs init" in err


def test_coordinator_server_key_of_another_pki(tmp_path: Path, monkeypatch, capsys) -> None:
    init_ca(tmp_path / "pki")
    init_ca(tmp_path / "other")
    (tmp_path / "pki" / "server.key").write_bytes((tmp_path / "other" / "server.key").read_bytes())
    _refused(
        ["coordinator", "--certs", str(tmp_path / "pki"), "--state", str(tmp_path / "state")],
        "is not the key of",
        tmp_path,
        monkeypatch,
        capsys,
    )


def test_coordinator_needs_certs(tmp_path: Path, monkeypatch, capsys) -> None:
    _refused(
        ["coordinator", "--state", str(tmp_path / "state")],
        "--certs DIR is required",
        tmp_path,
        monkeypatch,
        capsys,
    )


def test_coordinator_bad_site_key(
    tmp_path: Path, pki: dict[str, Path], monkeypatch, capsys
) -> None:
    sites = tmp_path / "sites"
    sites.mkdir()
    (sites / "site-x.pub").write_text("not a key\n")
    _refused(
        [*_coordinator_args(pki, tmp_path), "--sites", str(sites)],
        "site-x.pub' is not an OpenSSH EC public key",
        tmp_path,
        monkeypatch,
        capsys,
    )


def test_coordinator_empty_sites_dir(
    tmp_path: Path, pki: dict[str, Path], monkeypatch, capsys
) -> None:
    (tmp_path / "sites").mkdir()
    _refused(
        [*_coordinator_args(pki, tmp_path), "--sites", str(tmp_path / "sites")],
        "no *.pub file in",
        tmp_path,
        monkeypatch,
        capsys,
    )


def test_coordinator_port_in_use(
    tmp_path: Path, pki: dict[str, Path], busy_port: int, monkeypatch, capsys
) -> None:
    _refused(
        [*_coordinator_args(pki, tmp_path), "--port", str(busy_port)],
        f"port {busy_port} on 127.0.0.1 is in use",
        tmp_path,
        monkeypatch,
        capsys,
    )


def test_coordinator_insecure_warns_once_its_checks_pass(
    tmp_path: Path, busy_port: int, monkeypatch, capsys
) -> None:
    args = ["coordinator", "--insecure", "--state", str(tmp_path / "s"), "--port"]
    err = _refused([*args, str(busy_port)], "is in use", tmp_path, monkeypatch, capsys)
    assert coordinator.INSECURE_WARNING not in err  # a refused start: its one line only

    def stop(*_: object, **__: object) -> None:  # the first step after the checks
        raise FedhavenError("stopped after the checks")

    monkeypatch.setattr(coordinator, "make_private_dir", stop)
    err = _refused(
        [*args, str(_free_port())], "stopped after the checks", tmp_path, monkeypatch, capsys
    )
    assert f"warning: {coordinator.INSECURE_WARNING}" in err


def _copy_pki(pki: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(pki["certs"], tmp_path / "pki"))


_PAST = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
_FUTURE = dt.datetime.now(dt.UTC) + dt.timedelta(days=30)


@pytest.mark.parametrize(
    ("spoil", "fragment"),
    [
        (
            lambda d: reissue(d, "server.pem", start=_PAST, end=_PAST + dt.timedelta(days=1)),
            "certificate '{d}/server.pem' expired on 2020-01-02: renew with `fedhaven certs "
            "init {d} --force` (sites need the new ca.crt)",
        ),
        (
            lambda d: reissue(d, "ca.crt", start=_PAST, end=_PAST + dt.timedelta(days=1)),
            "certificate '{d}/ca.crt' expired on 2020-01-02",
        ),
        (
            lambda d: reissue(d, "server.pem", start=_FUTURE, end=_FUTURE + dt.timedelta(1)),
            "certificate '{d}/server.pem' is not valid before",
        ),
        (  # ca.crt of another `certs init`
            lambda d: shutil.copy(init_ca(d.parent / "other")["ca_cert"], d / "ca.crt"),
            "'{d}/server.pem' was not issued by '{d}/ca.crt' (from another `fedhaven certs "
            "init`?): put back the ca.crt that issued it, or create both anew",
        ),
        (
            lambda d: shutil.copy(d / "server.pem", d / "ca.crt"),
            "'{d}/ca.crt' is not a CA certificate",
        ),
        (
            lambda d: (d / "ca.crt").write_text("garbage"),
            "certificate '{d}/ca.crt' is not a PEM certificate",
        ),
        (
            lambda d: (d / "server.key").write_bytes(os.urandom(64)),
            "'{d}/server.key' is not an unencrypted PEM private key",
        ),
    ],
    ids=["expired", "ca-expired", "not-yet-valid", "other-ca", "not-a-ca", "bad-ca", "bad-key"],
)
def test_coordinator_refuses_bad_tls_files(
    spoil, fragment: str, tmp_path: Path, pki: dict[str, Path], monkeypatch, capsys
) -> None:
    certs = _copy_pki(pki, tmp_path)
    spoil(certs)
    _refused(
        ["coordinator", "--certs", str(certs), "--state", str(tmp_path / "state")],
        fragment.format(d=certs),
        tmp_path,
        monkeypatch,
        capsys,
    )


def test_coordinator_state_dir_not_writable(
    tmp_path: Path, pki: dict[str, Path], monkeypatch, capsys
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    _refused(
        ["coordinator", "--certs", str(pki["certs"]), "--state", str(blocker / "state")],
        f"state directory '{blocker / 'state'}' cannot be created",
        tmp_path,
        monkeypatch,
        capsys,
    )


@pytest.mark.skipif(ROOT_USER, reason="root reads and writes regardless of permissions")
def test_coordinator_unreadable_key_and_read_only_state(
    tmp_path: Path, pki: dict[str, Path], monkeypatch, capsys
) -> None:
    certs = _copy_pki(pki, tmp_path)
    (certs / "server.key").chmod(0)
    _refused(
        ["coordinator", "--certs", str(certs), "--state", str(tmp_path / "state")],
        f"TLS key '{certs / 'server.key'}' cannot be read",
        tmp_path,
        monkeypatch,
        capsys,
    )
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    _refused(
        ["coordinator", "--certs", str(pki["certs"]), "--state", str(locked / "state")],
        f"state directory '{locked / 'state'}' cannot be created",
        tmp_path,
        monkeypatch,
        capsys,
    )


def _coordinator_args(pki: dict[str, Path], tmp_path: Path) -> list[str]:
    return ["coordinator", "--certs", str(pki["certs"]), "--state", str(tmp_path / "s")]


def _site_args(pki: dict[str, Path], tmp_path: Path, **override: str) -> list[str]:
    values = {
        "--coordinator": "127.0.0.1:9093",
        "--certs": str(pki["certs"]),
        "--key": str(pki["key"]),
        "--data": str(pki["data"]),
        "--state": str(tmp_path / "state"),
        **override,
    }
    return ["site", *(x for kv in values.items() for x in kv)]


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"--data": "{tmp}/missing.csv"}, "data file '{tmp}/missing.csv' not found"),
        ({"--key": "{tmp}/missing.key"}, "site key '{tmp}/missing.key' not found"),
        ({"--key": "{tmp}"}, "site key '{tmp}' is not a file"),
        ({"--key": "{pem}"}, "'{pem}' is not an OpenSSH private key (it is a PEM key)"),
        ({"--key": "{data}"}, "'{data}' is not an OpenSSH private key: create"),
        ({"--certs": "{tmp}"}, "CA certificate '{tmp}/ca.crt' not found"),
        ({"--certs": "{data}"}, "'{data}' is not a PEM certificate"),
        ({"--coordinator": "localhost"}, "--coordinator 'localhost' is not HOST:PORT"),
        ({"--epsilon-budget": "-1"}, "--epsilon-budget -1 is invalid"),
        ({"--delta": "1"}, "--delta 1 is invalid"),
        ({"--state": "{data}/state"}, "state directory '{data}/state' cannot be created"),
    ],
)
def test_site_bad_input(
    override: dict[str, str],
    fragment: str,
    tmp_path: Path,
    pki: dict[str, Path],
    monkeypatch,
    capsys,
) -> None:
    fill = {"tmp": tmp_path, "pem": pki["pem"], "data": pki["data"]}
    override = {k: v.format(**fill) for k, v in override.items()}
    _refused(
        _site_args(pki, tmp_path, **override),
        fragment.format(**fill),
        tmp_path,
        monkeypatch,
        capsys,
    )


@pytest.mark.skipif(ROOT_USER, reason="root reads and writes regardless of permissions")
def test_site_unreadable_key_and_read_only_state(
    tmp_path: Path, pki: dict[str, Path], monkeypatch, capsys
) -> None:
    key = tmp_path / "site.key"
    key.write_bytes(pki["key"].read_bytes())
    key.chmod(0)
    _refused(
        _site_args(pki, tmp_path, **{"--key": str(key)}),
        f"site key '{key}' cannot be read",
        tmp_path,
        monkeypatch,
        capsys,
    )
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    _refused(
        _site_args(pki, tmp_path, **{"--state": str(locked / "state")}),
        f"state directory '{locked / 'state'}' cannot be created",
        tmp_path,
        monkeypatch,
        capsys,
    )


def test_site_port_in_use_leaves_state_alone(
    tmp_path: Path, pki: dict[str, Path], busy_port: int, monkeypatch, capsys
) -> None:
    _refused(
        _site_args(pki, tmp_path, **{"--port": str(busy_port)}),
        f"port {busy_port} on 127.0.0.1 is in use",
        tmp_path,
        monkeypatch,
        capsys,
    )


def test_site_insecure_refuses_a_key_and_warns_once_its_checks_pass(
    tmp_path: Path, pki: dict[str, Path], monkeypatch, capsys
) -> None:
    err = _refused(
        [*_site_args(pki, tmp_path), "--insecure"],
        "--insecure uses no certificate and no key",
        tmp_path,
        monkeypatch,
        capsys,
    )
    assert site.INSECURE_WARNING not in err  # a refused start: its one line only

    def stop(*_: object, **__: object) -> None:  # the first step after the checks
        raise FedhavenError("stopped after the checks")

    monkeypatch.setattr(site, "make_private_dir", stop)
    args = ["site", "--coordinator", "127.0.0.1:9093", "--data", str(pki["data"])]
    err = _refused(
        [*args, "--state", str(tmp_path / "state"), "--insecure", "--port", str(_free_port())],
        "stopped after the checks",
        tmp_path,
        monkeypatch,
        capsys,
    )
    assert f"warning: {site.INSECURE_WARNING}" in err


def test_site_refuses_an_expired_ca_or_a_server_certificate_as_ca(
    tmp_path: Path, pki: dict[str, Path], monkeypatch, capsys
) -> None:
    certs = _copy_pki(pki, tmp_path)
    _refused(
        _site_args(pki, tmp_path, **{"--certs": str(certs / "server.pem")}),
        f"'{certs / 'server.pem'}' is not a CA certificate (the coordinator's server.pem?)",
        tmp_path,
        monkeypatch,
        capsys,
    )
    reissue(certs, "ca.crt", start=_PAST, end=_PAST + dt.timedelta(days=1))
    _refused(
        _site_args(pki, tmp_path, **{"--certs": str(certs)}),
        f"CA certificate '{certs / 'ca.crt'}' expired on 2020-01-02: ask the coordinator for "
        "its new ca.crt",
        tmp_path,
        monkeypatch,
        capsys,
    )


def test_site_key_that_is_not_the_pair_of_its_pub(
    tmp_path: Path, pki: dict[str, Path], monkeypatch, capsys
) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    key = Path(shutil.copy(pki["key"], keys / "site-a.key"))
    # the site-a.pub beside it is another pair's: what the coordinator registered differs
    shutil.copy(site_keys("site-a", tmp_path / "other")["public_key"], keys / "site-a.pub")
    _refused(
        _site_args(pki, tmp_path, **{"--key": str(key)}),
        f"'{key}' is not the private half of '{keys / 'site-a.pub'}' beside it",
        tmp_path,
        monkeypatch,
        capsys,
    )


@contextlib.contextmanager
def _tls_server(cert: Path, key: Path) -> Iterator[int]:
    """A TLS server on loopback that presents ``cert`` (and completes handshakes only)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with contextlib.suppress(OSError), context.wrap_socket(conn, server_side=True):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


@pytest.mark.parametrize(
    ("server", "fragment"),
    [
        ("other-ca", "presents a TLS certificate that was not issued by '{ca}'"),
        ("other-name", "presents a TLS certificate that is not issued for the name '127.0.0.1'"),
        ("expired", "presents a TLS certificate that has expired: the coordinator must renew it"),
    ],
)
def test_site_checks_the_coordinators_certificate_before_starting(
    server: str, fragment: str, tmp_path: Path, pki: dict[str, Path], monkeypatch, capsys
) -> None:
    """What the SuperNode's handshake would refuse, said before it starts."""
    served = tmp_path / "served"
    if server == "other-ca":
        init_ca(served)
        ca = pki["certs"] / "ca.crt"
    elif server == "other-name":
        ca = init_ca(served, sans=("coordinator.example.org",))["ca_cert"]
    else:
        ca = Path(shutil.copytree(pki["certs"], served)) / "ca.crt"
        reissue(served, "server.pem", start=_PAST, end=_PAST + dt.timedelta(days=1))
    with _tls_server(served / "server.pem", served / "server.key") as port:
        address = f"127.0.0.1:{port}"
        err = _refused(
            _site_args(pki, tmp_path, **{"--coordinator": address, "--certs": str(ca)}),
            f"error: the coordinator at {address} " + fragment.format(ca=ca),
            tmp_path,
            monkeypatch,
            capsys,
        )
    assert "fedhaven certs init" in err


def test_coordinator_tls_check_passes_a_good_or_an_absent_coordinator(
    pki: dict[str, Path],
) -> None:
    ca = pki["certs"] / "ca.crt"
    with _tls_server(pki["certs"] / "server.pem", pki["certs"] / "server.key") as port:
        site.check_coordinator_tls("127.0.0.1", port, ca)
        site.check_coordinator_tls("localhost", port, ca)
    with socket.socket() as s:  # bound, not listening: connection refused
        s.bind(("127.0.0.1", 0))
        site.check_coordinator_tls("127.0.0.1", s.getsockname()[1], ca, timeout_s=1)


def test_explain_exit() -> None:
    key = Path("/k/x.key")
    refused = "ERROR: Exit Code: 305\n[code: 2004] Failed to activate SuperNode."
    assert "not registered" in site.explain_exit(1, refused, "h:1", key, 9)
    unreachable = "Giving up reconnection after 9.00 seconds\n[Errno 111] Connection refused"
    assert "could not reach the coordinator at h:1 within 9 s" in site.explain_exit(
        1, unreachable, "h:1", key, 9
    )
    lost = site.explain_exit(None, unreachable, "h:1", key, 9, connected=True)
    assert lost.startswith("lost the coordinator at h:1: no answer within 9 s")
    tls = "SSL/TLS handshake error detected.\n[SSL: CERTIFICATE_VERIFY_FAILED]"
    assert "TLS verification" in site.explain_exit(1, tls, "h:1", key, 9)
    assert site.explain_exit(3, "x\nlast words\n", "h:1", key, 9).endswith("code 3: last words")


def test_cli_process_prints_one_line(tmp_path: Path) -> None:
    """The real entry point, in its own process: no traceback, exit 2."""
    done = subprocess.run(
        [
            *(sys.executable, "-m", "fedhaven.cli", "coordinator"),
            *("--certs", str(tmp_path / "x"), "--state", str(tmp_path / "state")),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: certificate directory '{tmp_path / 'x'}' not found: create them with "
        f"`fedhaven certs init {tmp_path / 'x'}`"
    ]
    assert not (tmp_path / "state").exists()


# ---------------------------------------------------------------- activation retries

FAKE_SUPERNODE = """#!{python}
import pathlib, sys
tries = pathlib.Path({count!r})
n = int(tries.read_text()) + 1 if tries.exists() else 1
tries.write_text(str(n))
if n <= {refusals}:
    print("ERROR: Exit Code: 305\\n[code: 2004] Failed to activate SuperNode.", flush=True)
    sys.exit(1)
print("INFO: SuperNode ID: 42", flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_with_fake_supernode(
    tmp_path: Path,
    pki: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    refusals: int,
    max_wait_s: float = 60,
) -> Path:
    """Run ``site.serve`` against a SuperNode that is refused ``refusals`` times, then
    connects and ends; the file returned counts its starts."""
    count = tmp_path / "starts"
    fake = tmp_path / "flower-supernode"
    fake.write_text(
        FAKE_SUPERNODE.format(python=sys.executable, count=str(count), refusals=refusals)
    )
    fake.chmod(0o755)
    monkeypatch.setattr(site, "executable", lambda _: str(fake))
    monkeypatch.setattr(site, "ACTIVATION_RETRY_S", 0.05)
    site.serve(
        coordinator=f"127.0.0.1:{_free_port()}",  # nobody there: the TLS check passes
        certs=pki["certs"],
        key=pki["key"],
        data=pki["data"],
        state=tmp_path / "state",
        port=_free_port(),
        max_wait_s=max_wait_s,
    )
    return count


def test_a_refused_site_tries_again_until_the_coordinator_takes_it(
    tmp_path: Path, pki: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # a coordinator restarted after a crash refuses a site it still counts as connected
    count = _serve_with_fake_supernode(tmp_path, pki, monkeypatch, refusals=2)
    assert count.read_text() == "3"


def test_a_site_refused_for_all_of_max_wait_says_why_in_one_line(
    tmp_path: Path, pki: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(FedhavenError, match=r"refused this site's key .* for 2 s: it is not reg"):
        _serve_with_fake_supernode(tmp_path, pki, monkeypatch, refusals=10**6, max_wait_s=2)
    assert int((tmp_path / "starts").read_text()) >= 2  # it did try again
