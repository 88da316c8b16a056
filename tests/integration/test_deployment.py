"""End to end on loopback: `fedhaven coordinator` (SuperLink, TLS, site authentication),
two `fedhaven site` SuperNodes and a third whose key was never registered, one federated
round started with the `flwr run` line the coordinator prints. Every process is stopped
at the end, and what they started must be gone with them."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
import pytest
from deploy_helpers import (
    Processes,
    audit_events,
    free_port,
    make_pki,
    offline_env,
    tiny_run_config,
)

from fedhaven import auditlog
from fedhaven.deploy import warm
from fedhaven.deploy.certs import site_keys
from fedhaven.privacy import LEDGER_FILE
from fedhaven.run_record import DEPLOYMENT, METRICS_FILE, SUMMARY_FILE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
    make_rows: Callable[[int, int], pd.DataFrame],
) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("deploy")
    make_pki(tmp, ("site-a", "site-b"), make_rows)
    site_keys("intruder", tmp / "other-keys")  # never registered

    procs = Processes(tmp, offline_env())
    link_port = free_port()
    address = f"127.0.0.1:{link_port}"
    out: dict[str, Any] = {"tmp": tmp, "procs": procs}
    t0 = time.monotonic()
    try:
        run_line = procs.start_coordinator(link_port)
        out["coordinator_ready_s"] = time.monotonic() - t0
        out["run_line"] = run_line
        procs.start_site("site-a", address, "--epsilon-budget", "100", "--delta", "1e-5")
        procs.start_site("site-b", address, "--cold-start")
        # refused at every try: it gives up after its --max-wait (tries every 10 s)
        procs.start_site(
            "intruder", address, "--max-wait", "15", key_dir="other-keys", data="site-a.csv"
        )

        # site-a's messages run in forks of its warm process once it is up (before, cold)
        procs.wait_for("site-a", warm.READY, 120)
        t1 = time.monotonic()
        run = procs.flwr_run(
            run_line, tiny_run_config(tmp, tiny_model_dir, **{"federation.rounds": 1})
        )
        out["flwr_run_code"] = run.wait(420)
        out["run_s"] = time.monotonic() - t1
        # the same federation, a second run under SecAgg+ (both sites stay connected)
        secure = tiny_run_config(
            tmp,
            tiny_model_dir,
            **{"federation.rounds": 1, "federation.secure-aggregation": True},
            **{"federation.out-dir": str(tmp / "run-secure")},
        )
        out["secure_code"] = procs.flwr_run(run_line, secure, "flwr-run-secure").wait(420)

        try:
            out["intruder_code"] = procs.procs["intruder"].wait(60)
        except subprocess.TimeoutExpired:
            out["intruder_code"] = None
        out["intruder_log"] = procs.log("intruder")
        out["site_logs"] = {name: procs.log(name) for name in ("site-a", "site-b")}

        trees = {name: procs.tree(name) for name in ("site-a", "site-b", "coordinator")}
        out["stop_codes"] = {name: procs.terminate(name) for name in ("site-a", "site-b")}
        out["stop_codes"]["coordinator"] = procs.terminate("coordinator")
        # everything they started, whatever its process group, goes with them
        _, alive = psutil.wait_procs([p for tree in trees.values() for p in tree], timeout=10)
        out["left_over"] = [p.pid for p in alive]
        out["total_s"] = time.monotonic() - t0
        yield out
    finally:
        procs.kill_all()


def test_run_completes_on_the_deployment_engine(deployment: dict[str, Any]) -> None:
    tmp: Path = deployment["tmp"]
    summary_path = tmp / "run" / SUMMARY_FILE
    assert deployment["flwr_run_code"] == 0, deployment["procs"].log("flwr-run")[-3000:]
    assert summary_path.is_file(), deployment["procs"].log("flwr-run")[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["engine"] == DEPLOYMENT
    assert summary["rounds"] == 1
    assert len(summary["sites"]) == 2


def test_each_site_ledger_has_one_round_per_run(deployment: dict[str, Any]) -> None:
    tmp: Path = deployment["tmp"]
    for name in ("site-a", "site-b"):
        ledger = tmp / f"state-{name}" / LEDGER_FILE
        assert ledger.is_file(), deployment["procs"].log(name)[-3000:]
        entries = [json.loads(line) for line in ledger.read_text().splitlines() if line]
        assert len(entries) == 2 and entries[0]["run_id"] != entries[1]["run_id"]
        assert (tmp / f"state-{name}").stat().st_mode & 0o077 == 0  # created 0700


def test_a_deployed_run_under_secure_aggregation_completes(deployment: dict[str, Any]) -> None:
    run_dir: Path = deployment["tmp"] / "run-secure"
    assert deployment["secure_code"] == 0, deployment["procs"].log("flwr-run-secure")[-3000:]
    (started,) = audit_events(run_dir, auditlog.RUN_STARTED)
    assert started["secure_aggregation"] is True
    accepted = audit_events(run_dir, auditlog.REPLY_ACCEPTED)
    # one train reply per site (each the unmasked mean of both), then their evaluations
    assert sorted(e["kind"] for e in accepted) == ["evaluate", "evaluate", "train", "train"]
    (line,) = [json.loads(x) for x in (run_dir / METRICS_FILE).read_text().splitlines()]
    # SecAgg+'s four stages carried bytes both ways, counted by the coordinator
    assert line["bytes_sent"] > 0 and line["bytes_received"] > 0


def test_warm_site_ran_its_messages_in_forks_and_the_cold_one_did_not(
    deployment: dict[str, Any],
) -> None:
    warm_log, cold_log = deployment["site_logs"]["site-a"], deployment["site_logs"]["site-b"]
    server = re.search(rf"{warm.READY} \(pid (\d+)\)", warm_log)
    assert server is not None, warm_log[-3000:]
    forks = re.findall(rf"{warm.FORKED} (\d+)", warm_log)
    assert forks, warm_log[-3000:]  # at least the training message
    assert warm.READY not in cold_log and warm.FORKED not in cold_log


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
