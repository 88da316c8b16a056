"""What a task is: everything about a kind of model and data that the shared parts leave out.

The training loop, privacy, protocol and strategies see a task only through :class:`Task`:
a base model with its LoRA defaults, site data encoded as a ``TensorDataset`` whose last
tensor is the target and whose others are the model's keyword inputs (``inputs``), the loss
on a batch's logits, and evaluation. No Flower here (DESIGN rule 3).
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import TaskType
from sklearn.metrics import confusion_matrix, f1_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedhaven import data as fdata
from fedhaven.config import BUNDLED, Config, LoraConfig, keys
from fedhaven.datacheck import DataReport, DataRules
from fedhaven.errors import FedhavenError


def cache_dir() -> Path:
    """Where prepared models are kept (SmolLM2 converted from GGUF, digits-resnet):
    ``$FEDHAVEN_CACHE``, else ``$XDG_CACHE_HOME/fedhaven`` (default ``~/.cache/fedhaven``)."""
    if os.environ.get("FEDHAVEN_CACHE"):
        return Path(os.environ["FEDHAVEN_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "fedhaven"


#: ``model.max-length = 0``: pad to the length that covers this share of a data set's rows,
#: rounded up to a multiple of ``LENGTH_STEP`` and at most ``AUTO_MAX_LENGTH`` tokens. Longer
#: rows are cut, shorter ones padded: padding costs compute on every step, cutting costs
#: signal (drug reviews: a linear probe gains 4 macro-F1 points from 96 to 128 tokens).
#: 128 is the length all-MiniLM-L6-v2 was trained at and what 2 CPU cores can afford in the
#: demo; with a GPU, set ``model.max-length`` higher.
LENGTH_QUANTILE, LENGTH_STEP, AUTO_MAX_LENGTH = 0.9, 32, 128


def no_head_to_probe(cfg: Config) -> FedhavenError:
    """``train.probe-rounds`` on a model whose head is not trained (nothing but LoRA would)."""
    return FedhavenError(
        f"config '{keys.TRAIN_PROBE_ROUNDS}' = {cfg.train.probe_rounds}: the model has no head "
        "to train alone (lora.modules-to-save trains no module of it): set it to 0"
    )


def fit_length(token_counts: Sequence[int], max_length: int) -> int:
    """The padded length of a data set: ``max_length``, or for 0 ("from the data") the
    ``LENGTH_QUANTILE`` of its rows' token counts rounded up to a multiple of
    ``LENGTH_STEP`` (8 tokens at least, ``AUTO_MAX_LENGTH`` at most)."""
    if max_length or not token_counts:
        return max_length or LENGTH_STEP
    q = float(np.quantile(np.asarray(token_counts), LENGTH_QUANTILE))
    return int(min(max(math.ceil(q / LENGTH_STEP) * LENGTH_STEP, 8), AUTO_MAX_LENGTH))


class Task(ABC):
    """One kind of fine-tuning. Subclasses set the class attributes and the abstract methods."""

    name: ClassVar[str]
    #: Keyword names of the model inputs, in the order ``encode`` stacks the tensors (the
    #: target comes last); per data set, :meth:`input_names`.
    inputs: ClassVar[tuple[str, ...]]
    #: A fixed label set (``data.labels``): label prior and per-class metrics apply.
    classification: ClassVar[bool] = True
    #: The evaluation metric to maximise (early stopping, tuning, the best round).
    primary_metric: ClassVar[str] = "macro_f1"
    #: Evaluation metrics shown per round (``loss`` first), all floats.
    metrics: ClassVar[tuple[str, ...]] = ("loss", "accuracy", "macro_f1")
    #: PEFT's task type for ``LoraConfig(task_type=...)`` (None: a plain module).
    peft_task_type: ClassVar[TaskType | None] = None
    #: LoRA defaults for "auto": target modules, modules to save, layers.
    lora_defaults: ClassVar[tuple[str, str, str]]
    #: The transformers auto class that loads the saved base with its head (``base/`` beside
    #: the adapter); None: the pretrained directory is the base as it is.
    hf_auto_class: ClassVar[str | None] = None
    #: The class in the remote-code file (``fedhaven.hf_mean_pooling``) that ``base/`` maps to.
    hf_remote_class: ClassVar[str] = "PretrainedWithHead"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    @property
    def lora(self) -> LoraConfig:
        """``cfg.lora`` with "auto" resolved to this task's defaults."""
        return self.cfg.lora.resolved(*self.lora_defaults)

    def check(self) -> None:
        """The config's errors that only this task's defaults reveal ("auto" resolves per
        task), raised where a run starts rather than in a site's first round."""
        if self.cfg.train.probe_rounds and not self.lora.saved_modules:
            raise no_head_to_probe(self.cfg)

    def model_path(self) -> Path:
        """The local HF directory of ``model.path`` ("bundled": this task's bundled model)."""
        if self.cfg.model.path == BUNDLED:
            return self.bundled_model()
        p = Path(self.cfg.model.path).expanduser()
        if not (p / "config.json").is_file():
            raise FedhavenError(
                f"model directory '{p}' not found or has no config.json: "
                "point model.path (--model) at a local Hugging Face model directory"
            )
        return p

    @abstractmethod
    def bundled_model(self) -> Path:
        """The directory of the pretrained model shipped for this task (an installed
        package, or one converted once and cached); a FedhavenError saying how to get it."""

    @abstractmethod
    def build_base(self) -> nn.Module:
        """The pretrained base with a fresh, seeded head (the caller seeds), before LoRA."""

    @abstractmethod
    def processor(self) -> Any:
        """The tokenizer / image processor, saved next to the adapter (``save_pretrained``)."""

    @abstractmethod
    def load(self, path: str, *, split: str = "train", labeled: bool = True) -> Dataset:
        """Read, validate and clean a site's rows (``path == "bundled"``: the demo data).
        ``labeled=False`` (prediction): the target column may be absent."""

    def load_site(
        self, path: str, rules: DataRules, seed: int
    ) -> tuple[Dataset, Dataset, DataReport | None]:
        """A deployed site's own file: its (train, validation) rows, and the report of the
        checks the site's ``rules`` steer (``None``: this task's data has no such checks)."""
        train, val = fdata.split_train_val(self.load(path), self.cfg.data.val_fraction, seed)
        return train, val, None

    @abstractmethod
    def encode(self, ds: Dataset) -> TensorDataset:
        """Fixed-shape tensors: the model inputs (``inputs`` order), then the target (zeros
        when ``ds`` has none)."""

    @abstractmethod
    def rows(self, ds: Dataset) -> list[Any]:
        """What identifies each row (for the site's data fingerprint), JSON-serialisable."""

    def loss(
        self, logits: torch.Tensor, target: torch.Tensor, adjust: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean loss of a batch. ``adjust``: added to classification logits (logit adjustment)."""
        return F.cross_entropy(logits if adjust is None else logits + adjust, target)

    def row_losses(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of each row of a batch (no reduction)."""
        return F.cross_entropy(logits, target, reduction="none")

    @torch.no_grad()
    def example_losses(self, model: nn.Module, data: TensorDataset) -> np.ndarray:
        """The loss of each row of ``data`` under ``model``, in row order."""
        device = next(model.parameters()).device
        model.eval()
        losses = [
            self.row_losses(model(**inputs).logits, target).cpu()
            for inputs, target in self.batches(data, device)
        ]
        return torch.cat(losses).numpy()

    @abstractmethod
    def evaluate(self, model: nn.Module, data: TensorDataset) -> dict[str, Any]:
        """``num_examples`` and every name in ``metrics`` (plus task-specific extras)."""

    @abstractmethod
    def predict(self, model: nn.Module, ds: Dataset) -> list[dict[str, Any]]:
        """One output row per input row (label and probabilities, or generated text)."""

    def save_processor(self, directory: Path) -> None:
        self.processor().save_pretrained(directory)

    def input_names(self, data: TensorDataset) -> tuple[str, ...]:
        """The keyword names of ``data``'s model inputs: ``inputs``, unless this task's
        ``encode`` has more than one form."""
        return self.inputs

    def batches(self, data: TensorDataset, device: torch.device):
        """(model keyword inputs, target) per evaluation batch, on ``device``."""
        names = self.input_names(data)
        for batch in DataLoader(data, batch_size=self.cfg.train.eval_batch_size):
            *inputs, target = (t.to(device) for t in batch)
            yield dict(zip(names, inputs, strict=True)), target


class ClassificationTask(Task):
    """A fixed label set, cross-entropy on the logits, macro-F1 first (imbalanced sets)."""

    @property
    def labels(self) -> list[str]:
        return self.cfg.data.label_names

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TensorDataset) -> dict[str, Any]:
        """Loss, accuracy, macro-F1, per-class F1 and the confusion matrix."""
        if len(data) == 0:
            return {"num_examples": 0}
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        preds, golds, loss_sum = [], [], 0.0
        for inputs, target in self.batches(data, device):
            logits = model(**inputs).logits
            loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
            preds.append(logits.argmax(-1).cpu())
            golds.append(target.cpu())
        model.train(was_training)
        y_pred, y_true = torch.cat(preds).numpy(), torch.cat(golds).numpy()
        classes = list(range(len(self.labels)))
        return {
            "num_examples": len(y_true),
            "loss": loss_sum / len(y_true),
            "accuracy": float((y_pred == y_true).mean()),
            "macro_f1": float(
                f1_score(y_true, y_pred, labels=classes, average="macro", zero_division=0)
            ),
            "per_class_f1": f1_score(
                y_true, y_pred, labels=classes, average=None, zero_division=0
            ).tolist(),
            "confusion": confusion_matrix(y_true, y_pred, labels=classes).tolist(),
        }

    @torch.no_grad()
    def predict(self, model: nn.Module, ds: Dataset) -> list[dict[str, Any]]:
        """The most probable label and every label's probability, per row."""
        device = next(model.parameters()).device
        model.eval()
        out = []
        for inputs, _ in self.batches(self.encode(ds), device):
            for p in model(**inputs).logits.softmax(-1).cpu().tolist():
                best = max(range(len(p)), key=p.__getitem__)
                out.append(
                    {
                        "label": self.labels[best],
                        **{f"p_{n}": q for n, q in zip(self.labels, p, strict=True)},
                    }
                )
        return out
