"""`fedhaven audit`: loss-threshold membership inference against a tiny simulated run (one
Flower simulation per module), the AUC / bootstrap helper on hand-built scores, and the
CLI's one-line errors for runs it cannot audit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedhaven import data as fdata
from fedhaven.audit import attack_auc, audit, label_matched
from fedhaven.client.app import site_train
from fedhaven.config import NUM_PARTITIONS, PARTITION_ID, from_flat
from fedhaven.tasks import get_task

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_flat: dict[str, object]) -> Path:
    from fedhaven.simulations import simulate

    out = tmp_path_factory.mktemp("audit") / "run"
    simulate(from_flat({**tiny_flat, "federation.rounds": 1, "federation.out-dir": str(out)}))
    return out


@pytest.fixture(scope="module")
def result(run: Path) -> dict[str, Any]:
    return audit(run, bootstrap=200, seed=3)


def _audit_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return subprocess.run(
        [sys.executable, "-m", "fedhaven.cli", "audit", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )


def _one_line_error(out: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert fragment in lines[0]


def test_separated_scores_give_auc_one_and_identical_scores_one_half() -> None:
    separated = attack_auc(np.array([3.0, 4.0, 5.0]), np.array([0.0, 1.0, 2.0]), 100, 0)
    assert separated == {"auc": 1.0, "ci_low": 1.0, "ci_high": 1.0, "advantage": 1.0}
    same = attack_auc(np.ones(5), np.ones(7), 100, 0)
    assert same["auc"] == same["ci_low"] == same["ci_high"] == 0.5
    assert same["advantage"] == 0.0
    assert attack_auc(np.zeros(3), np.ones(3), 100, 0)["auc"] == 0.0


def test_label_matching_keeps_equal_counts_per_label() -> None:
    members = np.array([0, 0, 0, 1, 2, 2])
    non_members = np.array([0, 1, 1, 1, 2, 2, 2, 2])
    m, n = label_matched(members, non_members, np.random.default_rng(0))
    for c in (0, 1, 2):
        assert (
            (members[m] == c).sum()
            == (non_members[n] == c).sum()
            == min((members == c).sum(), (non_members == c).sum())
        )
    assert len(set(m)) == len(m) and len(set(n)) == len(n)  # without replacement


def test_members_are_the_rows_the_client_app_trained_on(run: Path) -> None:
    cfg = from_flat(json.loads((run / "summary.json").read_text())["config"])
    task = get_task(cfg)
    full = task.load(cfg.data.path)
    train, _ = fdata.simulated_sites(full, cfg.data, cfg.federation.sites, cfg.train.seed)[1]
    tokenized = task.encode(train)
    client_train = site_train(cfg, {PARTITION_ID: 1, NUM_PARTITIONS: cfg.federation.sites})
    for ours, theirs in zip(tokenized.tensors, client_train.tensors, strict=True):
        assert ours.equal(theirs)


def test_audit_reports_an_auc_with_its_interval(result: dict[str, Any], run: Path) -> None:
    assert 0.0 <= result["auc"] <= 1.0
    assert result["ci_low"] <= result["auc"] <= result["ci_high"]
    assert 0.0 <= result["advantage"] <= 1.0
    assert result["members"] == result["non_members"] > 0
    assert result["site"] == 0 and result["run_dir"] == str(run)
    assert result["epsilon"] > 0  # DP is on by default
    # same seed, same numbers
    assert audit(run, bootstrap=200, seed=3) == result


def test_cli_json_matches_the_function(result: dict[str, Any], run: Path) -> None:
    out = _audit_cli(str(run), "--bootstrap", "200", "--seed", "3", "--json")
    assert out.returncode == 0, out.stderr
    cli = json.loads(out.stdout)
    assert cli.keys() == result.keys()
    for key, value in result.items():
        assert cli[key] == (pytest.approx(value) if isinstance(value, float) else value), key

    line = _audit_cli(str(run), "--bootstrap", "50")
    assert line.returncode == 0, line.stderr
    assert line.stdout.startswith("membership inference (loss threshold), site 0: AUC ")
    assert len(line.stdout.strip().splitlines()) == 1


def test_a_deployed_run_is_refused(run: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(run, tmp_path / "run")  # never edit the user's run
    summary = json.loads((copy / "summary.json").read_text())
    (copy / "summary.json").write_text(json.dumps({**summary, "engine": "deployment"}))
    _one_line_error(_audit_cli(str(copy)), "is not a simulated run")


def test_a_directory_without_a_summary_is_refused(tmp_path: Path) -> None:
    _one_line_error(_audit_cli(str(tmp_path)), "has no summary.json")


def test_a_site_out_of_range_is_refused(run: Path) -> None:
    _one_line_error(_audit_cli(str(run), "--site", "2"), "site 2 is out of range")
