"""A deployed site killed while round 2 of 3 is in flight, then started again with the same
command, rejoins: real processes on loopback (TLS, site keys), the tiny model, DP on.

Flower refuses the restarted site's key until its old connection's heartbeats lapse (about
a minute), which is also when round 2 gives the site up; ``federation.rejoin-wait`` makes
round 3 wait for it instead of starting a few seconds before it is back. The site's ledger
keeps round 1, and its ε after round 3 is the accountant's over every round it trained.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from deploy_helpers import (
    CONNECTED,
    Processes,
    audit_events,
    free_port,
    make_pki,
    offline_env,
    tiny_run_config,
    wait_until,
)

from fedhaven import auditlog
from fedhaven.privacy import Ledger, epsilon_of
from fedhaven.run_record import SUMMARY_FILE

pytestmark = pytest.mark.slow

RUN_TIMEOUT_S = 480


def _connections(procs: Processes, name: str) -> list[int]:
    """The SuperNode ids ``name``'s SuperNodes printed on connecting, first to last."""
    return [int(ln.rsplit(":", 1)[1]) for ln in procs.log(name).splitlines() if CONNECTED in ln]


def test_a_site_restarted_in_round_2_rejoins_with_its_ledger(
    tmp_path: Path, tiny_model_dir: Path, make_rows: Callable[[int, int], pd.DataFrame]
) -> None:
    t0 = time.monotonic()
    sites = ("site-a", "site-b", "site-c")
    make_pki(tmp_path, sites, make_rows)
    procs = Processes(tmp_path, offline_env())
    port = free_port()
    address = f"127.0.0.1:{port}"
    run_dir = tmp_path / "run"
    ledger = Ledger(tmp_path / "state-site-c")
    config = tiny_run_config(
        tmp_path,
        tiny_model_dir,
        **{
            "federation.rounds": 3,
            "federation.min-sites": 2,  # round 2 ends with the other two
            "federation.fraction-evaluate": 0.0,
            "federation.rejoin-wait": 150.0,
            "federation.round-timeout": 150.0,
        },
    )
    try:
        run_line = procs.start_coordinator(port)
        for name in sites:
            procs.start_site(name, address)
        for name in sites:
            procs.wait_for(name, CONNECTED, 120)
        command = list(procs.procs["site-c"].args)  # type: ignore[arg-type]
        (node_c,) = _connections(procs, "site-c")
        run = procs.flwr_run(run_line, config)

        def round_2_sent() -> bool:
            return any(e["round"] == 2 for e in audit_events(run_dir, auditlog.ROUND_STARTED))

        wait_until(round_2_sent, RUN_TIMEOUT_S, "round 2's start", poll_s=0.05)
        procs.crash("site-c")  # `fedhaven site`, its SuperNode and its ClientApp process
        before = ledger.entries()
        assert [e["round"] for e in before] == [1]
        procs.start("site-c", command)  # the same command: same key, state, data, port
        assert run.wait(RUN_TIMEOUT_S) == 0, procs.log("flwr-run")[-4000:]

        # the restarted process is the same node, and the run took it back in round 3
        assert _connections(procs, "site-c") == [node_c, node_c]
        events = audit_events(run_dir)
        trained = {
            (e["round"], e["node"])
            for e in events
            if e["event"] == auditlog.REPLY_ACCEPTED and e["kind"] == "train"
        }
        assert (1, node_c) in trained and (3, node_c) in trained
        (third,) = [e for e in events if e["event"] == auditlog.ROUND_STARTED and e["round"] == 3]
        assert node_c in third["nodes"]
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
        assert summary["rounds"] == 3 and summary["sites"][str(node_c)]["last_round"] == 3

        # its ledger: round 1 as it was before the kill, then the rounds it trained since
        after = ledger.entries()
        assert after[: len(before)] == before
        rounds = [e["round"] for e in after]
        assert rounds[-1] == 3 and set(rounds) <= {1, 2, 3}
        assert len({e["run_id"] for e in after}) == 1
        # ε continues from the ledger: the accountant's over every release, not a fresh start
        delta = after[-1]["delta"]
        assert after[-1]["epsilon"] == pytest.approx(epsilon_of(ledger.history(), delta))
        assert after[-1]["epsilon"] > before[-1]["epsilon"] * 1.05
        assert summary["sites"][str(node_c)]["epsilon"] == pytest.approx(after[-1]["epsilon"])

        stops = {name: procs.terminate(name) for name in (*sites, "coordinator")}
        assert stops == dict.fromkeys((*sites, "coordinator"), 0)
    finally:
        procs.kill_all()
    print(f"\nsite restarted mid-run: {time.monotonic() - t0:.0f} s in all")
