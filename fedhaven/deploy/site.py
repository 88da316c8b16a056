"""``fedhaven site``: a Flower SuperNode that serves fedhaven's ClientApp at one site.

The site's own settings (data file, state directory, ε budget, δ) go into the SuperNode's
node config, which only the site sets; the coordinator cannot change them. The inputs are
checked before anything starts, the SuperNode verifies the coordinator against its CA
certificate and authenticates with the site's OpenSSH key, installs nothing at run time
(Flower 1.42's SuperNode only does with --allow-runtime-dependency-installation), and gives
up after a bounded wait when the coordinator cannot be reached.
"""

from __future__ import annotations

import math
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedhaven.config import DATA_PATH, DELTA, EPSILON_BUDGET, STATE_DIR
from fedhaven.deploy.certs import CA_CERT
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
    say,
    warn,
)
from fedhaven.errors import FedhavenError

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 9094  # the SuperNode's local Runtime API
MAX_WAIT_S = 120.0
# What flower-supernode 1.42 logs when it stops retrying the SuperLink. At startup it then
# exits; after a connection was up it only logs the error and keeps running, unconnected.
GAVE_UP = "Giving up reconnection"
CONNECTED = "SuperNode ID:"
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
    """The CA certificate the coordinator's certificate is checked against."""
    path = certs / CA_CERT if certs.is_dir() else certs
    fix = f"give the coordinator's {CA_CERT} (or its directory) from `fedhaven certs init`"
    raw = readable_file(path, "CA certificate", fix)
    try:
        x509.load_pem_x509_certificate(raw)
    except ValueError:
        raise FedhavenError(f"'{path}' is not a PEM certificate: {fix}") from None
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
    return key


def check_data(data: Path) -> Path:
    readable_file(data, "data file", "give the site's labeled data (csv, jsonl or parquet)")
    return data


def _toml_value(value: str | float) -> str:
    """A TOML value Flower's ``--node-config`` parser reads back unchanged: it splits on
    spaces outside quotes and knows no escaped quotes, so strings are literal ('...')."""
    if isinstance(value, float):
        return repr(value)
    if any(ord(c) < 32 or c == "\x7f" for c in value):
        raise FedhavenError(f"path {value!r} contains control characters: rename it")
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return '"' + value.replace("\\", "\\\\") + '"'
    raise FedhavenError(f"path {value!r} contains both ' and \": Flower cannot pass it on")


def node_config(
    data: Path, state: Path, epsilon_budget: float | None = None, delta: float | None = None
) -> str:
    """The SuperNode's ``--node-config``: the site's own settings, for the ClientApp."""
    items: dict[str, str | float] = {DATA_PATH: str(data), STATE_DIR: str(state)}
    if epsilon_budget is not None:
        items[EPSILON_BUDGET] = float(epsilon_budget)
    if delta is not None:
        items[DELTA] = float(delta)
    return " ".join(f"{k}={_toml_value(v)}" for k, v in items.items())


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
    if "Failed to activate SuperNode" in output or "[code: 2004]" in output:
        return (
            f"the coordinator at {superlink} refused this site's key '{key}': it is not "
            "registered there; send NAME.pub to the coordinator, who registers it "
            "(`fedhaven coordinator --sites DIR`)"
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


def serve(
    *,
    coordinator: str,
    certs: Path | None,
    key: Path | None,
    data: Path,
    state: Path,
    epsilon_budget: float | None = None,
    delta: float | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    max_wait_s: float = MAX_WAIT_S,
    insecure: bool = False,
) -> None:
    """Run the site's SuperNode in the foreground until Ctrl-C or SIGTERM."""
    parse_coordinator(coordinator)
    if insecure:
        warn(INSECURE_WARNING)
        if certs is not None or key is not None:
            raise FedhavenError(
                "--insecure uses no certificate and no key: drop --certs and --key, or --insecure"
            )
        ca = private_key = None
    else:
        if certs is None or key is None:
            raise FedhavenError(
                "--certs (the coordinator's ca.crt) and --key (this site's NAME.key) are "
                "required: the coordinator gives out ca.crt, `fedhaven certs site` makes the key"
            )
        ca = check_ca(certs).resolve()
        private_key = check_key(key).resolve()
    data = check_data(data).resolve()
    if epsilon_budget is not None and not (0 < epsilon_budget and math.isfinite(epsilon_budget)):
        raise FedhavenError(
            f"--epsilon-budget {epsilon_budget:g} is invalid: give a positive number, e.g. 8"
        )
    if delta is not None and not 0 < delta < 1:
        raise FedhavenError(f"--delta {delta:g} is invalid: give a number in (0, 1), e.g. 1e-5")
    if not (max_wait_s > 0 and math.isfinite(max_wait_s)):
        raise FedhavenError(f"--max-wait {max_wait_s:g} is invalid: give seconds, e.g. 120")
    supernode = executable("flower-supernode")
    check_port_free(host, port)

    # Checks done: from here on the state directory is written.
    state = make_private_dir(state.expanduser().resolve(), "state directory")
    flwr_home = make_private_dir(state / FLWR_HOME_DIR, "Flower directory")
    command = supernode_command(
        superlink=coordinator,
        root_certificates=ca,
        private_key=private_key,
        node_config=node_config(data, state, epsilon_budget, delta),
        host=host,
        port=port,
        max_wait_s=max_wait_s,
        executable=supernode,
    )
    with interrupt_on_signals():
        node = None
        try:
            node = FlowerProcess(
                "flower-supernode",
                command,
                flower_env(flwr_home),
                watch=(CONNECTED,),
                fatal=(GAVE_UP,),
            )
            say(f"site connecting to the coordinator at {coordinator}; Ctrl-C stops it.")
            code = node.wait()
        except KeyboardInterrupt:
            say("stopping the SuperNode")
            return
        finally:
            if node is not None:
                node.stop()
    if code != 0:
        connected = CONNECTED in node.seen
        output = node.output()
        raise FedhavenError(
            explain_exit(code, output, coordinator, private_key, max_wait_s, connected)
        )
    say("the SuperNode stopped")
