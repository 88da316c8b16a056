"""What the coordinator and a site share: Flower's executables, an offline environment,
input checks, and one Flower process kept in the foreground and stopped cleanly.

The Flower process runs in its own process group (its session): the SuperLink and the
SuperNode start a ``flower-superexec`` child, and the SuperNode a ``flwr-clientapp`` per
message, so stopping means signalling the whole group. Its output passes through to ours,
and its last lines are kept to explain an exit.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedhaven.errors import FedhavenError

DIR_MODE = 0o700
FLWR_HOME_DIR = "flwr-home"  # Flower's own directory (FLWR_HOME) inside a state dir
_STOP_GRACE_S = 15.0  # SIGTERM, then this long for the group to go, then SIGKILL
_TAIL_LINES = 200


def executable(name: str) -> str:
    """``name`` from this environment's bin directory, else from PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise FedhavenError(
            f"'{name}' not found: install fedhaven's dependencies (flwr 1.42) in this "
            "environment, or put their bin directory on PATH"
        )
    return found


def flower_env(flwr_home: Path) -> dict[str, str]:
    """This process's environment, offline (no telemetry, hub or runtime installs), with
    Flower's directory in ``flwr_home`` and Flower's executables first on PATH (the
    SuperLink and SuperNode start ``flower-superexec`` and the apps from PATH)."""
    from fedhaven.simulations import OFFLINE_ENV

    env = {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(flwr_home)}
    bindir = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    if path.split(os.pathsep)[0] != bindir:
        env["PATH"] = bindir + (os.pathsep + path if path else "")
    return env


def make_private_dir(path: Path, what: str) -> Path:
    """Create ``path`` (mode 0700) if needed and check that it is a writable directory."""
    if path.exists() and not path.is_dir():
        raise FedhavenError(f"{what} '{path}' is not a directory: choose a directory path")
    try:
        path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        probe = path / f".write-test-{secrets.token_hex(4)}"
        probe.touch(mode=0o600, exist_ok=False)
        probe.unlink()
    except OSError as e:
        reason = e.strerror or str(e)
        raise FedhavenError(
            f"{what} '{path}' cannot be created or written ({reason}): choose a directory "
            "this user can create and write"
        ) from None
    return path


def readable_file(path: Path, what: str, fix: str) -> bytes:
    """The bytes of ``path``, or an error naming it and ``fix``."""
    if not path.exists():
        raise FedhavenError(f"{what} '{path}' not found: {fix}")
    if not path.is_file():
        raise FedhavenError(f"{what} '{path}' is not a file: {fix}")
    try:
        return path.read_bytes()
    except OSError as e:
        raise FedhavenError(f"{what} '{path}' cannot be read ({e.strerror}): {fix}") from None


def check_port(port: int, flag: str = "--port") -> None:
    if not 0 < port < 65536:
        raise FedhavenError(f"{flag} {port} is not a TCP port: give one in 1..65535")


def resolve(host: str, port: int) -> tuple[socket.AddressFamily, Any]:
    """The first (family, socket address) of ``host``; a name nothing resolves is refused."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise FedhavenError(f"host '{host}' cannot be resolved ({e}): give an address") from None
    return infos[0][0], infos[0][4]


def check_port_free(host: str, port: int, flag: str = "--port") -> None:
    """Refuse a port something already listens on (before anything is started)."""
    check_port(port, flag)
    family, address = resolve(host, port)
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise FedhavenError(
                    f"port {port} on {host} is in use: stop what listens there, or choose "
                    f"another {flag}"
                ) from None
            raise FedhavenError(
                f"cannot listen on {host}:{port} ({e.strerror}): choose another host or {flag}"
            ) from None


def connect_host(host: str) -> str:
    """Where this machine reaches a server bound to ``host`` (a wildcard means loopback)."""
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def say(message: str) -> None:
    print(message, flush=True)


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP stop the foreground process like Ctrl-C (KeyboardInterrupt)."""

    def _interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    watched = (signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, _interrupt) for s in watched}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


class FlowerProcess:
    """One Flower executable in its own process group, its output passed through."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        env: Mapping[str, str],
        *,
        watch: Sequence[str] = (),
        fatal: Sequence[str] = (),
        fatal_grace_s: float = 10.0,
    ) -> None:
        """``watch``: fragments of lines to remember in :attr:`seen` (the tail forgets).
        ``fatal``: fragments of lines after which the process is of no more use even if it
        keeps running; :meth:`wait` then gives it ``fatal_grace_s`` to exit."""
        self.name = name
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self.seen: set[str] = set()
        self._watch, self._fatal = (*watch, *fatal), frozenset(fatal)
        self._fatal_grace_s = fatal_grace_s
        self._fatal_seen = threading.Event()
        self.proc = subprocess.Popen(
            list(command),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as a whole
            text=True,
            errors="replace",
            bufsize=1,
        )
        self.pid = self.proc.pid
        self._pump = threading.Thread(target=self._pass_through, daemon=True)
        self._pump.start()
        say(f"started {name} (pid {self.pid}, process group {self.pid})")

    def _pass_through(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.tail.append(line.rstrip("\n"))
            for fragment in self._watch:
                if fragment in line:
                    self.seen.add(fragment)
                    if fragment in self._fatal:
                        self._fatal_seen.set()
            with contextlib.suppress(OSError, ValueError):
                sys.stdout.write(line)
                sys.stdout.flush()

    def output(self) -> str:
        """The last lines it printed (after it ended, all of them up to the limit)."""
        self._pump.join(timeout=2.0)
        return "\n".join(self.tail)

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self) -> int | None:
        """Its exit code, or None if it printed a fatal line and still runs a while later."""
        while True:
            try:
                return self.proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
            if self._fatal_seen.is_set():
                try:
                    return self.proc.wait(timeout=self._fatal_grace_s)
                except subprocess.TimeoutExpired:
                    return None

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def stop(self, grace_s: float = _STOP_GRACE_S) -> None:
        """SIGTERM the group, wait for it to go, SIGKILL what is left. Signals that arrive
        meanwhile (a second Ctrl-C) do not cut the cleanup short."""
        ignored = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        old = {s: signal.signal(s, signal.SIG_IGN) for s in ignored}
        try:
            if self._group_alive():
                self._signal_group(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline:
                if self.proc.poll() is not None and not self._group_alive():
                    break
                time.sleep(0.1)
            else:
                self._signal_group(signal.SIGKILL)
            self.proc.wait()
            self._pump.join(timeout=2.0)
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
