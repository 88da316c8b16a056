"""End to end: early stopping ends the run, exports the best round's model, and leaves the
sites' remaining privacy budget unspent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedhaven.models import adapter_state, load_trained
from fedhaven.privacy import Ledger

pytestmark = pytest.mark.slow


def test_early_stopping_keeps_the_best_round_and_spends_no_more(
    tmp_path: Path, tiny_flat: dict[str, object]
) -> None:
    from fedhaven.config import from_flat
    from fedhaven.simulations import simulate

    out = tmp_path / "run"
    cfg = {
        **tiny_flat,
        "privacy.enabled": True,
        "federation.rounds": 6,
        "federation.out-dir": str(out),
    }
    # patience 1 with an impossible min-delta: round 1 is the best, round 2 stops the run
    summary = simulate(from_flat({**cfg, "federation.patience": 1, "federation.min-delta": 1.0}))
    assert summary["stopped_early"] and summary["rounds"] == 2 and summary["best_round"] == 1
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2]
    # the exported model is round 1's: its held-out metrics are round 1's
    assert summary["global"]["macro_f1"] == lines[0]["global"]["macro_f1"]
    assert summary["global"]["loss"] == pytest.approx(lines[0]["global"]["loss"])
    # each site trained two of six planned rounds: its budget is mostly unspent
    for i in range(2):
        entries = Ledger(out / "sites" / f"site-{i}").entries()
        assert [e["round"] for e in entries] == [1, 2]
        assert entries[-1]["epsilon"] < 0.9 * 8.0
    assert load_trained(out / "adapter") is not None
    assert all(
        torch.isfinite(t).all() for t in adapter_state(load_trained(out / "adapter")).values()
    )
