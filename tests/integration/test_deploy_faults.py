"""Faults on the deployment engine, with real processes on loopback (TLS, site keys):

- the coordinator (SuperLink, its SuperExec and the ServerApp) is killed after round 1 of 3,
  restarted, and the run re-submitted with ``federation.resume=true``: it ends after 3
  rounds without repeating round 1. A site started with a short ``--max-wait`` gives up
  on the lost coordinator with one line and is restarted, as an operator would; one with
  the default wait rides the outage out and reconnects by itself;
- one of three sites is killed in round 1: the run ends with the other two
  (``federation.min-sites = 2``), the audit log naming the site left out;
- a site pointed at a coordinator that is not there gives up after its bounded wait.

Federated evaluation is off (``federation.fraction-evaluate = 0``): Flower starts one
process per message at a site, and the faults here are about training rounds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest
from deploy_helpers import (
    CONNECTED,
    Processes,
    audit_events,
    free_port,
    ledger_rounds_by_run,
    make_pki,
    offline_env,
    tiny_run_config,
    wait_until,
)

from fedhaven import auditlog
from fedhaven.run_record import METRICS_FILE, SUMMARY_FILE

pytestmark = pytest.mark.slow

RUN_TIMEOUT_S = 480  # one `flwr run` of a few tiny rounds, on a loaded 2-core machine


def _error_lines(log: str) -> list[str]:
    return [ln for ln in log.splitlines() if ln.startswith("error:")]


def _connections(procs: Processes, name: str) -> list[int]:
    """The SuperNode ids ``name``'s SuperNodes printed on connecting, first to last."""
    return [int(ln.rsplit(":", 1)[1]) for ln in procs.log(name).splitlines() if CONNECTED in ln]


def _seconds_between(a: dict, b: dict) -> float:
    return (datetime.fromisoformat(b["time"]) - datetime.fromisoformat(a["time"])).total_seconds()


def _node_ids(procs: Processes, names: tuple[str, ...]) -> dict[str, int]:
    return {name: _connections(procs, name)[0] for name in names}


def test_coordinator_killed_after_round_1_resumes_without_repeating_it(
    tmp_path: Path, tiny_model_dir: Path, make_rows: Callable[[int, int], pd.DataFrame]
) -> None:
    t0 = time.monotonic()
    sites = ("site-a", "site-b")
    make_pki(tmp_path, sites, make_rows)
    procs = Processes(tmp_path, offline_env())
    port = free_port()
    address = f"127.0.0.1:{port}"
    run_dir = tmp_path / "run"
    config = tiny_run_config(
        tmp_path,
        tiny_model_dir,
        **{"federation.rounds": 3, "federation.fraction-evaluate": 0.0},
    )
    try:
        run_line = procs.start_coordinator(port)
        procs.start_site("site-a", address)  # --max-wait 120 (default): rides out an outage
        procs.start_site("site-b", address, "--max-wait", "3")  # gives up at once
        first = procs.flwr_run(run_line, config)

        checkpoint = run_dir / "checkpoint" / "manifest.json"
        wait_until(checkpoint.is_file, RUN_TIMEOUT_S, "round 1's checkpoint", poll_s=0.05)
        killed = procs.crash("coordinator")  # `fedhaven coordinator`, SuperLink, ServerApp
        assert len(killed) >= 4, killed  # + the SuperExec, in a session of its own
        assert first.wait(60) != 0  # `flwr run --stream` loses the coordinator too
        crashed_at = time.monotonic()

        # site-b: the SuperNode gives up after --max-wait, `fedhaven site` says so and exits
        code_b = procs.procs["site-b"].wait(60)
        (error,) = _error_lines(procs.log("site-b"))
        assert code_b == 2
        assert error.startswith(
            f"error: lost the coordinator at {address}: no answer within 3 s; start the site "
            "again once the coordinator runs"
        ), error
        assert procs.procs["site-a"].poll() is None

        # the operator restarts the coordinator (same state: the sites stay registered),
        # then site-b, then submits the run again with resume on
        run_line = procs.start_coordinator(port)
        assert "site site-a: already registered" in procs.log("coordinator", since_start=True)
        # The coordinator counts site-b as connected until its heartbeats lapse (about a
        # minute) and refuses it meanwhile: `fedhaven site` tries again within --max-wait.
        # The operator submits once both sites are back (a round sent meanwhile would go to
        # site-b's stale connection and come back as an error).
        procs.start_site("site-b", address)
        procs.wait_for("site-b", CONNECTED, 150)
        wait_until(lambda: "Connection successful after" in procs.log("site-a"), 150, "site-a back")
        second = procs.flwr_run(run_line, {**config, "federation.resume": True}, "flwr-run-2")
        assert second.wait(RUN_TIMEOUT_S) == 0, procs.log("flwr-run-2")[-4000:]
        resumed_s = time.monotonic() - crashed_at

        # site-a's SuperNode reconnected by itself, its process never ended
        assert procs.procs["site-a"].poll() is None
        assert "Connection successful after" in procs.log("site-a")
        # the restarted site-b is the same node: its key is what the coordinator knows
        restarted = _connections(procs, "site-b")
        assert len(restarted) == 2 and restarted[0] == restarted[1]
        assert "resuming the run in" in procs.log("flwr-run-2")

        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
        assert summary["rounds"] == 3 and summary["resumed_after_round"] == 1
        lines = [json.loads(x) for x in (run_dir / METRICS_FILE).read_text().splitlines()]
        assert [x["round"] for x in lines] == [1, 2, 3]

        # the audit log: round 1 trained before the crash, rounds 2 and 3 after, once each
        events = audit_events(run_dir)
        starts = [i for i, e in enumerate(events) if e["event"] == auditlog.RUN_STARTED]
        assert len(starts) == 2 and events[starts[1]]["resumed_after_round"] == 1
        before, after = events[: starts[1]], events[starts[1] :]

        def trained(part: list[dict]) -> list[int]:
            return [
                e["round"]
                for e in part
                if e["event"] == auditlog.REPLY_ACCEPTED and e["kind"] == "train"
            ]

        assert trained(before) == [1, 1]
        assert trained(after) == [2, 2, 3, 3]
        assert [e["round"] for e in after if e["event"] == auditlog.ROUND_STARTED] == [2, 3]
        assert after[-1]["event"] == auditlog.RUN_FINISHED and after[-1]["rounds"] == 3

        # each site's privacy ledger: round 1 in the first run, 2 and 3 in the resumed one.
        # A round-2 entry of the first run would mean the site had trained the round the
        # dead coordinator sent out just before it died: spent budget, rightly kept.
        for name in sites:
            runs = list(ledger_rounds_by_run(tmp_path / f"state-{name}").values())
            assert len(runs) == 2, runs
            assert runs[0] in ([1], [1, 2]) and runs[1] == [2, 3], runs

        stops = {name: procs.terminate(name) for name in ("site-a", "site-b", "coordinator")}
        assert stops == {"site-a": 0, "site-b": 0, "coordinator": 0}
    finally:
        procs.kill_all()
    print(f"\ncoordinator crash + resume: {time.monotonic() - t0:.0f} s in all, ")
    print(f"{resumed_s:.0f} s from the crash to the resumed run's end")


def test_a_site_killed_in_round_1_is_left_out_and_the_run_ends_with_two(
    tmp_path: Path, tiny_model_dir: Path, make_rows: Callable[[int, int], pd.DataFrame]
) -> None:
    t0 = time.monotonic()
    sites = ("site-a", "site-b", "site-c")
    make_pki(tmp_path, sites, make_rows)
    procs = Processes(tmp_path, offline_env())
    port = free_port()
    address = f"127.0.0.1:{port}"
    run_dir = tmp_path / "run"
    config = tiny_run_config(
        tmp_path,
        tiny_model_dir,
        **{
            "federation.rounds": 2,
            "federation.min-sites": 2,
            "federation.fraction-evaluate": 0.0,
            # Flower marks a silent site offline 60 s after its last heartbeat and answers
            # for it with an error; this bounds the wait should that not happen first
            "federation.round-timeout": 150.0,
        },
    )
    try:
        run_line = procs.start_coordinator(port)
        for name in sites:
            procs.start_site(name, address)
        for name in sites:
            procs.wait_for(name, CONNECTED, 120)
        nodes = _node_ids(procs, sites)
        run = procs.flwr_run(run_line, config)

        def round_1_sent() -> bool:
            return any(e["round"] == 1 for e in audit_events(run_dir, auditlog.ROUND_STARTED))

        wait_until(round_1_sent, RUN_TIMEOUT_S, "round 1's start")
        procs.crash("site-c")  # `fedhaven site`, its SuperNode and what that started
        killed_at = time.monotonic()
        assert run.wait(RUN_TIMEOUT_S) == 0, procs.log("flwr-run")[-4000:]
        after_kill_s = time.monotonic() - killed_at

        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
        assert summary["rounds"] == 2
        assert sorted(summary["sites"]) == sorted(str(nodes[n]) for n in ("site-a", "site-b"))

        events = audit_events(run_dir)
        (first,) = [e for e in events if e["event"] == auditlog.ROUND_STARTED and e["round"] == 1]
        assert sorted(first["nodes"]) == sorted(nodes.values())  # site-c was asked
        accepted = [
            (e["round"], e["node"])
            for e in events
            if e["event"] == auditlog.REPLY_ACCEPTED and e["kind"] == "train"
        ]
        assert sorted(accepted) == sorted(
            (r, nodes[n]) for r in (1, 2) for n in ("site-a", "site-b")
        )
        # round 1 ended without site-c, its failure on record. (Flower's SuperLink answers
        # for a node gone offline with a "Node Unavailable" error reply whose sender is the
        # SuperLink itself, node 1: the strategy logs that reply as node 1's and site-c as
        # unanswered.) Round 2 asked only the sites still connected, or failed site-c again.
        failed = {(e["round"], e["node"]) for e in events if e["event"] == auditlog.REPLY_FAILED}
        assert (1, nodes["site-c"]) in failed
        (second,) = [e for e in events if e["event"] == auditlog.ROUND_STARTED and e["round"] == 2]
        assert nodes["site-c"] not in second["nodes"] or (2, nodes["site-c"]) in failed
        # the round did not wait out federation.round-timeout (150 s): Flower's heartbeat
        # check (a node is offline 2 x 30 s after its last heartbeat) ended it before
        round_1_s = _seconds_between(
            first, next(e for e in events if e["event"] == auditlog.CHECKPOINT_WRITTEN)
        )
        assert round_1_s < 150
        assert events[-1]["event"] == auditlog.RUN_FINISHED
        # the ServerApp's log (streamed by `flwr run`) names it too
        assert f"site {nodes['site-c']} " in procs.log("flwr-run")

        stops = {name: procs.terminate(name) for name in ("site-a", "site-b", "coordinator")}
        assert stops == {"site-a": 0, "site-b": 0, "coordinator": 0}
    finally:
        procs.kill_all()
    print(f"\nsite killed mid-run: {time.monotonic() - t0:.0f} s in all, ")
    print(f"{after_kill_s:.0f} s from the kill to the run's end")


def test_a_site_gives_up_on_an_unreachable_coordinator(
    tmp_path: Path, make_rows: Callable[[int, int], pd.DataFrame]
) -> None:
    t0 = time.monotonic()
    make_pki(tmp_path, ("site-a",), make_rows)
    procs = Processes(tmp_path, offline_env())
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    try:
        site = procs.start_site("site-a", address, "--max-wait", "2")
        code = site.wait(120)
    finally:
        procs.kill_all()
    (error,) = _error_lines(procs.log("site-a"))
    assert code == 2
    assert error == (
        f"error: could not reach the coordinator at {address} within 2 s: check the address "
        "and that `fedhaven coordinator` runs there"
    )
    assert time.monotonic() - t0 < 90
