"""``fedhaven site``: a Flower SuperNode that serves fedhaven's ClientApp at one site.

The site's own settings (data file, state directory, ε budget, δ, LoRA rank) go into the
SuperNode's node config, which only the site sets; the coordinator cannot change them. The
inputs are checked before anything starts, the SuperNode verifies the coordinator against its
CA certificate and authenticates with the site's OpenSSH key, installs nothing at run time
(Flower 1.42's SuperNode only does with --allow-runtime-dependency-installation), and gives
up after a bounded wait when the coordinator cannot be reached.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedhaven.datacheck import DataRules
from fedhaven.deploy import warm
from fedhaven.deploy.certs import (
    CA_CERT,
    PUBLIC_KEY_SUFFIX,
    check_is_ca,
    check_valid_now,
    read_certificates,
)
from fedhaven.deploy.process import (
    FLWR_HOME_DIR,
    FlowerProcess,
    check_port,
    check_port_free,
    executable,
    flower_env,
    interrupt_on_signals,
    make_private_dir,
    readable_file,
    resolve,
    say,
    warn,
)
from fedhaven.errors import FedhavenError
from fedhaven.site_config import SiteConfig

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 9094  # the SuperNode's local Runtime API
MAX_WAIT_S = 120.0
# What flower-supernode 1.42 logs when it stops retrying the SuperLink. At startup it then
# exits; after a connection was up it only logs the error and keeps running, unconnected.
GAVE_UP = "Giving up reconnection"
#: Seconds between tries when the coordinator refuses to activate the site's key.
ACTIVATION_RETRY_S = 10.0
CONNECTED = "SuperNode ID:"
TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # seconds; Flower 1.42 reads it
# OpenSSL's verify codes (X509_V_ERR_*) that have a fix of their own
_CERT_NOT_YET_VALID, _CERT_EXPIRED, _NAME_MISMATCH = 9, 10, (62, 64)  # 64: an IP address
INSECURE_WARNING = (
    "--insecure: no TLS and no SuperNode authentication; the coordinator is not verified "
    "and the traffic is readable. Use it on a trusted test machine only."
)


def parse_coordinator(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT`` for IPv6) of the coordinator's SuperLink."""
    host, sep, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or "://" in address:
        raise FedhavenError(
            f"--coordinator {address!r} is not HOST:PORT: e.g. coordinator.example.org:9093"
        )
    port = int(port_text)
    check_port(port, "--coordinator port")
    return host, port


def check_ca(certs: Path) -> Path:
    """The CA certificate the coordinator's certificate is checked against: a CA, valid now."""
    path = certs / CA_CERT if certs.is_dir() else certs
    fix = f"give the coordinator's {CA_CERT} (or its directory) from `fedhaven certs init`"
    ca = read_certificates(path, "CA certificate", fix)[0]
    check_is_ca(ca, path, fix)
    check_valid_now(ca, path, "CA certificate", f"ask the coordinator for its new {CA_CERT}")
    return path


def check_key(key: Path) -> Path:
    """The site's private key, in the OpenSSH format ``flower-supernode`` reads."""
    fix = "create the site's key pair with `fedhaven certs site NAME DIR` and give NAME.key"
    raw = readable_file(key, "site key", fix)
    try:
        private = serialization.load_ssh_private_key(raw, password=None)
    except TypeError:
        raise FedhavenError(
            f"'{key}' is password-protected: Flower reads an unencrypted key; {fix}"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        kind = " (it is a PEM key)" if b"-----BEGIN" in raw and b"OPENSSH" not in raw else ""
        raise FedhavenError(f"'{key}' is not an OpenSSH private key{kind}: {fix}") from None
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise FedhavenError(f"'{key}' is not an elliptic-curve key, as Flower needs: {fix}")
    # NAME.pub beside NAME.key is what the coordinator registered: a key that is not its
    # pair would only be refused by the coordinator, after the SuperNode started.
    public = key.with_suffix(PUBLIC_KEY_SUFFIX)
    try:
        registered = serialization.load_ssh_public_key(public.read_bytes())
    except (OSError, ValueError, UnsupportedAlgorithm):
        return key  # no readable public half here: only the coordinator can tell
    if registered != private.public_key():
        raise FedhavenError(
            f"'{key}' is not the private half of '{public}' beside it: one of them was "
            "replaced; give the NAME.key whose NAME.pub the coordinator registered, or make "
            "a new pair with `fedhaven certs site NAME DIR --force` and send its NAME.pub"
        )
    return key


def check_coordinator_tls(host: str, port: int, ca: Path, timeout_s: float = 5.0) -> None:
    """If the coordinator answers, check its certificate against ``ca`` as the SuperNode
    will (issuer, validity, host name), so a wrong CA is one line now, not a failed
    handshake later. An unreachable coordinator is the SuperNode's to wait for."""
    context = ssl.create_default_context(cafile=str(ca))
    where = f"{host}:{port}"
    try:
        with (
            socket.create_connection((host, port), timeout=timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            return
    except ssl.SSLCertVerificationError as e:
        code, message = e.verify_code, e.verify_message
    except (OSError, ssl.SSLError):
        return
    if code in _NAME_MISMATCH:
        why = (
            f"is not issued for the name '{host}': use a name it was issued for in "
            f"--coordinator, or have it re-issued with `fedhaven certs init DIR --san {host}`"
        )
    elif code == _CERT_EXPIRED:
        why = "has expired: the coordinator must renew it (`fedhaven certs init DIR --force`)"
    elif code == _CERT_NOT_YET_VALID:
        why = "is not valid yet: check the clocks of this machine and the coordinator"
    else:
        why = (
            f"was not issued by '{ca}' ({message}): --certs must be the {CA_CERT} "
            "of the coordinator's current `fedhaven certs init`"
        )
    raise FedhavenError(f"the coordinator at {where} presents a TLS certificate that {why}")


def check_data(data: Path) -> Path:
    readable_file(data, "data file", "give the site's labeled data (csv, jsonl or parquet)")
    return data


def _toml_value(value: str | float) -> str:
    """A TOML value Flower's ``--node-config`` parser reads back unchanged: it splits on
    spaces outside quotes and knows no escaped quotes, so strings are literal ('...')."""
    if isinstance(value, int | float):
        return repr(value)
    if any(ord(c) < 32 or c == "\x7f" for c in value):
        raise FedhavenError(f"path {value!r} contains control characters: rename it")
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return '"' + value.replace("\\", "\\\\") + '"'
    raise FedhavenError(f"path {value!r} contains both ' and \": Flower cannot pass it on")


def site_from_flags(
    data: Path,
    state: Path,
    epsilon_budget: float | None = None,
    delta: float | None = None,
    lora_rank: int | None = None,
    rules: DataRules | None = None,
) -> SiteConfig:
    """The site's own settings from the launcher's flags (unchecked: :meth:`SiteConfig.check`)."""
    return SiteConfig(
        data_path=str(data),
        state_dir=str(state),
        label_rule=None if rules is None else rules.label_rule,
        min_per_class=None if rules is None else rules.min_per_class,
        epsilon_budget=None if epsilon_budget is None else float(epsilon_budget),
        delta=None if delta is None else float(delta),
        lora_rank=None if lora_rank is None else int(lora_rank),
    )


def node_config_text(site: SiteConfig) -> str:
    """``site`` as the SuperNode's ``--node-config`` (the keys it sets)."""
    return " ".join(f"{k}={_toml_value(v)}" for k, v in site.items())


def supernode_command(
    *,
    superlink: str,
    root_certificates: Path | None,
    private_key: Path | None,
    node_config: str,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    max_wait_s: float | None = MAX_WAIT_S,
    executable: str = "flower-supernode",
) -> list[str]:
    """The ``flower-supernode`` command line; no root certificates means --insecure."""
    command = [executable]
    if root_certificates is None:
        command += ["--insecure"]
    else:
        command += ["--root-certificates", str(root_certificates)]
    command += ["--superlink", superlink]
    if private_key is not None:
        command += ["--auth-supernode-private-key", str(private_key)]
    command += ["--node-config", node_config, "--host", host, "--port", str(port)]
    if max_wait_s is not None:
        command += ["--max-wait-time", f"{max_wait_s:g}"]
    return command


def refused(output: str) -> bool:
    """Whether the SuperNode ended because the coordinator would not activate its key."""
    return "Failed to activate SuperNode" in output or "[code: 2004]" in output


def explain_exit(
    code: int | None,
    output: str,
    superlink: str,
    key: Path | None,
    max_wait_s: float,
    connected: bool = False,
) -> str:
    """One line saying why the SuperNode ended, from what it printed last and whether it
    had been connected."""
    if refused(output):
        return (
            f"the coordinator at {superlink} refused this site's key '{key}' for "
            f"{max_wait_s:g} s: it is not registered there (send NAME.pub to the coordinator, "
            "who registers it: `fedhaven coordinator --sites DIR`), or another process "
            "serves this site with the same key (stop it)"
        )
    if "CERTIFICATE_VERIFY_FAILED" in output or "SSL/TLS handshake" in output:
        return (
            f"TLS verification of the coordinator at {superlink} failed: --certs must be the "
            f"coordinator's {CA_CERT}, and the host must be one of its certificate's names "
            "(`fedhaven certs init --san HOST`)"
        )
    if GAVE_UP in output and connected:
        return (
            f"lost the coordinator at {superlink}: no answer within {max_wait_s:g} s; start "
            "the site again once the coordinator runs (raise --max-wait to ride out outages)"
        )
    if GAVE_UP in output or "Connection refused" in output:
        return (
            f"could not reach the coordinator at {superlink} within {max_wait_s:g} s: check "
            "the address and that `fedhaven coordinator` runs there"
        )
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    ended = "stopped answering" if code is None else f"exited with code {code}"
    return f"flower-supernode {ended}" + (f": {lines[-1]}" if lines else "")


@contextlib.contextmanager
def _warm_start(env: dict[str, str]) -> Iterator[dict[str, str]]:
    """The warm process, running while the site does; yields the SuperNode's environment,
    whose PATH starts with the launcher that hands each message to it."""
    real = executable("flwr-clientapp")
    # A private directory with a short path: a Unix socket's path is limited to ~100 bytes.
    with tempfile.TemporaryDirectory(prefix="fedhaven-site-") as tmp:
        sock = Path(tmp) / warm.SOCKET_NAME
        warm.install_launcher(Path(tmp), sock, real)
        process = FlowerProcess(
            "warm start", [sys.executable, "-m", "fedhaven.deploy.warm", str(sock)], env
        )
        try:
            yield {**env, "PATH": tmp + os.pathsep + env["PATH"]}
        finally:
            process.stop()


def _tls_inputs(
    certs: Path | None, key: Path | None, insecure: bool
) -> tuple[Path | None, Path | None]:
    """(CA certificate, site key), checked; ``(None, None)`` with ``insecure``."""
    if insecure:
        if certs is not None or key is not None:
            raise FedhavenError(
                "--insecure uses no certificate and no key: drop --certs and --key, or --insecure"
            )
        return None, None
    if certs is None or key is None:
        raise FedhavenError(
            "--certs (the coordinator's ca.crt) and --key (this site's NAME.key) are "
            "required: the coordinator gives out ca.crt, `fedhaven certs site` makes the key"
        )
    return check_ca(certs).resolve(), check_key(key).resolve()


def _run_supernode(
    command: list[str], env: dict[str, str], coordinator: str, max_wait_s: float, warm_start: bool
) -> tuple[FlowerProcess, int | None] | None:
    """Run the SuperNode until it ends (the ended process and its exit code, ``None``: it
    gave up but still ran) or until Ctrl-C (``None``)."""
    deadline = time.monotonic() + max_wait_s
    with interrupt_on_signals(), contextlib.ExitStack() as stack:
        if warm_start:
            env = stack.enter_context(_warm_start(env))
        while True:
            node = None
            try:
                node = FlowerProcess(
                    "flower-supernode",
                    command,
                    env,
                    watch=(CONNECTED,),
                    fatal=(GAVE_UP,),
                )
                say(f"site connecting to the coordinator at {coordinator}; Ctrl-C stops it.")
                code = node.wait()
                # A site restarted soon after a crash (its own or the coordinator's) is still
                # online in the coordinator's eyes, which refuses it like an unknown key until
                # its heartbeats lapse (Flower: 2 x 30 s): try again while --max-wait allows.
                retry = code != 0 and refused(node.output()) and CONNECTED not in node.seen
                if retry and time.monotonic() + ACTIVATION_RETRY_S < deadline:
                    say(
                        f"the coordinator refused this site's key; trying again in "
                        f"{ACTIVATION_RETRY_S:g} s (a site it still counts as connected is "
                        "freed about a minute after its last heartbeat)"
                    )
                    node.stop()
                    time.sleep(ACTIVATION_RETRY_S)
                    continue
            except KeyboardInterrupt:
                say("stopping the SuperNode")
                return None
            finally:
                if node is not None:
                    node.stop()
            return node, code


def serve(
    *,
    coordinator: str,
    certs: Path | None,
    key: Path | None,
    data: Path,
    state: Path,
    epsilon_budget: float | None = None,
    delta: float | None = None,
    lora_rank: int | None = None,
    rules: DataRules | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    max_wait_s: float = MAX_WAIT_S,
    insecure: bool = False,
    warm_start: bool = True,
) -> None:
    """Run the site's SuperNode in the foreground until Ctrl-C or SIGTERM.

    With ``warm_start`` the site keeps one process with the ClientApp's imports done and
    forks it for each message (:mod:`fedhaven.deploy.warm`).
    """
    link_host, link_port = parse_coordinator(coordinator)
    resolve(link_host, link_port)  # a name that resolves nowhere fails now, not in 120 s
    ca, private_key = _tls_inputs(certs, key, insecure)
    data = check_data(data).resolve()
    site = site_from_flags(data, state, epsilon_budget, delta, lora_rank, rules).check(flags=True)
    if not (max_wait_s > 0 and math.isfinite(max_wait_s)):
        raise FedhavenError(f"--max-wait {max_wait_s:g} is invalid: give seconds, e.g. 120")
    supernode = executable("flower-supernode")
    check_port_free(host, port)
    if ca is not None:
        check_coordinator_tls(link_host, link_port, ca)
    if insecure:  # after the checks: a refused start prints its one line only
        warn(INSECURE_WARNING)

    # Checks done: from here on the state directory is written.
    state = make_private_dir(state.expanduser().resolve(), "state directory")
    flwr_home = make_private_dir(state / FLWR_HOME_DIR, "Flower directory")
    command = supernode_command(
        superlink=coordinator,
        root_certificates=ca,
        private_key=private_key,
        node_config=node_config_text(replace(site, state_dir=str(state))),
        host=host,
        port=port,
        max_wait_s=max_wait_s,
        executable=supernode,
    )
    env = flower_env(flwr_home)
    # Flower's SuperExec looks for a message to start every second by default; a tenth of
    # that costs nothing next to training and takes ~0.45 s off each message's wait.
    env.setdefault(TASK_POLL_ENV, "0.1")
    ended = _run_supernode(command, env, coordinator, max_wait_s, warm_start)
    if ended is None:
        return
    node, code = ended
    if code != 0:
        connected = CONNECTED in node.seen
        output = node.output()
        raise FedhavenError(
            explain_exit(code, output, coordinator, private_key, max_wait_s, connected)
        )
    say("the SuperNode stopped")
