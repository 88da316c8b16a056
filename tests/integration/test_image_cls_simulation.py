"""End to end, image-cls: a tiny ResNet (BatchNorm, LoRA on its convolutions) and a tiny ViT
(LoRA on its attention projections) each train a round under DP in a 2-site simulation
through Flower's simulation engine, from a folder with one subfolder per label."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    ResNetConfig,
    ResNetForImageClassification,
)

from fedhaven.config import from_flat
from fedhaven.models import adapter_state, build_model, load_trained
from fedhaven.tasks import get_task
from fedhaven.training import evaluate

pytestmark = pytest.mark.slow

LABELS = ["dark", "mid", "light"]
SIZE = 16  # the tiny ViT's image size (conftest.py: tiny_vit_dir)


def _images(root: Path, per_label: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for y, name in enumerate(LABELS):
        (root / name).mkdir(parents=True)
        for i in range(per_label):
            pixels = np.clip(rng.normal(40 + 80 * y, 20, (8, 8)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(root / name / f"{i}.png")
    return root


def _resnet(d: Path) -> Path:
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
    ResNetForImageClassification(config).save_pretrained(d)
    return d


@pytest.fixture(scope="module", params=["resnet", "vit"])
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from fedhaven.simulations import simulate

    tmp = tmp_path_factory.mktemp(f"sim-{request.param}")
    overrides = {
        "model.task": "image-cls",
        "model.path": str(
            _resnet(tmp / "model")
            if request.param == "resnet"
            else request.getfixturevalue("tiny_vit_dir")
        ),
        "model.image-size": SIZE,
        "data.path": str(_images(tmp / "train", 10, seed=1)),
        "data.test-path": str(_images(tmp / "test", 4, seed=2)),
        "data.labels": ",".join(LABELS),
        "data.partition": "iid",
        "train.batch-size": 8,
        "federation.rounds": 1,
        "federation.sites": 2,
        "privacy.enabled": True,
        "federation.out-dir": str(tmp / "run"),
    }
    cfg = from_flat(overrides)
    return {"summary": simulate(cfg), "cfg": cfg, "out": tmp / "run"}


def test_each_site_spent_privacy_budget(run: dict[str, Any]) -> None:
    summary = run["summary"]
    assert summary["rounds"] == 1 and summary["labels"] == LABELS
    assert len(summary["sites"]) == 2
    # 30 rows, 2 sites, 20% validation: 12 training rows each
    assert sum(s["examples"] for s in summary["sites"].values()) == 24
    for site in summary["sites"].values():
        assert 0 < site["epsilon"] <= run["cfg"].privacy.epsilon * 1.001
    assert len(summary["global"]["per_class_f1"]) == 3


def test_the_adapter_changed_and_reproduces_the_global_metrics(run: dict[str, Any]) -> None:
    cfg = run["cfg"]
    trained = load_trained(run["out"] / "adapter")
    fresh = adapter_state(build_model(cfg))
    params = dict(trained.named_parameters())
    lora_b = [k for k in fresh if "lora_B" in k]
    head = [k for k in fresh if "classifier" in k]
    assert lora_b and head
    assert all(params[k].abs().sum() > 0 for k in lora_b)  # LoRA B starts at zero
    assert all(not torch.equal(params[k].detach(), fresh[k]) for k in head)
    task = get_task(cfg)
    test = task.encode(task.load(cfg.data.test_path, split="test"))
    assert evaluate(trained, test, cfg)["accuracy"] == pytest.approx(
        run["summary"]["global"]["accuracy"]
    )
