"""`fedhaven export --merge`: a standalone model whose logits equal base + adapter's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from fedhaven.config import Config
from fedhaven.errors import FedhavenError
from fedhaven.models import build_model, export_merged, load_trained, save_trained


@pytest.fixture(params=["mean", "cls"])
def adapter_dir(request: pytest.FixtureRequest, tiny_cfg: Config, tmp_path: Path) -> Path:
    cfg = tiny_cfg.replace(**{"model.pooling": request.param})
    model = build_model(cfg)
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: LoRA B is zero at init
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    save_trained(model, cfg, tmp_path / "adapter")
    return tmp_path / "adapter"


def test_merged_model_gives_the_logits_of_base_plus_adapter(
    adapter_dir: Path, tmp_path: Path
) -> None:
    out = export_merged(adapter_dir, tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True)
    ids = torch.randint(5, 30, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0  # padding must be pooled the same way
    with torch.no_grad():
        expected = load_trained(adapter_dir)(input_ids=ids, attention_mask=mask).logits
        got = merged.eval()(input_ids=ids, attention_mask=mask).logits
    assert got.shape == (3, 3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert merged.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}


def test_export_never_writes_into_a_non_empty_directory(adapter_dir: Path, tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(FedhavenError, match="exists and is not empty"):
        export_merged(adapter_dir, taken)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]


def test_export_cli_rejects_a_directory_that_is_not_an_adapter(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fedhaven.cli", "export", "--adapter", str(tmp_path),
         "--merge", str(tmp_path / "merged")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: ") and "is not a fedhaven adapter directory" in line
    assert not (tmp_path / "merged").exists()
