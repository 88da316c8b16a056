"""`fedhaven predict`: one prediction per input row, from the adapter's own model and task."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from fedhaven import predict as fpredict
from fedhaven.config import Config
from fedhaven.errors import FedhavenError
from fedhaven.models import build_model, load_trained, save_trained
from fedhaven.tasks import get_task, seq_cls

LABELS = ["negative", "neutral", "positive"]


@pytest.fixture(scope="module")
def adapter_dir(tiny_cfg: Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = build_model(tiny_cfg)
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: LoRA B is zero at init
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    d = tmp_path_factory.mktemp("run") / "adapter"
    save_trained(model, tiny_cfg, d)
    return d


@pytest.fixture
def unlabeled(tmp_path: Path, make_rows) -> Path:
    p = tmp_path / "new.csv"
    make_rows(7, 3)[["review"]].to_csv(p, index=False)  # no label column
    return p


def test_predictions_are_the_models_argmax_and_softmax(
    adapter_dir: Path, unlabeled: Path, tiny_cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = fpredict.predict(adapter_dir, unlabeled)  # on the cached frozen prefix
    assert len(rows) == 7
    task = get_task(tiny_cfg)
    monkeypatch.setattr(seq_cls, "PREFIX_CACHE_MAX_BYTES", 0)  # token ids: the whole model
    ids, mask, _ = task.encode(task.load(str(unlabeled), labeled=False)).tensors
    with torch.no_grad():
        probs = load_trained(adapter_dir)(input_ids=ids, attention_mask=mask).logits.softmax(-1)
    for row, p in zip(rows, probs, strict=True):
        assert row["label"] == LABELS[int(p.argmax())]
        assert [row[f"p_{n}"] for n in LABELS] == pytest.approx(p.tolist(), abs=1e-6)
        assert sum(row[f"p_{n}"] for n in LABELS) == pytest.approx(1.0)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedhaven.cli", "predict", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_writes_csv_and_jsonl(adapter_dir: Path, unlabeled: Path, tmp_path: Path) -> None:
    csv, jsonl = tmp_path / "out.csv", tmp_path / "out.jsonl"
    for out in (csv, jsonl):
        p = _cli("--adapter", str(adapter_dir), "--input", str(unlabeled), "--output", str(out))
        assert p.returncode == 0, p.stderr
    table = pd.read_csv(csv)
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(table) == len(lines) == 7
    assert list(table["label"]) == [r["label"] for r in lines]


def test_an_existing_output_is_refused_and_left_untouched(
    adapter_dir: Path, unlabeled: Path, tmp_path: Path
) -> None:
    out = tmp_path / "keep.csv"
    out.write_text("mine\n")
    p = _cli("--adapter", str(adapter_dir), "--input", str(unlabeled), "--output", str(out))
    assert p.returncode != 0
    assert "exists: pass another path, or --force" in p.stderr
    assert "Traceback" not in p.stderr
    assert out.read_text() == "mine\n"


def test_output_suffix_and_missing_text_column_are_one_line_errors(
    adapter_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(FedhavenError, match=r"use \.csv or \.jsonl"):
        fpredict.check_output(tmp_path / "out.txt", force=False)
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"note": ["x"]}).to_csv(bad, index=False)
    with pytest.raises(FedhavenError, match="column 'review' not found"):
        fpredict.predict(adapter_dir, bad)
