"""Transformers models that load without fedhaven: the remote code shipped with its outputs.

``fedhaven export --merge`` writes a ``model.pooling = mean`` model in
:class:`MeanPoolingForSequenceClassification` and copies this file next to the weights. A
run's adapter directory holds a small ``base/`` directory (:data:`BASE_DIR`): the base
model's config with the run's labels, this file, and the head the adapter was trained on
(:data:`HEAD_FILE`), but not the base's weights: its config's :data:`PRETRAINED_KEY` names
the pretrained directory, read from there by the stock transformers loader. So
``AutoPeftModelForSequenceClassification.from_pretrained(adapter, trust_remote_code=True)``
loads base + adapter with transformers and peft alone, and this file imports nothing else.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

#: The base directory inside an adapter directory (the adapter's ``base_model_name_or_path``).
BASE_DIR = "base"
#: In a base directory: the head (``classifier``) the adapter was trained on, as initialised.
HEAD_FILE = "head.safetensors"
#: Config keys of a base directory: the pretrained model's directory, and the stock auto
#: class that loads it (for a head other than mean pooling).
PRETRAINED_KEY = "pretrained_path"
AUTO_CLASS_KEY = "pretrained_auto_class"
#: ``from_pretrained`` keywords passed on to the pretrained model's loader (not hub options).
_LOAD_KWARGS = ("dtype", "torch_dtype", "attn_implementation", "device_map")


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean of the token states under the attention mask."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def _pretrained(config: PretrainedConfig | None) -> tuple[str | None, PretrainedConfig | None]:
    """The pretrained directory a base directory's config points to, and that config without
    the keys of this file (so the stock loader does not come back here)."""
    path = getattr(config, PRETRAINED_KEY, None)
    if config is None or path is None:
        return None, config
    plain = copy.deepcopy(config)
    for key in (PRETRAINED_KEY, AUTO_CLASS_KEY, "auto_map"):
        if hasattr(plain, key):
            delattr(plain, key)
    return path, plain


def _with_head(model: PreTrainedModel, directory: str | Path) -> PreTrainedModel:
    """``model`` with the head saved in ``directory``, in eval mode like ``from_pretrained``."""
    head = load_file(Path(directory) / HEAD_FILE)
    # the head only (the rest is pretrained), but all of it
    unexpected = model.load_state_dict(head, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"{directory}/{HEAD_FILE}: {unexpected} are not in the model")
    return model.eval()


class MeanPoolingForSequenceClassification(PreTrainedModel):
    """Any encoder (its own config) + mean pooling + ``classifier``."""

    config_class = PretrainedConfig
    base_model_prefix = "encoder"
    # attention is the encoder's: whatever it was loaded with, this class passes it through
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: PretrainedConfig, encoder: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        self.encoder = AutoModel.from_config(config) if encoder is None else encoder
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any):
        """A saved model, or from a base directory: the pretrained encoder, read by
        ``AutoModel`` from its own directory (whatever its checkpoint's key prefix), under
        the head saved here."""
        path, plain = _pretrained(kwargs.get("config"))
        if path is None:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        load = {k: kwargs[k] for k in _LOAD_KWARGS if k in kwargs}
        encoder = AutoModel.from_pretrained(path, **load)
        model = cls(plain, encoder=encoder).to(encoder.dtype)
        return _with_head(model, pretrained_model_name_or_path)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **_: object,
    ) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = self.classifier(mean_pool(hidden, attention_mask))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


class PretrainedWithHead(PreTrainedModel):
    """Never built: ``from_pretrained`` on a base directory returns the stock transformers
    model (its config's :data:`AUTO_CLASS_KEY`, e.g. a ``BertForSequenceClassification``)
    read from the pretrained directory, with this directory's labels and head."""

    config_class = PretrainedConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any):
        path, plain = _pretrained(kwargs.get("config"))
        if path is None:
            raise ValueError(
                f"{pretrained_model_name_or_path}: config.json has no {PRETRAINED_KEY}"
            )
        auto = getattr(transformers, getattr(kwargs["config"], AUTO_CLASS_KEY))
        load = {k: kwargs[k] for k in _LOAD_KWARGS if k in kwargs}
        # the pretrained checkpoint's own head may have another label count: the saved one applies
        model = auto.from_pretrained(path, config=plain, ignore_mismatched_sizes=True, **load)
        return _with_head(model, pretrained_model_name_or_path)


MeanPoolingForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
