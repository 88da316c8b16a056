"""`report.md` and plots from a run directory's files (hand-built here: no federation)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from fedhaven.errors import FedhavenError
from fedhaven.report import model_card, per_class, write_report
from fedhaven.run_record import (
    METRICS_FILE,
    PLOTS,
    PLOTS_DIR,
    REPORT_FILE,
    SUMMARY_FILE,
    never_predicted,
)

LABELS = ["negative", "neutral", "positive"]
CONFUSION = [[3, 1, 0], [2, 2, 1], [0, 0, 5]]  # rows: truth, columns: prediction


def _site(eps: float | None, acc: float) -> dict[str, object]:
    return {"examples": 20, "epsilon": eps, "train_loss": 1.0, "val_examples": 5,
            "accuracy": acc, "macro_f1": acc / 2}  # fmt: skip


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    rounds = [
        {
            "round": r,
            "wall_s": 10.0 * r,
            "global": {"loss": 1.5 - 0.1 * r, "accuracy": 0.4 + 0.1 * r,
                       "macro_f1": 0.3 + 0.05 * r, "per_class_f1": [0.1, 0.2, 0.3]},
            "max_epsilon": 2.0 * r,
            "central_epsilon": None,
            "bytes_sent": 100, "bytes_received": 200, "sites_used": 2, "rejected": 0,
            "sites": {"900": _site(2.0 * r, 0.5), "17": _site(1.5 * r, 0.6)},
        }
        for r in (1, 2, 3)
    ]  # fmt: skip
    summary = {
        "rounds": 3,
        "labels": LABELS,
        "global": {"accuracy": 0.7, "macro_f1": 0.45, "loss": 1.2,
                   "per_class_f1": [0.1, 0.2, 0.3], "confusion": CONFUSION},
        "sites": {n: {"examples": 20, "epsilon": e, "accuracy": 0.5, "macro_f1": 0.25,
                      "last_round": 3} for n, e in (("900", 6.0), ("17", 4.5))},
        "max_epsilon": 6.0, "delta": 1e-5, "central_dp": None, "wall_s": 31.0,
        "config": {"model.path": "bundled", "lora.r": 8, "privacy.accountant": "rdp",
                   "privacy.epsilon": 8.0},
        "versions": {"flwr": "1.42.0"}, "engine": "simulation",
    }  # fmt: skip
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rounds) + "\n")
    return tmp_path


def test_per_class_precision_recall_from_the_confusion_matrix() -> None:
    rows = per_class(CONFUSION, LABELS)
    # neutral: 2 right of 5 true (recall 2/5), of 3 predicted (precision 2/3)
    assert rows[1]["precision"] == pytest.approx(2 / 3)
    assert rows[1]["recall"] == pytest.approx(2 / 5)
    assert rows[1]["f1"] == pytest.approx(2 * (2 / 3) * (2 / 5) / (2 / 3 + 2 / 5))
    assert [r["support"] for r in rows] == [4, 5, 5]
    assert rows[2]["precision"] == pytest.approx(5 / 6) and rows[2]["recall"] == 1.0


def test_report_lists_every_round_and_writes_valid_pngs(run_dir: Path) -> None:
    report = write_report(run_dir)
    assert report == run_dir / REPORT_FILE
    text = report.read_text()
    for r in (1, 2, 3):
        acc, f1 = 0.4 + 0.1 * r, 0.3 + 0.05 * r
        assert f"| {r} | {10.0 * r:.1f} | {acc:.3f} | {f1:.3f} |" in text
    assert "max ε = 6.00 at δ = 1e-05" in text
    # sites are numbered by node id, small first
    assert "| site 1 | 17 |" in text and "| site 2 | 900 |" in text
    assert "| neutral | 0.667 | 0.400 |" in text
    for name in PLOTS:
        png = run_dir / PLOTS_DIR / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert mpimg.imread(png).ndim == 3  # decodes as an image
        assert f"({PLOTS_DIR}/{name})" in text


def test_report_of_a_run_without_dp_says_so(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["max_epsilon"] = summary["delta"] = None
    (run_dir / "summary.json").write_text(json.dumps(summary))
    assert "No record-level DP" in write_report(run_dir).read_text()


def test_report_of_a_hostile_site_simulation_warns(run_dir: Path) -> None:
    assert "Hostile-site" not in write_report(run_dir).read_text()  # a clean run: no warning
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["simulated_update_scale"] = {"10": 0.5, "2": 100.0}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    warning = "Hostile-site simulation"
    text = write_report(run_dir).read_text()
    assert warning in text and "(partition 2 ×100, partition 10 ×0.5)" in text
    assert text.index(warning) < text.index("## Privacy")


#: Nothing is ever predicted neutral (column 1 sums to zero), though 2 rows are neutral.
NEUTRAL_NEVER_PREDICTED = [[3, 0, 1], [2, 0, 0], [0, 0, 5]]
NEVER_WARNING = "the final model never predicts: neutral"


def test_never_predicted_names_the_classes_with_an_empty_prediction_column() -> None:
    assert never_predicted(NEUTRAL_NEVER_PREDICTED, LABELS) == ["neutral"]
    assert never_predicted(CONFUSION, LABELS) == []  # every column has a prediction
    # in label order; a class absent from the held-out set and never predicted counts too
    assert never_predicted([[4, 0, 0], [1, 0, 0], [3, 0, 0]], LABELS) == ["neutral", "positive"]
    assert never_predicted([[2, 0, 1], [0, 0, 0], [1, 0, 3]], LABELS) == ["neutral"]


def _set_confusion(run_dir: Path, confusion: list[list[int]]) -> None:
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    summary["global"]["confusion"] = confusion
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary))


def _model_card(run_dir: Path) -> str:
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    summary["config"] |= {
        "model.pooling": "mean", "lora.alpha": 16, "lora.dropout": 0.0,
        "lora.target-modules": "q,v", "lora.layers": "", "lora.modules-to-save": "classifier",
        "privacy.max-grad-norm": 1.0,
    }  # fmt: skip
    return model_card(summary)


def test_report_and_model_card_warn_of_a_class_never_predicted(run_dir: Path) -> None:
    text = write_report(run_dir).read_text()  # every class predicted: no warning, no mark
    assert "never predict" not in text and "never predict" not in _model_card(run_dir)
    _set_confusion(run_dir, NEUTRAL_NEVER_PREDICTED)
    text = write_report(run_dir).read_text()
    assert f"> **Warning:** {NEVER_WARNING}" in text
    assert text.index(NEVER_WARNING) < text.index("## Privacy")  # at the top, seen first
    assert "| neutral **(never predicted)** | 0.000 | 0.000 | 0.000 | 2 |" in text
    assert "| negative | " in text and "| positive | " in text  # only neutral is marked
    card = _model_card(run_dir)
    assert f"> **Warning:** {NEVER_WARNING}" in card
    assert card.index(NEVER_WARNING) < card.index("## Model")


def test_model_card_says_where_the_head_started(run_dir: Path) -> None:
    assert "(mean pooling + linear head)" in _model_card(run_dir)
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    summary["config"] |= {"model.head-init": "labels", "model.label-prompt": "A {} review."}
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary))
    card = _model_card(run_dir)
    assert "(mean pooling + linear head started from the label names' embeddings, " in card
    assert "'A {} review.')" in card


def test_model_card_names_the_rule_and_its_server_momentum(run_dir: Path) -> None:
    assert "strategy `fedavg`, " in _model_card(run_dir)
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    summary["config"] |= {"federation.server-momentum": 0.5}
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary))
    assert "strategy `fedavg` with server momentum 0.5, " in _model_card(run_dir)
    summary["config"] |= {"federation.strategy": "fedprox"}  # which ignores the momentum
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary))
    assert "strategy `fedprox`, " in _model_card(run_dir)


def test_model_card_shows_the_sites_data_checks(run_dir: Path) -> None:
    assert "rows in file" not in _model_card(run_dir)  # no site checked its own file
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    summary["sites"]["17"] |= {"rows": 31, "rows_in": 33, "dropped": 2, "duplicates": 1,
                               "small_classes": 0}  # fmt: skip
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary))
    card = _model_card(run_dir)
    assert "| rows in file | dropped | duplicates removed | classes under minimum |" in card
    assert "| site 1 | 20 | 31 | - | 33 | 2 | 1 | 0 |" in card  # node 17 numbers first
    assert "| site 2 | 20 | - | - | - | - | - | - |" in card


def test_a_causal_lm_run_has_no_class_warning(run_dir: Path) -> None:
    lm = {"loss": 1.2, "perplexity": 3.3, "exact_match": 0.1, "token_f1": 0.4}
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    summary |= {"labels": None, "global": lm, "metrics": list(lm)}
    summary["config"]["model.task"] = "causal-lm"
    summary["sites"] = {n: {**s, "exact_match": 0.1, "token_f1": 0.4}
                        for n, s in summary["sites"].items()}  # fmt: skip
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary))
    rounds = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    for r in rounds:
        r["global"] = lm
        for site in r["sites"].values():
            site |= {"exact_match": 0.1, "token_f1": 0.4}
    (run_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rounds))
    text = write_report(run_dir).read_text()
    assert "never predict" not in text and "| class |" not in text


def test_a_directory_that_is_not_a_run_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FedhavenError, match=r"has no summary\.json"):
        write_report(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "fedhaven.cli", "report", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"error: run directory '{tmp_path / 'nope'}' not found: pass a run directory"
    ]
