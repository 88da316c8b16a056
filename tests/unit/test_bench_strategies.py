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


def test_local_rounds_average_through_the_coordinators_fedavg(
    tiny_cfg: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the global adapter after a round is the sites' adapters averaged by their examples
    import common
    import torch

    from fedhaven import training
    from fedhaven.models import adapter_state

    sites: list[tuple[dict[str, torch.Tensor], int]] = []
    evaluated: list[dict[str, torch.Tensor]] = []
    train_round, evaluate = training.train_round, training.evaluate

    def spy_train(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        result = train_round(model, *args, **kwargs)
        sites.append(({k: v.clone() for k, v in adapter_state(model).items()}, result.num_examples))
        return result

    def spy_evaluate(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        evaluated.append(adapter_state(model))
        return evaluate(model, *args, **kwargs)

    monkeypatch.setattr(training, "train_round", spy_train)
    monkeypatch.setattr(training, "evaluate", spy_evaluate)
    flat = {"federation.rounds": 1, "privacy.enabled": False, "data.partition": "dirichlet:1"}
    cfg = tiny_cfg.replace(**flat)
    loop = common.local_rounds(cfg, evaluate_every_round=False)
    assert len(sites) == 2 and len(evaluated) == 1
    assert sites[0][1] != sites[1][1]  # unequal sites: a plain mean would differ
    total = sum(n for _, n in sites)
    for key, global_tensor in evaluated[0].items():
        mean = sum(n * state[key] for state, n in sites) / total
        torch.testing.assert_close(global_tensor, mean, rtol=1e-5, atol=1e-6)
    assert loop.train_rows == total and loop.max_epsilon is None
    assert "accuracy" in loop.evaluation
