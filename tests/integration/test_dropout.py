"""A site that drops out of every round, through Flower's simulation engine: with enough
sites left (federation.min-sites) the run goes on without it; with too few it stops after
the first round with one clear error, and the audit logs say what happened."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedhaven import auditlog
from fedhaven.auditlog import AUDIT_FILE, AuditLog
from fedhaven.errors import FedhavenError

pytestmark = pytest.mark.slow

# Site 2 allows almost no ε: it refuses every round (an error reply, code protocol.REFUSED).
SITES = {"epsilon-budget": "1000,1000,0.001"}
STOP = (
    "round 1: only 2 of the 3 sites required (federation.min-sites) sent a usable update: "
    "stopping; lower federation.min-sites or fix the sites (see the log)"
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_flat: dict[str, object]) -> dict[str, Any]:
    from fedhaven.config import from_flat
    from fedhaven.simulations import simulate

    tmp = tmp_path_factory.mktemp("dropout")
    flat = {**tiny_flat, "privacy.enabled": True, "federation.sites": 3, "federation.rounds": 2}
    enough = simulate(
        from_flat({**flat, "federation.min-sites": 2, "federation.out-dir": str(tmp / "enough")}),
        sites={**SITES, "state-dir": str(tmp / "enough-sites")},
    )
    too_few: FedhavenError | None = None
    try:
        simulate(
            from_flat(
                {**flat, "federation.min-sites": 3, "federation.out-dir": str(tmp / "too-few")}
            ),
            sites={**SITES, "state-dir": str(tmp / "too-few-sites")},
        )
    except FedhavenError as e:
        too_few = e
    return {"enough": enough, "too_few": too_few, "tmp": tmp}


def test_with_enough_sites_left_the_run_finishes_without_the_refusing_one(
    runs: dict[str, Any],
) -> None:
    summary = runs["enough"]
    assert summary["rounds"] == 2
    lines = Path(summary["run_dir"], "metrics.jsonl").read_text().splitlines()
    assert [(json.loads(x)["sites_used"], json.loads(x)["rejected"]) for x in lines] == [
        (2, 1),
        (2, 1),
    ]
    # each site's own audit log: what it sent, or that it refused
    sites = runs["tmp"] / "enough-sites"
    for i in (0, 1):
        sent = AuditLog(sites / f"site-{i}" / AUDIT_FILE).entries()
        assert [(e["event"], e["round"]) for e in sent] == [(auditlog.SENT, 1), (auditlog.SENT, 2)]
        assert sent[0]["epsilon"] < sent[1]["epsilon"]
    refused = AuditLog(sites / "site-2" / AUDIT_FILE).entries()
    assert [(e["event"], e["round"]) for e in refused] == [
        (auditlog.REFUSED, 1),
        (auditlog.REFUSED, 2),
    ]
    assert all("budget exhausted" in e["reason"] for e in refused)


def test_the_coordinators_audit_log_records_rounds_replies_and_the_end(
    runs: dict[str, Any],
) -> None:
    log = AuditLog(Path(runs["enough"]["run_dir"]) / AUDIT_FILE)
    started = log.entries(auditlog.ROUND_STARTED)
    assert [(e["round"], len(e["nodes"])) for e in started] == [(1, 3), (2, 3)]
    assert sorted(started[0]["sites"]) == sorted(started[0]["nodes"]) and started[1]["sites"] == []
    accepted = [e for e in log.entries(auditlog.REPLY_ACCEPTED) if e["kind"] == "train"]
    assert [e["round"] for e in accepted] == [1, 1, 2, 2]
    assert all(e["bytes"] == runs["enough"]["bytes_per_site_round"] for e in accepted)
    refused = log.entries(auditlog.REPLY_REFUSED)
    assert [e["round"] for e in refused] == [1, 2]
    assert all("budget exhausted" in e["reason"] for e in refused)
    assert len({e["node"] for e in refused}) == 1
    assert log.entries()[-1]["event"] == auditlog.RUN_FINISHED
    assert not log.entries(auditlog.RUN_STOPPED)


def test_with_too_few_sites_left_the_run_stops_after_round_1(runs: dict[str, Any]) -> None:
    assert runs["too_few"] is not None, "the run went on with fewer sites than federation.min-sites"
    assert str(runs["too_few"]) == STOP
    run = runs["tmp"] / "too-few"
    (stopped,) = AuditLog(run / AUDIT_FILE).entries(auditlog.RUN_STOPPED)
    assert (stopped["round"], stopped["accepted"], stopped["required"]) == (1, 2, 3)
    assert not (run / "summary.json").exists()  # no run result pretends all went well
    # the sites trained round 1 only
    sites = runs["tmp"] / "too-few-sites"
    assert [e["round"] for e in AuditLog(sites / "site-0" / AUDIT_FILE).entries()] == [1]
