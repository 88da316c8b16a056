"""Mean pooling + a linear head as a transformers model.

``fedhaven export --merge`` writes a ``model.pooling = mean`` model in this class, and copies
this file next to the weights: ``AutoModelForSequenceClassification.from_pretrained(DIR,
trust_remote_code=True)`` then loads it with transformers alone. So the file imports nothing
but torch and transformers.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean of the token states under the attention mask."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class MeanPoolingForSequenceClassification(PreTrainedModel):
    """Any encoder (its own config) + mean pooling + ``classifier``."""

    config_class = PretrainedConfig
    base_model_prefix = "encoder"
    # attention is the encoder's: whatever it was loaded with, this class passes it through
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        self.encoder = AutoModel.from_config(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

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


MeanPoolingForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
