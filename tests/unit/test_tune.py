"""`fedhaven tune`: two real trials on the tiny BERT (2 sites, 1 round, DP on) once per module;
resuming, failures and errors with a stand-in for `simulate` that writes a known metrics.jsonl."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest

from fedhaven.config import Config, from_flat, load_toml
from fedhaven.errors import FedhavenError
from fedhaven.simulations import tune as ftune
from fedhaven.simulations.tune import ALPHA_PER_RANK, BEST_FILE, STORAGE_FILE, tune

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base(tiny_flat: dict[str, object]) -> dict[str, object]:
    return {**tiny_flat, "federation.rounds": 1, "privacy.enabled": True, "privacy.epsilon": 6.0}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, base: dict[str, object]) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("tune") / "out"
    rows: list[dict[str, Any]] = []
    result = tune(base, 2, out=out, seed=0, progress=rows.append)
    return {"out": out, "result": result, "rows": rows}


def _load(storage: Path) -> optuna.Study:
    return optuna.load_study(study_name="fedhaven", storage=f"sqlite:///{storage}")


def _weighted(run_dir: Path) -> float:
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    rows = [s for s in last["sites"].values() if s["macro_f1"] is not None]
    n = sum(s["val_examples"] for s in rows)
    return sum(s["macro_f1"] * s["val_examples"] for s in rows) / n


def test_two_trials_complete_and_write_a_loadable_best_config(
    study: dict[str, Any], base: dict[str, object]
) -> None:
    out, result = study["out"], study["result"]
    assert result["trials"] == 2
    assert [r["number"] for r in study["rows"]] == [0, 1]
    assert all(r["state"] == "COMPLETE" for r in study["rows"])
    assert result["storage"] == str(out / STORAGE_FILE)
    assert result["best_config_path"] == str(out / BEST_FILE)
    best = _load(out / STORAGE_FILE).best_trial
    assert result["best_params"] == best.params and result["best_value"] == best.value

    flat = load_toml(out / BEST_FILE)
    cfg = from_flat(flat)  # what `fedhaven simulate --config best.toml` does
    assert {k: flat[k] for k in best.params} == best.params
    assert cfg.lora.alpha == ALPHA_PER_RANK * cfg.lora.r  # tied, not searched
    assert "federation.out-dir" not in flat  # a rerun gets its own run dir
    typed = from_flat(base).to_flat()
    assert {k: flat[k] for k in base if k not in best.params} == {
        k: typed[k] for k in base if k not in best.params
    }
    assert cfg.privacy.epsilon == 6.0  # the base's: fixed, not searched


def test_the_objective_is_the_example_weighted_validation_macro_f1(
    study: dict[str, Any],
) -> None:
    for row in study["result"]["history"]:
        run_dir = Path(row["run_dir"])
        assert run_dir == study["out"] / f"trial-{row['number']}"
        assert row["value"] == pytest.approx(_weighted(run_dir))
        # the held-out score is reported, never optimised
        summary = json.loads((run_dir / "summary.json").read_text())
        assert row["test_macro_f1"] == summary["global"]["macro_f1"]


def _stub(calls: list[dict[str, Any]], fail: type[Exception] | None = None) -> Any:
    """A stand-in for `simulate`: a known last round (and an earlier one that must not count)."""

    def simulate(cfg: Config, **_: Any) -> dict[str, Any]:
        calls.append(cfg.to_flat())
        if fail:
            raise fail("boom")
        run_dir = Path(cfg.federation.out_dir)
        run_dir.mkdir(parents=True)
        first = {"1": {"macro_f1": 0.0, "val_examples": 30}}
        last = {
            "1": {"macro_f1": 0.5, "val_examples": 30},
            "2": {"macro_f1": 0.8, "val_examples": 10},
            "3": {"macro_f1": None, "val_examples": 0},  # a site that did not evaluate
        }
        lines = [json.dumps({"round": r, "sites": s}) for r, s in ((1, first), (2, last))]
        (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        return {"global": {"macro_f1": 0.9}}

    return simulate


def test_rerunning_resumes_the_study(
    study: dict[str, Any],
    base: dict[str, object],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage = tmp_path / "study.db"
    shutil.copy(study["out"] / STORAGE_FILE, storage)  # leave the module's study as it was
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(ftune, "simulate", _stub(calls))
    result = tune(base, 1, out=tmp_path / "out", storage=storage, seed=0)

    assert result["trials"] == 3
    trials = _load(storage).trials
    assert [t.number for t in trials] == [0, 1, 2]
    new = trials[2]
    assert new.value == pytest.approx((0.5 * 30 + 0.8 * 10) / 40)
    assert new.user_attrs["test_macro_f1"] == 0.9
    assert calls[0]["federation.out-dir"] == str(tmp_path / "out" / "trial-2")
    assert calls[0]["privacy.epsilon"] == 6.0
    # the sampler's seed moves on with the study: a resume does not replay trial 0's draw
    assert new.params != trials[0].params


def test_a_failing_trial_is_skipped_and_a_user_error_ends_the_search(
    base: dict[str, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = tmp_path / "s.db"
    monkeypatch.setattr(ftune, "simulate", _stub([], fail=RuntimeError))
    with pytest.raises(FedhavenError, match="no trial of study 'fedhaven' completed"):
        tune(base, 2, out=tmp_path, storage=storage)
    assert [t.user_attrs["error"] for t in _load(storage).trials] == ["RuntimeError('boom')"] * 2

    monkeypatch.setattr(ftune, "simulate", _stub([], fail=FedhavenError))
    with pytest.raises(FedhavenError, match="boom"):
        tune(base, 5, out=tmp_path, storage=storage)
    states = [t.state for t in _load(storage).trials]
    assert states == [optuna.trial.TrialState.FAIL] * 3  # stopped at once; nothing left running


def test_errors_before_any_trial(base: dict[str, object], tmp_path: Path) -> None:
    with pytest.raises(FedhavenError, match=r"data\.val-fraction"):
        tune({**base, "data.val-fraction": 0.0}, 1, out=tmp_path / "a")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(FedhavenError, match="cannot open the study storage"):
        tune(base, 1, out=tmp_path / "b", storage=blocker / "study.db")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

    storage = tmp_path / "c.db"
    optuna.create_study(storage=f"sqlite:///{storage}", study_name="fedhaven").set_user_attr(
        "base", {"federation.rounds": 9}
    )
    with pytest.raises(FedhavenError, match="another base config"):
        tune(base, 1, out=tmp_path / "c", storage=storage)


def _tune_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return subprocess.run(
        [sys.executable, "-m", "fedhaven.cli", "tune", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trials", "0"], "error: --trials 0 runs nothing"),
        (["--trials", "1", "--set", "nope.key=1"], "error: unknown config key 'nope.key'"),
    ],
)
def test_cli_user_errors_are_one_line_and_create_nothing(
    tmp_path: Path, args: list[str], message: str
) -> None:
    done = _tune_cli(tmp_path, *args)  # default --out: runs/tune under the working dir
    assert done.returncode == 2
    assert done.stderr.startswith(message)
    assert len(done.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
