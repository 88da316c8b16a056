"""bench/strategies.py's bookkeeping: a re-measured cell replaces the old one, seeds collapse
to medians, and a bad ``--seeds`` is a usage error (synthetic cells, no runs)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import strategies


def _cell(rule: str, seed: int | None, f1: float, eps: str = "8") -> dict[str, Any]:
    return {"rule": rule, "partition": "iid", "epsilon": eps, "hostile": False, "seed": seed,
            "macro_f1": f1, "accuracy": f1 + 0.1}  # fmt: skip


def test_a_cell_measured_again_replaces_the_earlier_one() -> None:
    old = [_cell("fedavg", 0, 0.30), _cell("ffa", 0, 0.35), _cell("fedavg", 0, 0.2, eps="off")]
    merged = strategies.merge(old, [_cell("fedavg", 0, 0.40)])
    assert [(c["rule"], c["epsilon"], c["macro_f1"]) for c in merged] == [
        ("ffa", "8", 0.35), ("fedavg", "off", 0.2), ("fedavg", "8", 0.40)
    ]  # fmt: skip


def test_seeds_collapse_to_the_median_per_cell() -> None:
    cells = [_cell("fedavg", s, f1) for s, f1 in enumerate([0.30, 0.50, 0.34])]
    row, other = strategies.medians([*cells, _cell("ffa", 0, 0.1)])
    assert other["rule"] == "ffa" and other["runs"] == 1 and other["macro_f1"] == 0.1
    assert row["runs"] == 3 and row["macro_f1"] == 0.34
    assert row["accuracy"] == pytest.approx(0.44)
    assert row["bytes_per_round"] is None  # a metric no cell has stays empty, not 0


def test_seeds_must_be_integers() -> None:
    assert strategies.seed_list("0,1,,2") == [0, 1, 2]
    with pytest.raises(argparse.ArgumentTypeError, match="'0,x': give integers"):
        strategies.seed_list("0,x")
