"""`fedhaven tune`'s progress bar: the trials done, and the current trial's rounds as its
simulation reports them (a stand-in for `simulate`; no federation runs)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from rich.progress import Progress

from fedhaven.config import Config
from fedhaven.errors import FedhavenError
from fedhaven.simulations import tune as ftune
from fedhaven.simulations.tune import tune


def _bars(monkeypatch: pytest.MonkeyPatch, made: list[Progress]) -> None:
    """Keep each bar tune makes, drawn to a fake terminal, so its tasks can be read."""
    real = ftune._progress_bar

    def make(show: bool) -> Progress:
        bar = real(show)
        bar.live.console = Console(file=io.StringIO(), force_terminal=True)
        made.append(bar)
        return bar

    monkeypatch.setattr(ftune, "_progress_bar", make)


def test_the_bar_counts_trials_and_follows_the_running_trials_rounds(
    tiny_flat: dict[str, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[Progress] = []
    _bars(monkeypatch, made)
    seen: list[tuple[float, float | None, float]] = []  # (round bar done, its total, trials done)

    def simulate(cfg: Config, *, progress: Any = None, **_: Any) -> dict:
        bar = made[0]
        trials_task, rounds_task = bar.tasks  # the current trial's rounds: a second task
        run_dir = Path(cfg.federation.out_dir)
        run_dir.mkdir(parents=True)
        for r in (1, 2):
            progress({"round": r})  # what the ServerApp calls after each round
            seen.append((rounds_task.completed, rounds_task.total, trials_task.completed))
        site = {"1": {"macro_f1": 0.5, "val_examples": 10}}
        (run_dir / "metrics.jsonl").write_text(json.dumps({"round": 2, "sites": site}) + "\n")
        return {"global": {"macro_f1": 0.4}}

    monkeypatch.setattr(ftune, "simulate", simulate)
    tune(tiny_flat, 2, out=tmp_path / "out", seed=0)

    # two trials of two rounds each; the trials bar moves on only after a trial is done
    assert seen == [(1, 2, 0), (2, 2, 0), (1, 2, 1), (2, 2, 1)]
    (bar,) = made
    assert [(t.description, t.completed, t.total) for t in bar.tasks] == [("trials", 2, 2)]
    assert not bar.live.is_started  # stopped: the terminal is the caller's again


def test_the_bar_stops_when_a_user_error_ends_the_search(
    tiny_flat: dict[str, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[Progress] = []
    _bars(monkeypatch, made)

    def simulate(cfg: Config, **_: Any) -> dict:
        raise FedhavenError("bad data")

    monkeypatch.setattr(ftune, "simulate", simulate)
    with pytest.raises(FedhavenError, match="bad data"):
        tune(tiny_flat, 3, out=tmp_path / "out", seed=0)
    assert not made[0].live.is_started


def test_no_bar_when_asked_for_none(
    tiny_flat: dict[str, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[Progress] = []
    _bars(monkeypatch, made)

    def simulate(cfg: Config, *, progress: Any = None, **_: Any) -> dict:
        progress({"round": 1})
        raise RuntimeError("a broken trial")

    monkeypatch.setattr(ftune, "simulate", simulate)
    with pytest.raises(FedhavenError, match="no trial"):
        tune(tiny_flat, 1, out=tmp_path / "out", seed=0, show_progress=False)
    assert made[0].disable and not made[0].live.is_started
    assert made[0].live.console.file.getvalue() == ""  # nothing drawn
