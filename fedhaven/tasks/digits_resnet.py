"""The bundled image model, ``digits-resnet``: a small ResNet pre-trained here once, centrally,
on the digits 0-4 of the bundled "public" split that no site federates on, and cached. It
stands in for a pretrained vision checkpoint, which cannot be had offline (torchvision and
timm weights download).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from PIL import Image
from transformers import PretrainedConfig

from fedhaven.config import from_flat, keys
from fedhaven.tasks.base import cache_dir
from fedhaven.tasks.image_cls import (
    _digits,
    _images_dataset,
    default_processor,
    digits_indices,
    encode_images,
)

DIGITS_RESNET = "digits-resnet"
#: Bump when the recipe below changes: a new cache entry, never a stale one.
_DIGITS_RESNET_VERSION = 1
#: Written into the prepared directory: what it was trained on, and how well it did.
PRETRAINING_FILE = "fedhaven_pretraining.json"


#: The digits digits-resnet is pre-trained to tell apart: half of them. The sites' task (all
#: ten) has five classes its backbone never saw labeled, so what it learns there is learned.
PRETRAINING_CLASSES = tuple(range(5))

#: digits-resnet's pre-training, centrally, through the one training loop (no DP: the
#: public rows are public). AdamW, 8 epochs of 357 images; seconds on a CPU.
_PRETRAIN = {
    keys.MODEL_TASK: "image-cls",
    keys.MODEL_IMAGE_SIZE: 32,
    keys.DATA_LABELS: ",".join(str(d) for d in PRETRAINING_CLASSES),
    keys.PRIVACY_ENABLED: False,
    keys.TRAIN_LEARNING_RATE: 3e-3,
    keys.TRAIN_SCHEDULE: "constant",
    keys.TRAIN_LOGIT_ADJUSTMENT: 0.0,
    keys.TRAIN_BATCH_SIZE: 64,
    keys.TRAIN_LOCAL_EPOCHS: 8,
    keys.TRAIN_SEED: 0,
}


def _pretraining_digits(split: str) -> Dataset:
    """The images of a bundled split whose digit is one of :data:`PRETRAINING_CLASSES`."""
    images, labels = _digits()
    idx = [i for i in digits_indices(split) if labels[i] in PRETRAINING_CLASSES]
    ids = [PRETRAINING_CLASSES.index(labels[i]) for i in idx]
    return _images_dataset([Image.fromarray(images[i], mode="L") for i in idx], ids)


def _digits_resnet_config() -> PretrainedConfig:
    from transformers import ResNetConfig

    # 3 channels like the ImageNet checkpoints it stands in for (digits are converted to RGB)
    return ResNetConfig(
        num_channels=3,
        embedding_size=32,
        hidden_sizes=[32, 64],
        depths=[1, 1],
        layer_type="basic",
        num_labels=len(PRETRAINING_CLASSES),
    )


def prepare_digits_resnet(cache: Path | None = None) -> Path:
    """The bundled ``digits-resnet``: a small HF ResNet (2 stages, 32/64 channels, 3-channel
    32×32 input) pre-trained once, centrally, to tell apart the digits 0-4 of the bundled
    "public" split (357 images that no site federates on: see :func:`digits_indices`), saved
    with its image processor under ``cache`` (default :func:`cache_dir`) and reused after
    that. It stands in for a pretrained checkpoint, which cannot be had offline. Saved
    without its head: every run trains a fresh one for its own labels.

    Deterministic (seeded, one thread), but for a real federation prepare it once and give
    every site a copy (``model.path``), so that all train adapters for the same base.
    """
    from transformers import ResNetForImageClassification

    from fedhaven.training import evaluate, train_round

    target = (cache or cache_dir()) / "models" / f"{DIGITS_RESNET}-v{_DIGITS_RESNET_VERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        cfg = from_flat(_PRETRAIN)
        size = cfg.model.image_size
        processor = default_processor(size, 3)
        pixels = {
            split: encode_images(_pretraining_digits(split), processor, 3, size)
            for split in ("public", "test")
        }
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the same weights on every run: a fixed reduction order
        try:
            torch.manual_seed(cfg.train.seed)
            model = ResNetForImageClassification(_digits_resnet_config())
            result = train_round(model, pixels["public"], cfg)
            metrics = evaluate(model, pixels["test"], cfg)
        finally:
            torch.set_num_threads(threads)
        # the backbone only: AutoModelForImageClassification adds a fresh head for any labels
        model.resnet.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / PRETRAINING_FILE).write_text(
            json.dumps(
                {
                    "data": f"scikit-learn load_digits, digits {PRETRAINING_CLASSES} of the "
                    f"bundled split 'public' ({len(pixels['public'])} images; sites federate "
                    "on split 'train')",
                    "config": _PRETRAIN,
                    "steps": result.steps,
                    "train_loss": result.loss,
                    "test_accuracy_with_its_head": metrics["accuracy"],  # on digits 0-4
                },
                indent=2,
            )
            + "\n"
        )
        try:
            os.replace(tmp, target)  # atomic: a reader sees no directory or a whole one
        except OSError:
            if not (target / "config.json").is_file():  # not another process's copy: real
                raise
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
    return target
