"""Early stopping on a scripted metric sequence, and the validation metric it watches."""

from __future__ import annotations

import pytest

from fedhaven.config import Config
from fedhaven.errors import FedhavenError
from fedhaven.run_record import validation_score
from fedhaven.server.app import EarlyStopping


def _run(values: list[float | None], patience: int, min_delta: float = 0.0) -> tuple[int, int]:
    """(the round it stops after, or 0 if it never does; the best round)."""
    stopper = EarlyStopping(patience, min_delta)
    for r, v in enumerate(values, start=1):
        if stopper.update(r, v):
            return r, stopper.best_round
    return 0, stopper.best_round


@pytest.mark.parametrize(
    ("values", "patience", "min_delta", "expected"),
    [
        ([0.3, 0.4, 0.35, 0.38, 0.2], 2, 0.0, (4, 2)),  # two rounds below round 2's best
        ([0.3, 0.4, 0.35, 0.41, 0.2], 2, 0.0, (0, 4)),  # round 4 improves: never stops
        ([0.3, 0.4, 0.35, 0.41, 0.2], 2, 0.05, (4, 2)),  # ... but not by more than 0.05
        ([0.5, 0.5, 0.5], 1, 0.0, (2, 1)),  # equal is not better
        ([None, None, 0.2, 0.1], 2, 0.0, (2, 0)),  # no site validation counts as no progress
        ([0.1, 0.2, 0.3, 0.4], 1, 0.0, (0, 4)),  # always improving
    ],
)
def test_stops_at_the_right_round(
    values: list[float | None], patience: int, min_delta: float, expected: tuple[int, int]
) -> None:
    assert _run(values, patience, min_delta) == expected


def test_validation_score_weighs_sites_by_their_validation_examples() -> None:
    sites = {
        "1": {"macro_f1": 0.5, "val_examples": 30},
        "2": {"macro_f1": 0.8, "val_examples": 10},
        "3": {"macro_f1": None, "val_examples": 0},  # refused or no validation split
    }
    assert validation_score(sites, "macro_f1") == pytest.approx((0.5 * 30 + 0.8 * 10) / 40)
    assert validation_score({"3": sites["3"]}, "macro_f1") is None


@pytest.mark.parametrize(
    ("key", "value"), [("federation.patience", -1), ("federation.min-delta", -0.1)]
)
def test_bad_early_stopping_settings_name_the_key(key: str, value: float) -> None:
    with pytest.raises(FedhavenError, match=f"config '{key}'"):
        Config().replace(**{key: value})
