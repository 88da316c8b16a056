"""Base model from a local Hugging Face directory, LoRA via PEFT, adapter state get/set.

What a site trains is exactly what it sends: the trainable parameters of the PEFT model (the
LoRA matrices and the ``modules_to_save`` copies, e.g. the classifier). Their names are the
PEFT model's own parameter names; :mod:`fedhaven.protocol` carries them over the wire.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors.torch import save_file
from torch import nn

from fedhaven import hf_mean_pooling
from fedhaven.config import Config, from_flat
from fedhaven.errors import FedhavenError
from fedhaven.hf_mean_pooling import (
    AUTO_CLASS_KEY,
    BASE_DIR,
    HEAD_FILE,
    PRETRAINED_KEY,
    MeanPoolingForSequenceClassification,
)
from fedhaven.tasks import get_task

log = logging.getLogger(__name__)

AdapterState = dict[str, torch.Tensor]
#: In the names of PEFT's LoRA A and B matrices (A is frozen by the "ffa" rule; A is r × in,
#: B out × r, PEFT's delta (α/r)·B·A).
LORA_A = ".lora_A."
LORA_B = ".lora_B."


def is_lora(name: str) -> bool:
    """Whether a parameter or adapter key is one of LoRA's factors (not a tensor trained in
    full, such as the head)."""
    return LORA_A in name or LORA_B in name


def build_base(cfg: Config) -> nn.Module:
    """The frozen-to-be base model with a fresh, seeded head (before LoRA)."""
    torch.manual_seed(cfg.train.seed)  # same head / LoRA-A init at every site
    return get_task(cfg).build_base()


@functools.lru_cache(maxsize=2)
def _cached_peft_model(cfg: Config, device: str) -> PeftModel:
    # Loaded once per process (a Ray actor, a site process): rounds deep-copy this.
    base = build_base(cfg)
    # opacus#820: move before get_peft_model, or LoRA weights silently never change.
    base.to(device)
    task = get_task(cfg)
    lora = task.lora
    peft_config = PeftLoraConfig(
        task_type=task.peft_task_type,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.targets,
        modules_to_save=lora.saved_modules or None,
        # a model without numbered layers (a ResNet) has 0: lora.layers must then be ""
        layers_to_transform=lora.layers_of(getattr(base.config, "num_hidden_layers", 0)),
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


#: The module PEFT names the head in (``modules_to_save``): what ``base/`` keeps as initialised.
HEAD = "classifier"
#: What a base directory needs to load with transformers alone (and the adapter on it).
REMOTE_CODE_FILE = Path(hf_mean_pooling.__file__).name
BASE_FILES = ("config.json", REMOTE_CODE_FILE, HEAD_FILE)


def save_trained(model: PeftModel, cfg: Config, directory: Path) -> None:
    """The adapter in PEFT format, the tokenizer, and the config that rebuilds the base.

    The adapter loads with transformers and peft alone: its ``base_model_name_or_path`` is a
    real directory (:func:`save_hf_base`), and PEFT's ``auto_mapping``, which would name our
    training-time class, names the transformers auto class instead.
    """
    task = get_task(cfg)
    peft_config = model.peft_config[model.active_adapter]
    peft_config.base_model_name_or_path = str(save_hf_base(model, cfg, directory))
    model.save_pretrained(directory)
    if peft_config.task_type is None and task.hf_auto_class:
        saved = copy.deepcopy(peft_config)
        saved.inference_mode = True  # as PEFT's own save writes it
        auto = {"base_model_class": task.hf_auto_class, "parent_library": "transformers"}
        saved.save_pretrained(directory, auto_mapping_dict=auto)
    task.save_processor(directory)
    (directory / RUN_CONFIG_FILE).write_text(json.dumps(cfg.to_flat(), indent=2) + "\n")


def save_hf_base(model: PeftModel, cfg: Config, directory: Path) -> Path:
    """The absolute directory of the adapter's base model, for transformers alone.

    A task whose pretrained directory is its base as is (causal-lm): that directory. A
    classifier, whose head and labels the pretrained model lacks: ``directory/base``, the
    base model's config with the run's labels, the remote code that loads it (the pretrained
    weights from their own directory, so the adapter directory stays small) and the head as
    initialised, which the adapter's trained copy (``modules_to_save``) replaces when it has one.
    """
    task = get_task(cfg)
    pretrained = task.model_path().resolve()
    if task.hf_auto_class is None:
        return pretrained
    base = model.get_base_model()
    labels = cfg.data.label_names
    hf_config = copy.deepcopy(base.config)
    hf_config.id2label = dict(enumerate(labels))  # and so num_labels
    hf_config.label2id = {name: i for i, name in enumerate(labels)}
    remote = task.hf_remote_class
    hf_config.architectures = [remote]
    hf_config.auto_map = {task.hf_auto_class: f"{Path(REMOTE_CODE_FILE).stem}.{remote}"}
    setattr(hf_config, PRETRAINED_KEY, str(pretrained))
    setattr(hf_config, AUTO_CLASS_KEY, task.hf_auto_class)
    # PEFT keeps the head it trains in a copy (modules_to_save): the base's is the initial one
    head = {
        name.replace(".original_module.", "."): t.detach().cpu().contiguous()
        for name, t in base.state_dict().items()
        if name.startswith(f"{HEAD}.") and ".modules_to_save." not in name
    }
    if not head:  # the run's adapter is saved all the same: fedhaven loads it without base/
        log.warning(
            "the base model has no '%s' module: base/%s is empty, and loading the adapter "
            "without fedhaven gets a fresh head unless lora.modules-to-save trains it",
            HEAD,
            HEAD_FILE,
        )
    out = directory / BASE_DIR
    out.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(out)
    shutil.copyfile(hf_mean_pooling.__file__, out / REMOTE_CODE_FILE)
    save_file(head, out / HEAD_FILE)
    return out.resolve()


def check_adapter_dir(directory: Path) -> None:
    """A FedhavenError naming the first file a trained adapter directory lacks.

    ``base/`` is checked where the adapter points at one (adapters saved before it existed
    have a null ``base_model_name_or_path`` and still load in fedhaven).
    """
    fix = "copy the whole adapter directory again from the run's output (RUN/adapter)"
    if not (directory / RUN_CONFIG_FILE).is_file():
        raise FedhavenError(
            f"'{directory}' is not a fedhaven adapter directory (no {RUN_CONFIG_FILE}): "
            "pass the adapter a run wrote, RUN/adapter"
        )
    if not (directory / CONFIG_NAME).is_file():
        raise FedhavenError(f"adapter directory '{directory}' has no {CONFIG_NAME}: {fix}")
    if not any((directory / w).is_file() for w in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)):
        raise FedhavenError(
            f"adapter directory '{directory}' has no adapter weights "
            f"({SAFETENSORS_WEIGHTS_NAME}): {fix}"
        )
    try:
        base = json.loads((directory / CONFIG_NAME).read_text()).get("base_model_name_or_path")
    except (json.JSONDecodeError, AttributeError) as e:
        raise FedhavenError(
            f"'{directory / CONFIG_NAME}' is not a PEFT adapter config: {fix}"
        ) from e
    if base is not None and get_task(trained_config(directory)).hf_auto_class:
        for name in BASE_FILES:
            if not (directory / BASE_DIR / name).is_file():
                raise FedhavenError(
                    f"adapter directory '{directory}' has no {BASE_DIR}/{name}, which loading "
                    f"it without fedhaven needs: {fix}"
                )


def load_trained(directory: str | Path) -> PeftModel:
    """A trained adapter on its base: ``PeftModel.from_pretrained(build_base(cfg), directory)``.

    Without fedhaven, PEFT and transformers load it on ``base/`` (:func:`save_hf_base`).
    """
    d = Path(directory)
    check_adapter_dir(d)
    try:
        return PeftModel.from_pretrained(build_base(trained_config(d)), d).eval()
    except RuntimeError as e:  # torch's size mismatch: weights of another rank or base model
        if "size mismatch" not in str(e):
            raise
        raise FedhavenError(
            f"adapter directory '{d}': its weights do not fit the model its "
            f"{RUN_CONFIG_FILE} and {CONFIG_NAME} describe (another LoRA rank or base "
            "model?): copy the whole adapter directory again from the run's output (RUN/adapter)"
        ) from e


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
    if cfg.model.task == "seq-cls" and cfg.model.pooling == "mean":
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
    get_task(cfg).save_processor(o)
    return o


def full_model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter: what sending the whole model would cost."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


# --- LoRA at another rank (federation.strategy = flexlora) ----------------------------------


def lora_pairs(names: Iterable[str]) -> dict[str, str]:
    """LoRA A name -> its B's name, for each A in ``names`` whose B is there too."""
    names = list(names)
    present = set(names)
    return {
        n: n.replace(LORA_A, LORA_B)
        for n in names
        if LORA_A in n and n.replace(LORA_A, LORA_B) in present
    }


def lora_rank(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """The LoRA rank of an adapter, from its tensors' shapes (``None``: no LoRA pair)."""
    pairs = lora_pairs(shapes)
    return shapes[next(iter(pairs))][0] if pairs else None


def at_rank(shapes: Mapping[str, tuple[int, ...]], rank: int) -> dict[str, tuple[int, ...]]:
    """The shapes of the same adapter with every LoRA pair at ``rank``."""
    pairs = lora_pairs(shapes)
    return {
        k: (rank, s[1]) if k in pairs else (s[0], rank) if k in pairs.values() else s
        for k, s in shapes.items()
    }


def truncated_lora(
    b: torch.Tensor, a: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (B', A') at ``rank`` whose product is the best rank-``rank`` approximation of
    B·A in the Frobenius norm (truncated SVD, Eckart–Young): exact when B·A has rank <=
    ``rank``, else off by the norm of the singular values dropped.

    B·A (out × in) is never formed: with B = Q_b·R_b and Aᵀ = Q_a·R_a, B·A = Q_b·(R_b·R_aᵀ)·Q_aᵀ,
    so the SVD of that small core is B·A's. The singular values all go into B' (B' = U·S,
    A' = Vᵀ with orthonormal rows), as in FlexLoRA: a direction whose singular value is 0 (in
    round 1 all are, PEFT starting B at 0) keeps a unit row of A' and trains like a fresh
    LoRA direction; split as √S into both factors it would be 0 in both, where LoRA's
    gradients vanish for good. Past B·A's inner dimension, A' gets orthonormal rows outside
    its row space (B' is 0 there). Computed in float64; returned in the inputs' dtypes.
    """
    out_dim, in_dim = b.shape[0], a.shape[1]
    qb, rb = torch.linalg.qr(b.detach().to("cpu", torch.float64))
    qa, ra = torch.linalg.qr(a.detach().to("cpu", torch.float64).T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)  # full: u and vh square
    k = min(rank, s.numel())
    new_b = torch.zeros(out_dim, rank, dtype=torch.float64)
    new_b[:, :k] = qb @ (u[:, :k] * s[:k])
    rows = vh @ qa.T  # orthonormal rows spanning A's row space, by singular value
    extra = min(rank, in_dim) - rows.shape[0]
    if extra > 0:  # seeded, so every site and the coordinator pick the same directions
        seeded = torch.Generator().manual_seed(0)
        c = torch.randn(in_dim, extra, dtype=torch.float64, generator=seeded)
        for _ in range(2):  # project out A's row space twice: once can leave float error
            c -= rows.T @ (rows @ c)
        rows = torch.cat([rows, torch.linalg.qr(c)[0].T])
    new_a = torch.zeros(rank, in_dim, dtype=torch.float64)
    new_a[: min(rank, rows.shape[0])] = rows[:rank]
    return new_b.to(b.dtype), new_a.to(a.dtype)


def refactor_lora(state: Mapping[str, torch.Tensor], rank: int) -> AdapterState:
    """``state`` with each LoRA pair of another rank than ``rank`` refactored at ``rank``
    (:func:`truncated_lora`); pairs at ``rank`` and the other tensors are kept as they are.

    A flexlora site whose rank the coordinator does not know yet receives the global rank
    and truncates here, by the same SVD the coordinator uses for the sites it knows.
    """
    out = dict(state)
    for a_name, b_name in lora_pairs(state).items():
        if state[a_name].shape[0] != rank:
            out[b_name], out[a_name] = truncated_lora(state[b_name], state[a_name], rank)
    return out
