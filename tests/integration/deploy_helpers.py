"""What the deployed (SuperLink / SuperNode) tests share: a loopback federation's files,
`fedhaven coordinator` / `fedhaven site` / `flwr run` as real processes, each in its own
process group with its output in a log file, and ways to stop them gently (SIGTERM, as a
service manager would) or to crash them (SIGKILL of the whole process tree)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
import pytest

from fedhaven.auditlog import AUDIT_FILE, EVENT, AuditLog
from fedhaven.deploy.certs import init_ca, site_keys
from fedhaven.privacy import Ledger

BIN = Path(sys.executable).parent
FEDHAVEN = [sys.executable, "-m", "fedhaven.cli"]
STARTED = re.compile(r"started flower-\S+ \(pid (\d+),")
READY = "Ctrl-C stops the coordinator"  # the coordinator's last line once it is up
CONNECTED = "SuperNode ID:"  # flower-supernode's line once the SuperLink accepted it
RUN_LINE = "start a run from anywhere with:\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def offline_env() -> dict[str, str]:
    """This environment with Flower's executables first on PATH, no telemetry, unbuffered
    output, and no FLWR_HOME of the caller's (each process gets its own)."""
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_TELEMETRY_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("FLWR_HOME", None)
    return env


def make_pki(
    tmp: Path,
    sites: Iterable[str],
    make_rows: Callable[[int, int], pd.DataFrame],
    rows: int = 24,
) -> None:
    """``pki/`` (CA, coordinator TLS), ``keys/NAME.{key,pub}`` and ``NAME.csv`` per site, and
    the coordinator's held-out ``test.csv``."""
    init_ca(tmp / "pki")
    for i, name in enumerate(sites):
        site_keys(name, tmp / "keys")
        make_rows(rows, 10 + i).to_csv(tmp / f"{name}.csv", index=False)
    make_rows(12, 3).to_csv(tmp / "test.csv", index=False)


def tiny_run_config(tmp: Path, model_dir: Path, **extra: Any) -> dict[str, Any]:
    """The run config of a deployed run on the tiny model, run directory ``tmp/run``."""
    return {
        "model.path": str(model_dir),
        "model.max-length": 16,
        "data.path": str(tmp / "test.csv"),
        "data.test-path": str(tmp / "test.csv"),
        "train.batch-size": 8,
        "train.eval-batch-size": 16,
        "federation.out-dir": str(tmp / "run"),
        **extra,
    }


class Processes:
    """Processes started in their own process groups, output to ``ROOT/NAME.log``.

    A name started again (a restart) appends to its log; :meth:`log` reads all of it and
    ``since`` skips what earlier incarnations wrote."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._offset: dict[str, int] = {}
        self._trees: dict[str, set[int]] = {}  # every pid seen under each name, for cleanup

    def start(
        self, name: str, args: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        path = self.root / f"{name}.log"
        self._offset[name] = path.stat().st_size if path.exists() else 0
        with path.open("ab") as log:
            self.procs[name] = subprocess.Popen(
                args,
                cwd=self.root,
                env=env or self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._trees.setdefault(name, set()).add(self.procs[name].pid)
        return self.procs[name]

    def log(self, name: str, since_start: bool = False) -> str:
        data = (self.root / f"{name}.log").read_bytes()
        return data[self._offset[name] if since_start else 0 :].decode(errors="replace")

    def children(self, name: str) -> list[int]:
        """Process groups of the Flower processes ``name`` said it started."""
        return [int(pid) for pid in STARTED.findall(self.log(name))]

    def wait_for(self, name: str, text: str, timeout_s: float) -> str:
        """The log of ``name``'s current incarnation once it holds ``text``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            log = self.log(name, since_start=True)
            if text in log:
                return log
            if self.procs[name].poll() is not None:
                pytest.fail(f"{name} exited with {self.procs[name].returncode}:\n{log[-4000:]}")
            time.sleep(0.25)
        pytest.fail(f"{name} did not print {text!r} within {timeout_s} s:\n{self.log(name)}")

    def tree(self, name: str) -> list[psutil.Process]:
        """``name``'s process and all its descendants, whatever their process group (the
        SuperLink starts its `flower-superexec`, which starts the ServerApp, in a session
        of its own)."""
        try:
            root = psutil.Process(self.procs[name].pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        self._trees[name].update(p.pid for p in procs)
        return procs

    def crash(self, name: str) -> list[int]:
        """SIGKILL ``name`` and everything it started, at once, as a power cut would; the
        pids killed."""
        procs = self.tree(name)
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(procs, timeout=10)
        self.procs[name].wait(10)
        return [p.pid for p in procs]

    def terminate(self, name: str, timeout_s: float = 40.0) -> int | None:
        """SIGTERM, as a service manager would; the exit code, None if it had to be killed."""
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def kill_all(self) -> None:
        for name, proc in self.procs.items():
            self.tree(name)
            for pgid in [proc.pid, *self.children(name)]:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
            for pid in self._trees[name]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    psutil.Process(pid).kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)

    # --- the federation's commands ----------------------------------------------------

    def start_coordinator(self, port: int, name: str = "coordinator") -> str:
        """`fedhaven coordinator` on ``port`` (state ``coordinator/``, the sites' keys in
        ``keys/``); once it is up, the `flwr run` line it printed."""
        self.start(
            name,
            [
                *(*FEDHAVEN, "coordinator", "--certs", "pki", "--state", "coordinator"),
                *("--sites", "keys", "--port", str(port)),
            ],
        )
        log = self.wait_for(name, READY, 120)
        return log.split(RUN_LINE, 1)[1].splitlines()[0].strip()

    def start_site(
        self, name: str, address: str, *extra: str, key_dir: str = "keys", data: str = ""
    ) -> subprocess.Popen[bytes]:
        return self.start(
            name,
            [
                *(*FEDHAVEN, "site", "--coordinator", address, "--certs", "pki/ca.crt"),
                *("--key", f"{key_dir}/{name}.key", "--data", data or f"{name}.csv"),
                *("--state", f"state-{name}", "--port", str(free_port()), *extra),
            ],
        )

    def flwr_run(
        self, run_line: str, run_config: dict[str, Any], name: str = "flwr-run"
    ) -> subprocess.Popen[bytes]:
        """The `flwr run` line the coordinator printed, as a user would paste it, plus
        ``run_config``; started in the background."""
        assignment, *command = shlex.split(run_line)
        key, _, value = assignment.partition("=")
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        return self.start(name, [*command, "--run-config", overrides], {**self.env, key: value})


def wait_until(
    check: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.1
) -> float:
    """Poll ``check`` until it holds; the seconds it took. Fails the test after ``timeout_s``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if check():
            return time.monotonic() - t0
        time.sleep(poll_s)
    pytest.fail(f"{what} did not happen within {timeout_s} s")


def audit_events(run_dir: Path, event: str | None = None) -> list[dict[str, Any]]:
    return AuditLog(run_dir / AUDIT_FILE).entries(event)


def ledger_rounds_by_run(state_dir: Path) -> dict[int, list[int]]:
    """A site's privacy ledger as run id -> the rounds it recorded, in order."""
    rounds: dict[int, list[int]] = {}
    for entry in Ledger(state_dir).entries():
        rounds.setdefault(int(entry["run_id"]), []).append(int(entry["round"]))
    return rounds


__all__ = [
    "AUDIT_FILE",
    "BIN",
    "CONNECTED",
    "EVENT",
    "FEDHAVEN",
    "Processes",
    "audit_events",
    "free_port",
    "group_alive",
    "ledger_rounds_by_run",
    "make_pki",
    "offline_env",
    "tiny_run_config",
    "wait_until",
]
