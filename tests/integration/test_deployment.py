"""End to end on loopback: `fedhaven coordinator` (SuperLink, TLS, site authentication),
two `fedhaven site` SuperNodes and a third whose key was never registered, one federated
round started with the `flwr run` line the coordinator prints. Every process is stopped
at the end, and what they started must be gone with them."""

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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from fedhaven.deploy.certs import init_ca, site_keys
from fedhaven.privacy import LEDGER_FILE
from fedhaven.report import DEPLOYMENT, SUMMARY_FILE

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
FEDHAVEN = [sys.executable, "-m", "fedhaven.cli"]
STARTED = re.compile(r"started flower-\S+ \(pid (\d+),")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class Processes:
    """Processes started in their own process groups, output to log files."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (self.root / f"{name}.log").open("wb")
        self.procs[name] = subprocess.Popen(
            args,
            cwd=self.root,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        return self.procs[name]

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def children(self, name: str) -> list[int]:
        """Process groups of the Flower processes ``name`` said it started."""
        return [int(pid) for pid in STARTED.findall(self.log(name))]

    def wait_for(self, name: str, text: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            log = self.log(name)
            if text in log:
                return log
            if self.procs[name].poll() is not None:
                pytest.fail(f"{name} exited with {self.procs[name].returncode}:\n{log[-4000:]}")
            time.sleep(0.5)
        pytest.fail(f"{name} did not print {text!r} within {timeout_s} s:\n{self.log(name)}")

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
            for pgid in [proc.pid, *self.children(name)]:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
    make_rows: Callable[[int, int], pd.DataFrame],
) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("deploy")
    init_ca(tmp / "pki")
    for name in ("site-a", "site-b"):
        site_keys(name, tmp / "keys")
    site_keys("intruder", tmp / "other-keys")  # never registered
    for i, name in enumerate(("site-a", "site-b")):
        make_rows(24, 10 + i).to_csv(tmp / f"{name}.csv", index=False)
    make_rows(12, 3).to_csv(tmp / "test.csv", index=False)

    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_TELEMETRY_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("FLWR_HOME", None)
    procs = Processes(tmp, env)
    link_port = _free_port()
    address = f"127.0.0.1:{link_port}"
    out: dict[str, Any] = {"tmp": tmp, "procs": procs}
    t0 = time.monotonic()
    try:
        procs.start(
            "coordinator",
            [
                *(*FEDHAVEN, "coordinator", "--certs", "pki", "--state", "coordinator"),
                *("--sites", "keys", "--port", str(link_port)),
            ],
        )
        log = procs.wait_for("coordinator", "Ctrl-C stops the coordinator", 120)
        out["coordinator_ready_s"] = time.monotonic() - t0
        run_line = log.split("start a run from anywhere with:\n", 1)[1].splitlines()[0].strip()
        out["run_line"] = run_line

        sites = {
            "site-a": ["--epsilon-budget", "100", "--delta", "1e-5"],
            "site-b": [],
            "intruder": [],
        }
        for name, extra in sites.items():
            keys = "other-keys" if name == "intruder" else "keys"
            data = "site-a.csv" if name == "intruder" else f"{name}.csv"
            procs.start(
                name,
                [
                    *(*FEDHAVEN, "site", "--coordinator", address, "--certs", "pki/ca.crt"),
                    *("--key", f"{keys}/{name}.key", "--data", data, "--state", f"state-{name}"),
                    *("--port", str(_free_port()), *extra),
                ],
            )

        # the printed line, as a user would paste it, plus this test's run config
        assignment, *command = shlex.split(run_line)
        key, _, value = assignment.partition("=")
        run_config = {
            "federation.rounds": 1,
            "model.path": str(tiny_model_dir),
            "model.max-length": 16,
            "data.path": str(tmp / "test.csv"),
            "data.test-path": str(tmp / "test.csv"),
            "train.batch-size": 8,
            "train.eval-batch-size": 16,
            "federation.out-dir": str(tmp / "run"),
        }
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        t1 = time.monotonic()
        done = subprocess.run(
            [*command, "--run-config", overrides],
            cwd=tmp,
            env={**env, key: value},
            capture_output=True,
            text=True,
            timeout=420,
            check=False,
        )
        out["run_s"] = time.monotonic() - t1
        out["flwr_run"] = done

        try:
            out["intruder_code"] = procs.procs["intruder"].wait(60)
        except subprocess.TimeoutExpired:
            out["intruder_code"] = None
        out["intruder_log"] = procs.log("intruder")

        children = {name: procs.children(name) for name in procs.procs}
        out["stop_codes"] = {name: procs.terminate(name) for name in ("site-a", "site-b")}
        out["stop_codes"]["coordinator"] = procs.terminate("coordinator")
        time.sleep(1.0)
        out["left_over"] = [
            pgid for pgids in children.values() for pgid in pgids if _group_alive(pgid)
        ]
        out["total_s"] = time.monotonic() - t0
        yield out
    finally:
        procs.kill_all()


def test_run_completes_on_the_deployment_engine(deployment: dict[str, Any]) -> None:
    done = deployment["flwr_run"]
    tmp: Path = deployment["tmp"]
    summary_path = tmp / "run" / SUMMARY_FILE
    assert summary_path.is_file(), f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    summary = json.loads(summary_path.read_text())
    assert summary["engine"] == DEPLOYMENT
    assert summary["rounds"] == 1
    assert len(summary["sites"]) == 2


def test_each_site_ledger_has_one_round(deployment: dict[str, Any]) -> None:
    tmp: Path = deployment["tmp"]
    for name in ("site-a", "site-b"):
        ledger = tmp / f"state-{name}" / LEDGER_FILE
        assert ledger.is_file(), deployment["procs"].log(name)[-3000:]
        entries = [json.loads(line) for line in ledger.read_text().splitlines() if line]
        assert len(entries) == 1
        assert (tmp / f"state-{name}").stat().st_mode & 0o077 == 0  # created 0700


def test_coordinator_printed_a_run_line_for_its_sites(deployment: dict[str, Any]) -> None:
    line = deployment["run_line"]
    home = deployment["tmp"] / "coordinator" / "flwr-home"
    assert line.startswith(f"FLWR_HOME={home} ")
    assert " run " in line and " fedhaven " in line and "federation.sites=2" in line
    log = deployment["procs"].log("coordinator")
    assert "site site-a: registered" in log and "site site-b: registered" in log


def test_unregistered_site_is_refused(deployment: dict[str, Any]) -> None:
    assert deployment["intruder_code"] not in (None, 0), deployment["intruder_log"][-3000:]
    errors = [ln for ln in deployment["intruder_log"].splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "not registered" in errors[0], deployment["intruder_log"]


def test_sigterm_stops_everything(deployment: dict[str, Any]) -> None:
    assert deployment["stop_codes"] == {"site-a": 0, "site-b": 0, "coordinator": 0}
    assert deployment["left_over"] == []
    print(
        f"coordinator ready {deployment['coordinator_ready_s']:.0f} s, "
        f"run {deployment['run_s']:.0f} s, total {deployment['total_s']:.0f} s"
    )
