"""`fedhaven simulate` on bad input: exit code 2, one `error:` line, no traceback, and the
user's files untouched. Each case is a real subprocess (two at a time: imports dominate)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

# What a run in this process may have set (fedhaven.simulations.QUIET_ENV): the CLI must
# print one line without their help.
QUIET = ("PYTHONWARNINGS", "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]  # besides the valid --model / --data / --test / --out
    message: str  # a fragment the error line must contain


# {model}, {data}, {test}, {bad_labels} and {bracket} are filled in per session.
CASES = {
    "missing-data-file": Case(("--data", "{tmp}/no-such-file.csv"), "no-such-file.csv' not found"),
    "unknown-set-key": Case(("--set", "lora.rank=4"), "unknown config key 'lora.rank'"),
    "set-without-equals": Case(("--set", "lora.r"), "is not KEY=VALUE"),
    "lora-r-zero": Case(("--set", "lora.r=0"), "config 'lora.r' = 0 is invalid"),
    "bad-partition": Case(("--partition", "dirichlet:-1"), "config 'data.partition'"),
    "missing-model-dir": Case(("--model", "/nonexistent"), "model directory '/nonexistent'"),
    "label-not-in-set": Case(
        ("--data", "{bad_labels}"), "1 row with a label not in the configured label set"
    ),
    "missing-column": Case(("--text-column", "body"), "column 'body' not found"),
    "too-many-sites": Case(("--sites", "500"), "500 sites but only 60 rows"),
    "bracket-in-path": Case(("--data", "{bracket}"), "data[x]/no-such-file.csv' not found"),
    "site-budgets-count": Case(
        ("--sites", "3", "--site-budget", "8,8"), "'sites.epsilon-budget' = '8,8' is invalid"
    ),
    "update-scale-count": Case(
        ("--sites", "3", "--site-update-scale", "100,1"),
        "'sites.update-scale' = '100,1' is invalid: give 3 comma-separated numbers",
    ),
    "unknown-site-key": Case(("--set", "sites.budget=8"), "unknown site setting 'sites.budget'"),
    "unknown-preset": Case(("--preset", "poems"), "unknown preset 'poems': use one of digits"),
    "unknown-task": Case(("--task", "poems"), "config 'model.task' = 'poems' is invalid"),
    "ray-address-malformed": Case(
        ("--ray-address", "ray-head"), "--ray-address 'ray-head' is not HOST:PORT"
    ),
    "no-ray-cluster": Case(
        ("--ray-address", "{dead}"), "no Ray cluster at {dead}: Connection refused; start one"
    ),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def cli_env(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
    tiny_csv: Path,
    tiny_test_csv: Path,
    make_rows: Callable[..., pd.DataFrame],
) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("cli")
    bad = make_rows(12, seed=0)
    bad.loc[5, "rating"] = "ecstatic"
    bad_labels = tmp / "bad_labels.csv"
    bad.to_csv(bad_labels, index=False)
    fill = {
        "tmp": str(tmp),
        "bad_labels": str(bad_labels),
        "bracket": str(tmp / "data[x]" / "no-such-file.csv"),
        "dead": f"127.0.0.1:{_free_port()}",  # nothing listens there
    }
    watched = [tiny_csv, tiny_test_csv, bad_labels]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in watched}
    cwd = tmp / "cwd"
    cwd.mkdir()

    def run(case: Case) -> Run:
        base = [
            "--model",
            str(tiny_model_dir),
            "--data",
            str(tiny_csv),
            "--test",
            str(tiny_test_csv),
        ]
        args = [a.format(**fill) for a in case.args]
        cmd = [sys.executable, "-m", "fedhaven.cli", "simulate", *base, *args]
        cmd += ["--rounds", "1", "--out", str(tmp / "run")]
        p = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            cwd=cwd,
            env={**{k: v for k, v in os.environ.items() if k not in QUIET}, **OFFLINE},
            timeout=300,
            check=False,
        )
        return Run(p.returncode, p.stdout, p.stderr)

    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = dict(zip(CASES, pool.map(run, CASES.values()), strict=True))
    return {"runs": runs, "before": before, "cwd": cwd, "out": tmp / "run", "fill": fill}


def test_cli_module_is_runnable() -> None:
    src = Path(__file__).resolve().parents[2] / "fedhaven" / "cli" / "__main__.py"
    assert 'if __name__ == "__main__":\n    main()' in src.read_text()


@pytest.mark.parametrize("name", CASES)
def test_bad_input_exits_2_with_one_error_line(cli_env: dict[str, object], name: str) -> None:
    run = cli_env["runs"][name]  # type: ignore[index]
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert "Traceback" not in run.stdout
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("error:")
    assert CASES[name].message.format(**cli_env["fill"]) in lines[0], lines[0]


def test_failed_runs_touch_nothing(cli_env: dict[str, object]) -> None:
    for path, (data, mtime) in cli_env["before"].items():  # type: ignore[attr-defined]
        assert path.read_bytes() == data, path
        assert path.stat().st_mtime_ns == mtime, path
    assert not any(Path(cli_env["cwd"]).iterdir())  # type: ignore[arg-type]  # no runs/ etc.
    assert not Path(cli_env["out"]).exists()  # type: ignore[arg-type]


def _summary(**extra: object) -> dict[str, object]:
    """The keys of a classification run's summary.json that the end-of-run summary prints."""
    return {
        "labels": ["negative", "neutral", "positive"],
        "metrics": ["loss", "accuracy", "macro_f1"],
        "global": {"loss": 1.0, "accuracy": 0.6, "macro_f1": 0.4, "per_class_f1": [0.5, 0, 0.7]},
        "sites": {"17": {"examples": 20, "epsilon": 1.0, "accuracy": 0.5, "macro_f1": 0.3}},
        "delta": 1e-5, "central_dp": None, "rounds": 2, "wall_s": 3.0,
        "bytes_per_site_round": 1000, "full_model_bytes": 10**6, "run_dir": "runs/x",
        **extra,
    }  # fmt: skip


def test_end_of_run_summary_warns_of_classes_never_predicted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from fedhaven.cli import _summary_table
    from fedhaven.run_record import NEVER_PREDICTED

    _summary_table(_summary(**{NEVER_PREDICTED: ["neutral"]}))
    warned = [line for line in capsys.readouterr().out.splitlines() if "never predicts" in line]
    assert warned == ["warning: the final model never predicts neutral (see report.md)"]
    for summary in (_summary(**{NEVER_PREDICTED: []}), _summary()):  # all predicted; no key
        _summary_table(summary)
        assert "never predicts" not in capsys.readouterr().out
