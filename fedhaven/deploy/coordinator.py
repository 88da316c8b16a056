"""``fedhaven coordinator``: a Flower SuperLink with TLS and SuperNode authentication.

It checks the PKI from ``fedhaven certs init``, starts ``flower-superlink`` (its database in
the state directory, runtime dependency installation off: sites and coordinator are
offline), waits until it answers, writes the ``flwr`` CLI's connection to it into
``STATE/flwr-home/config.toml``, registers the sites' public keys, prints the ``flwr run``
line that starts a federation, and stays in the foreground until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import json
import shlex
import shutil
import socket
import subprocess
import time
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedhaven.config import keys
from fedhaven.deploy.certs import (
    CA_CERT,
    PUBLIC_KEY_SUFFIX,
    SERVER_CERT,
    SERVER_KEY,
    check_is_ca,
    check_issued_by,
    check_valid_now,
    read_certificates,
)
from fedhaven.deploy.process import (
    FLWR_HOME_DIR,
    FlowerProcess,
    check_port_free,
    connect_host,
    executable,
    flower_env,
    interrupt_on_signals,
    make_private_dir,
    readable_file,
    say,
    warn,
)
from fedhaven.errors import FedhavenError

CONNECTION = "fedhaven"  # the flwr CLI's name for this SuperLink
DATABASE = "superlink.db"
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 9093
START_TIMEOUT_S = 60.0
_REGISTER_TIMEOUT_S = 60.0
INSECURE_WARNING = (
    "--insecure: no TLS and no SuperNode authentication; anyone who can reach the port can "
    "join the federation and read its traffic. Use it on a trusted test machine only."
)


def check_certs(certs: Path) -> dict[str, Path]:
    """The coordinator's TLS files in ``certs``, checked as the sites' TLS handshake will:
    the key is the certificate's, the CA issued the certificate, both are valid now."""
    fix = f"create them with `fedhaven certs init {certs}`"
    anew = f"`fedhaven certs init {certs} --force` (sites need the new {CA_CERT})"
    if not certs.is_dir():
        raise FedhavenError(f"certificate directory '{certs}' not found: {fix}")
    paths = {"ca": certs / CA_CERT, "cert": certs / SERVER_CERT, "key": certs / SERVER_KEY}
    ca = read_certificates(paths["ca"], "certificate", f"{fix} (with --force to replace)")[0]
    chain = read_certificates(paths["cert"], "certificate", f"{fix} (with --force to replace)")
    raw = readable_file(paths["key"], "TLS key", fix)
    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise FedhavenError(
            f"'{paths['key']}' is not an unencrypted PEM private key: {fix} "
            "(with --force to replace)"
        ) from None
    if key.public_key() != chain[0].public_key():
        raise FedhavenError(
            f"'{paths['key']}' is not the key of '{paths['cert']}': {fix} "
            "(with --force to replace both)"
        )
    check_is_ca(ca, paths["ca"], f"put back the {CA_CERT} that issued {SERVER_CERT}, or {anew}")
    for cert, path in [(ca, paths["ca"]), *((c, paths["cert"]) for c in chain)]:
        check_valid_now(cert, path, "certificate", f"renew with {anew}")
    check_issued_by(
        chain,
        paths["cert"],
        ca,
        paths["ca"],
        f"put back the {CA_CERT} that issued it, or create both anew with {anew}",
    )
    return paths


def site_public_keys(sites: Path) -> list[Path]:
    """Every ``*.pub`` in ``sites``, each checked to be an OpenSSH EC public key."""
    fix = "put each site's NAME.pub (from `fedhaven certs site NAME DIR`) there"
    if not sites.is_dir():
        raise FedhavenError(f"sites directory '{sites}' not found: {fix}")
    found = sorted(sites.glob(f"*{PUBLIC_KEY_SUFFIX}"))
    if not found:
        raise FedhavenError(f"no *{PUBLIC_KEY_SUFFIX} file in '{sites}': {fix}")
    for path in found:
        raw = readable_file(path, "site public key", fix)
        try:
            key = serialization.load_ssh_public_key(raw)
        except (ValueError, UnsupportedAlgorithm):
            key = None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise FedhavenError(
                f"'{path}' is not an OpenSSH EC public key: use the NAME.pub written by "
                "`fedhaven certs site NAME DIR`"
            )
    return found


def superlink_command(
    *,
    certs: dict[str, Path] | None,
    database: Path,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    executable: str = "flower-superlink",
) -> list[str]:
    """The ``flower-superlink`` command line; ``certs`` None means --insecure."""
    command = [executable]
    if certs is None:
        command += ["--insecure"]
    else:
        command += [
            "--ssl-ca-certfile",
            str(certs["ca"]),
            "--ssl-certfile",
            str(certs["cert"]),
            "--ssl-keyfile",
            str(certs["key"]),
            "--enable-supernode-auth",
        ]
    return [
        *command,
        "--disable-runtime-dependency-installation",
        "--host",
        host,
        "--port",
        str(port),
        "--database",
        str(database),
    ]


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string without control characters is a TOML string


def connection_config(address: str, root_certificates: Path | None) -> str:
    """The flwr CLI's ``config.toml``: one SuperLink connection, the default."""
    lines = [
        "# Written by `fedhaven coordinator`: the flwr CLI's connection to this SuperLink.",
        "[superlink]",
        f"default = {_toml_string(CONNECTION)}",
        "",
        f"[superlink.{CONNECTION}]",
        f"address = {_toml_string(address)}",
    ]
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {_toml_string(str(root_certificates))}")
    return "\n".join(lines) + "\n"


def app_dir() -> str:
    """fedhaven's Flower app directory (its pyproject.toml) when run from a checkout."""
    import fedhaven

    root = Path(fedhaven.__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and "[tool.flwr.app]" in pyproject.read_text(errors="replace"):
        return str(root)
    return "."


def run_line(flwr_home: Path, flwr: str, app: str, sites: int | None) -> str:
    """The shell line that starts a federated run on this coordinator."""
    words = [f"FLWR_HOME={shlex.quote(str(flwr_home))}", shlex.quote(flwr), "run"]
    words += [shlex.quote(app), CONNECTION, "--stream"]
    if sites:
        words += ["--run-config", shlex.quote(f"{keys.FEDERATION_SITES}={sites}")]
    return " ".join(words)


def _wait_until_up(link: FlowerProcess, host: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = link.poll()
        if code is not None:
            last = _last_line(link.output())
            raise FedhavenError(
                f"flower-superlink exited with code {code} while starting"
                + (f" ({last})" if last else "")
                + ": see its output above"
            )
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.25)
    raise FedhavenError(
        f"the SuperLink did not answer on {host}:{port} within {timeout_s:g} s: see its "
        "output above"
    )


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def register_site(public_key: Path, flwr: str, env: dict[str, str]) -> str:
    """Register one site's key with ``flwr supernode register``; a key the SuperLink
    already holds is left as it is. Returns a line saying which."""
    command = [flwr, "supernode", "register", str(public_key), CONNECTION, "--format", "json"]
    try:
        done = subprocess.run(
            command,
            env=env,
            capture_output=True,
            text=True,
            timeout=_REGISTER_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise FedhavenError(
            f"registering '{public_key}' took over {_REGISTER_TIMEOUT_S:g} s: is the "
            "SuperLink overloaded?"
        ) from None
    try:
        reply = json.loads(done.stdout[done.stdout.index("{") :])
    except ValueError:
        reply = {}
    name = public_key.name.removesuffix(PUBLIC_KEY_SUFFIX)
    if reply.get("success"):
        return f"site {name}: registered (node {reply['node-id']})"
    message = str(reply.get("error-message") or done.stderr or done.stdout)
    if "already in use" in message.lower():
        return f"site {name}: already registered"
    raise FedhavenError(
        f"`flwr supernode register {public_key}` failed: " + " ".join(_last_line(message).split())
    )


def serve(
    *,
    certs: Path | None,
    state: Path,
    sites: Path | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    insecure: bool = False,
    start_timeout_s: float = START_TIMEOUT_S,
) -> None:
    """Run the coordinator in the foreground until Ctrl-C or SIGTERM."""
    if insecure:
        if sites is not None:
            raise FedhavenError(
                "--sites registers keys for SuperNode authentication, which --insecure "
                "turns off: drop one of them"
            )
        tls = None
    else:
        if certs is None:
            raise FedhavenError(
                "--certs DIR is required: the coordinator's PKI from `fedhaven certs init DIR`"
            )
        tls = {k: p.resolve() for k, p in check_certs(certs).items()}
    site_keys = site_public_keys(sites) if sites is not None else []
    superlink, flwr = executable("flower-superlink"), executable("flwr")
    check_port_free(host, port)
    if insecure:  # after the checks: a refused start prints its one line only
        warn(INSECURE_WARNING)

    # Checks done: from here on the state directory is written.
    state = make_private_dir(state.expanduser().resolve(), "state directory")
    flwr_home = make_private_dir(state / FLWR_HOME_DIR, "Flower directory")
    address = f"{connect_host(host)}:{port}"
    (flwr_home / "config.toml").write_text(connection_config(address, tls["ca"] if tls else None))
    env = flower_env(flwr_home)
    command = superlink_command(
        certs=tls, database=state / DATABASE, host=host, port=port, executable=superlink
    )
    with interrupt_on_signals():
        link = None
        try:
            link = FlowerProcess("flower-superlink", command, env)
            _wait_until_up(link, connect_host(host), port, start_timeout_s)
            for key in site_keys:
                say(register_site(key, flwr, env))
            say(f"SuperLink up on {host}:{port}; start a run from anywhere with:")
            shown = "flwr" if shutil.which("flwr") == flwr else flwr
            say(f"  {run_line(flwr_home, shown, app_dir(), len(site_keys))}")
            say("Ctrl-C stops the coordinator.")
            code = link.wait()
            last = _last_line(link.output())
            raise FedhavenError(
                f"flower-superlink exited with code {code}"
                + (f" ({last})" if last else "")
                + ": see its output above"
            )
        except KeyboardInterrupt:
            say("stopping the SuperLink")
        finally:
            if link is not None:
                link.stop()
