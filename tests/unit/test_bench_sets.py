"""bench/sets.py's bookkeeping: seeds collapse to medians, each goal compares with
centralized training without DP, and the DP goal skips sets under 2,000 rows (synthetic
cells, no runs)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import sets


def _cell(name: str, how: str, privacy: str, partition: str, seed: int, f1: float,
          rows: int = 2400) -> dict[str, Any]:  # fmt: skip
    return {"set": name, "how": how, "privacy": privacy, "partition": partition, "seed": seed,
            "macro_f1": f1, "accuracy": f1 + 0.1, "train_rows": rows}  # fmt: skip


def test_dp_seeds_collapse_to_their_median() -> None:
    cells = [_cell("sms", "federated", "8", "iid", s, f1) for s, f1 in enumerate([0.7, 0.9, 0.8])]
    med = sets.medians(cells)
    m = med["sms", "federated", "8", "iid"]
    assert (m["runs"], m["macro_f1"]) == (3, 0.8)
    assert m["accuracy"] == pytest.approx(0.9)


def test_goals_compare_with_centralized_without_dp() -> None:
    cells = [
        _cell("sms", "centralized", "off", "pooled", 0, 0.90),
        _cell("sms", "centralized", "8", "pooled", 0, 0.50),  # not what the goals compare with
        _cell("sms", "federated", "off", "iid", 0, 0.895),  # -0.5 points: within 1
        _cell("sms", "federated", "off", "dirichlet:0.5", 0, 0.87),  # -3 points: not within 2
        _cell("sms", "federated", "8", "dirichlet:0.5", 0, 0.88),  # -2 points: within 3
        _cell("sms", "federated", "8", "iid", 0, 0.10),  # no goal at IID under DP
    ]
    goals = {(g["privacy"], g["partition"]): g for g in sets.goal_rows(sets.medians(cells))}
    assert set(goals) == {("off", "iid"), ("off", "dirichlet:0.5"), ("8", "dirichlet:0.5")}
    assert goals["off", "iid"]["gap"] == pytest.approx(-0.5) and goals["off", "iid"]["met"]
    assert goals["off", "dirichlet:0.5"]["gap"] == pytest.approx(-3.0)
    assert not goals["off", "dirichlet:0.5"]["met"]
    assert goals["8", "dirichlet:0.5"]["met"]


def test_the_dp_goal_skips_small_sets() -> None:
    cells = [
        _cell("drug", "centralized", "off", "pooled", 0, 0.5, rows=600),
        _cell("drug", "federated", "8", "dirichlet:0.5", 0, 0.3, rows=600),
        _cell("drug", "federated", "off", "dirichlet:0.5", 0, 0.3, rows=600),
    ]
    goals = sets.goal_rows(sets.medians(cells))
    assert [(g["privacy"], g["met"]) for g in goals] == [("off", False)]


def test_a_slice_keeps_the_cells_of_other_sets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from common import RESULTS_ENV

    earlier = [
        _cell("sms", "federated", "8", "iid", 0, 0.5),
        _cell("drug", "federated", "8", "iid", 0, 0.3),
    ]
    (tmp_path / f"{sets.NAME}.json").write_text(json.dumps({"cells": earlier}))
    monkeypatch.setenv(RESULTS_ENV, str(tmp_path))
    again = [_cell("sms", "federated", "8", "iid", 0, 0.9)]
    merged = sets.merge_cells(sets.earlier_cells(sets.NAME), again, sets.KEY)
    assert [(c["set"], c["macro_f1"]) for c in merged] == [("drug", 0.3), ("sms", 0.9)]


def test_privacy_slices_and_simulate_flags_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--privacy off` measures the runs without DP only, and simulate's own `--set` reaches
    simulate: argparse would otherwise read it as an abbreviation of `--sets`.
    `--no-centralized` skips the pooled runs."""
    seen: list[tuple[list[str], list[str], bool]] = []

    def measure(name, seeds, partitions, privacies, extra, *, pooled):  # type: ignore[no-untyped-def]
        seen.append((privacies, extra, pooled))
        return []

    monkeypatch.setattr(sets, "measure", measure)
    monkeypatch.setattr(sets, "report", lambda *a, **k: None)
    argv = ["sets.py", "--sets", "sms-spam", "--privacy", "off", "--set", "model.max-length=64"]
    monkeypatch.setattr(sys, "argv", argv)
    sets.main()
    assert seen == [(["off"], ["--set", "model.max-length=64"], True)]
    monkeypatch.setattr(sys, "argv", ["sets.py", "--sets", "sms-spam", "--no-centralized"])
    sets.main()
    assert seen[-1] == (["off", "8"], [], False)
    monkeypatch.setattr(sys, "argv", ["sets.py", "--privacy", "4"])
    with pytest.raises(SystemExit, match="--privacy takes 'off', '8' or 'off,8', not '4'"):
        sets.main()


@pytest.mark.parametrize(
    "given", [["--seed", "3"], ["--seed=3"], ["--set", "train.seed=3"], ["--set=train.seed=3"]]
)
def test_a_seed_passed_through_is_refused(
    given: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each run gets the benchmark's own `--seed` after the flags passed through, so a seed
    among them would be silently overridden: it is an error that names `--seeds`."""
    monkeypatch.setattr(sets, "measure", lambda *a: pytest.fail("measured despite the seed"))
    monkeypatch.setattr(sys, "argv", ["sets.py", "--sets", "sms-spam", *given])
    with pytest.raises(SystemExit, match="give --seeds 0,1,2, not --seed"):
        sets.main()


def test_every_cell_runs_once_per_seed_with_and_without_dp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A seed draws the partition as well as the noise, so the runs without DP take every
    seed too: each (how, privacy, partition) cell has one run per seed, seeded as given."""
    from common import Run
    from textsets import Prepared

    prepared = Prepared(tmp_path / "train.csv", tmp_path / "test.csv", ["--data", "x"], 2400, 600)
    monkeypatch.setattr(sets.textsets, "materialize", lambda name, folder: prepared)
    monkeypatch.setattr(sets, "runs_root", lambda: tmp_path)
    scores = {"macro_f1": 0.5, "accuracy": 0.6}
    simulated: list[list[str]] = []

    def simulate(label: str, args: list[str]) -> Run:
        simulated.append(args)
        summary = {"config": {"train.seed": 0}, "wall_s": 1.0, "global": scores}
        return Run(summary, tmp_path, 1.0)

    pooled: list[tuple[object, str]] = []

    def centralized(flat: dict[str, object], label: str) -> dict[str, object]:
        pooled.append((flat["train.seed"], label))
        return {"wall_s": 1.0, "evaluation": scores}

    monkeypatch.setattr(sets, "simulate", simulate)
    monkeypatch.setattr(sets, "centralized", centralized)
    cells = sets.measure("sms-spam", [4, 7], ["iid"], ["off", "8"], [])
    assert [(c["how"], c["privacy"], c["seed"]) for c in cells] == [
        ("federated", "off", 4), ("federated", "off", 7),
        ("centralized", "off", 4), ("centralized", "off", 7),
        ("federated", "8", 4), ("federated", "8", 7),
        ("centralized", "8", 4), ("centralized", "8", 7),
    ]  # fmt: skip
    assert [a[a.index("--seed") + 1] for a in simulated] == ["4", "7", "4", "7"]
    assert ["--no-dp" in a for a in simulated] == [True, True, False, False]
    assert [seed for seed, _ in pooled] == [4, 7, 4, 7]
    assert {sets.medians(cells)["sms-spam", "federated", "off", "iid"]["runs"]} == {2}
    federated_only = sets.measure("sms-spam", [4], ["iid"], ["8"], [], pooled=False)
    assert [(c["how"], c["seed"]) for c in federated_only] == [("federated", 4)]
    assert len(pooled) == 4  # no further centralized run


def test_pooled_rows_encode_as_one_set_when_sites_pad_differently(
    tiny_flat: dict[str, object], make_rows, tmp_path: Path
) -> None:
    """The centralized baseline pools every site's training rows. With ``model.max-length``
    0 each site's rows fit their own padded length, so the sites' tensors cannot simply be
    stacked (the crash this guards against); the pooled rows are encoded together."""
    from common import demo_data

    from fedhaven.config import from_flat

    rows = make_rows(60, 3)
    long = rows["rating"] == "positive"  # one label's reviews are long: 40 more words
    rows.loc[long, "review"] = rows.loc[long, "review"] + " the pill" * 20
    csv = tmp_path / "rows.csv"
    rows.to_csv(csv, index=False)
    flat = {**tiny_flat, "data.path": str(csv), "model.max-length": 0,
            "data.partition": "dirichlet:0.05", "federation.sites": 3}  # fmt: skip
    cfg = from_flat(flat)
    sites, _ = demo_data(cfg)
    lengths = {train.tensors[0].shape[1] for train, _ in sites}
    assert len(lengths) > 1  # the sites pad differently, or this tests nothing
    ((pooled, val),) = demo_data(cfg, pooled=True)[0]
    assert len(pooled) == sum(len(train) for train, _ in sites)
    assert pooled.tensors[0].shape[1] >= max(lengths)
    assert len(val) == 0
