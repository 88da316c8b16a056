"""End to end through Flower's simulation engine: each simulated site keeps its own ledger
and enforces its own budget; the coordinator logs a refusal and goes on with the others."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from fedhaven.privacy import LEDGER_FILE, Ledger

pytestmark = pytest.mark.slow


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_flat: dict[str, object]) -> dict[str, Any]:
    from fedhaven.config import from_flat
    from fedhaven.simulations import simulate

    tmp = tmp_path_factory.mktemp("budgets")
    state = tmp / "state"
    # One site of two refuses every round of the first run: the run may go on with one site
    # only if the minimum allows it (federation.min-sites, default 2, stops the run otherwise).
    flat = {**tiny_flat, "privacy.enabled": True, "federation.min-sites": 1}
    handler = _Records()
    coordinator = logging.getLogger("fedhaven.strategies.base")  # the Validated mixin logs
    coordinator.addHandler(handler)
    try:
        # site 1 allows almost nothing: it refuses every round of the first run
        first = simulate(
            from_flat({**flat, "federation.out-dir": str(tmp / "a")}),
            sites={"state-dir": str(state), "epsilon-budget": "1000,0.001"},
        )
        refuser_ledger_after_first = (state / "site-1" / LEDGER_FILE).exists()
        # the same sites, a second run, one round: site 0 keeps spending from its ledger
        second = simulate(
            from_flat({**flat, "federation.out-dir": str(tmp / "b"), "federation.rounds": 1}),
            sites={"state-dir": str(state), "epsilon-budget": 1000},
        )
    finally:
        coordinator.removeHandler(handler)
    return {
        "first": first,
        "second": second,
        "state": state,
        "log": handler.messages,
        "refuser_ledger_after_first": refuser_ledger_after_first,
    }


def test_an_exhausted_site_refuses_and_the_run_goes_on(runs: dict[str, Any]) -> None:
    import json

    first = runs["first"]
    assert first["rounds"] == 2
    metrics = Path(first["run_dir"], "metrics.jsonl").read_text().splitlines()
    lines = [json.loads(x) for x in metrics]
    assert [(r["sites_used"], r["rejected"]) for r in lines] == [(1, 1), (1, 1)]
    # both sites evaluated; only the one that trained reports an ε
    assert sorted(s["epsilon"] is None for s in first["sites"].values()) == [False, True]
    refusals = [m for m in runs["log"] if "refused: privacy budget exhausted" in m]
    assert len(refusals) == 2 and all("allowed ε=0.001" in m for m in refusals)
    # the refusing site trained nothing and recorded nothing
    assert not runs["refuser_ledger_after_first"]


def test_a_sites_ledger_spans_runs(runs: dict[str, Any]) -> None:
    entries = Ledger(runs["state"] / "site-0").entries()
    assert [e["round"] for e in entries] == [1, 2, 1]
    assert len({e["run_id"] for e in entries}) == 2
    eps = [e["epsilon"] for e in entries]
    assert eps[0] < eps[1] < eps[2]  # the second run starts from what the first spent
    assert runs["first"]["max_epsilon"] == pytest.approx(eps[1])
    assert runs["second"]["max_epsilon"] == pytest.approx(eps[2])
    # site 1 trained in the second run only, from an empty ledger
    assert [e["round"] for e in Ledger(runs["state"] / "site-1").entries()] == [1]
