"""`fedhaven simulate --ray-address` on a Ray cluster started by the test (`ray start --head`
on this machine, 2 CPUs): 3 sites, 1 round, the tiny BERT. The run must use that cluster,
leave it running, and put its files where the user asked, although the cluster's workers
run from another directory. The cluster is stopped by its process group afterwards, never
by `ray stop` (which would stop every Ray on the machine)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop_group(pgid: int) -> None:
    """Stop every process of the cluster: all share the process group of `ray start`."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, object]]:
    # Short: Ray's Unix sockets live under the temp dir (paths are limited to ~107 bytes).
    temp = Path(tempfile.mkdtemp(prefix="rh"))
    port = _free_port()
    ray = Path(sys.executable).with_name("ray")
    cmd = [str(ray), "start", "--head", f"--port={port}", "--num-cpus=2"]
    cmd += ["--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats"]
    # Ports that default to fixed numbers: free ones, so other Ray users on the box are safe.
    cmd += [f"--ray-client-server-port={_free_port()}", f"--dashboard-port={_free_port()}"]
    start = subprocess.Popen(
        cmd,
        cwd=temp,  # the cluster's workers run here, not in the driver's directory
        env={**os.environ, **OFFLINE},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its daemons keep this process group: we stop them by it
    )
    try:
        out, _ = start.communicate(timeout=120)
        assert start.returncode == 0, out
        yield {"address": f"127.0.0.1:{port}", "port": port, "temp": temp}
    finally:
        _stop_group(start.pid)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def run(
    cluster: dict[str, object],
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
    tiny_csv: Path,
    tiny_test_csv: Path,
) -> dict[str, object]:
    cwd = tmp_path_factory.mktemp("driver")
    shutil.copy(tiny_csv, cwd / "train.csv")  # relative paths: the workers' cwd differs
    cmd = [sys.executable, "-m", "fedhaven.cli", "simulate", "--ray-address", cluster["address"]]
    cmd += ["--model", str(tiny_model_dir), "--data", "train.csv", "--test", str(tiny_test_csv)]
    cmd += ["--sites", "3", "--rounds", "1", "--partition", "iid", "--out", "run"]
    for kv in ("model.max-length=16", "train.batch-size=8", "train.eval-batch-size=16"):
        cmd += ["--set", kv]
    cmd += ["--set", "federation.site-cpus=1"]  # the cluster's 2 CPUs train 2 sites at once
    t0 = time.monotonic()
    p = subprocess.Popen(
        [str(c) for c in cmd],
        cwd=cwd,
        env={**os.environ, **OFFLINE},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out, _ = p.communicate(timeout=600)
    return {"rc": p.returncode, "out": out, "pid": p.pid, "cwd": cwd, "wall": time.monotonic() - t0}


def test_the_run_completes_with_every_site(run: dict[str, object]) -> None:
    assert run["rc"] == 0, run["out"]
    summary = json.loads((Path(run["cwd"]) / "run" / "summary.json").read_text())
    assert summary["rounds"] == 1
    assert len(summary["sites"]) == 3
    assert all(s["epsilon"] > 0 for s in summary["sites"].values())


def test_the_sites_wrote_their_ledgers_where_the_user_asked(run: dict[str, object]) -> None:
    # --out run is relative to the driver's directory, not to the workers' (the cluster's)
    for i in range(3):
        ledger = Path(run["cwd"]) / "run" / "sites" / f"site-{i}" / "privacy-ledger.jsonl"
        assert len(ledger.read_text().splitlines()) == 1, ledger


def test_it_ran_on_that_cluster(cluster: dict[str, object], run: dict[str, object]) -> None:
    assert run["rc"] == 0, run["out"]
    logs = Path(cluster["temp"]) / "session_latest" / "logs"
    # the CLI process joined this cluster as a driver (not a Ray of its own)...
    assert list(logs.glob(f"python-core-driver-*_{run['pid']}.log"))
    # ...and Flower's site actors ran on the cluster's workers
    actor_logs = [f for f in logs.glob("worker-*.out") if "ClientAppActor" in f.read_text()]
    assert actor_logs


def test_the_cluster_is_left_running(cluster: dict[str, object], run: dict[str, object]) -> None:
    assert run["rc"] == 0, run["out"]
    with socket.create_connection(("127.0.0.1", int(cluster["port"])), timeout=5):
        pass  # the head still answers: the run only disconnected from it
