"""The sections of the run configuration: model, LoRA, training, privacy and data, each a
frozen dataclass that checks its own values (the federation's section: :mod:`.federation`).

A bad value raises :class:`~fedhaven.errors.FedhavenError` naming the flat key and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from fedhaven.config import keys
from fedhaven.errors import FedhavenError

#: Marks the bundled model / data (shipped by the packages installed with fedhaven).
BUNDLED = "bundled"
#: model.task choices: one module each in fedhaven.tasks.
TASKS = ("seq-cls", "causal-lm", "image-cls")
#: A LoRA setting left to the task's default (fedhaven.tasks: which modules fit its models).
AUTO = "auto"
#: model.head-init choices (seq-cls): nn.Linear's init, or the label names' embeddings.
HEAD_INITS = ("random", "labels")
#: privacy.central choices ("where clipping happens"-"how the bound is set").
CENTRAL_DP = ("off", "server-fixed", "client-fixed", "server-adaptive", "client-adaptive")


def _require(ok: bool, key: str, value: Any, fix: str) -> None:
    if not ok:
        raise FedhavenError(f"config '{key}' = {value!r} is invalid: {fix}")


def _split(csv: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in csv.split(",") if s.strip())


@dataclass(frozen=True)
class ModelConfig:
    path: str = BUNDLED  # local HF directory, or "bundled" for all-MiniLM-L6-v2
    # Tokens per row; 0 ("from the data", seq-cls): the 90th percentile of the rows' token
    # counts, rounded up to a multiple of 32, at most 128 (fedhaven.tasks.seq_cls).
    max_length: int = 0
    # "mean": masked mean of the last hidden states (how sentence encoders such as
    # all-MiniLM-L6-v2 were trained to embed) + a linear head; "cls": the checkpoint's
    # AutoModelForSequenceClassification head (pooler + classifier on [CLS]).
    pooling: str = "mean"
    # What is fine-tuned, on what data: seq-cls (text classification), causal-lm (instruction
    # / response pairs) or image-cls (image classification).
    task: str = "seq-cls"
    # image-cls: images are resized to image-size × image-size pixels (the model's input).
    image_size: int = 32
    # causal-lm: tokens generated per answer at evaluation (greedy) and by `fedhaven predict`.
    max_new_tokens: int = 16
    # seq-cls, mean pooling: how the linear head starts. "random": nn.Linear's init.
    # "labels": class c's row is the encoder's embedding of label-prompt filled with label
    # c's name (unit length, scaled): round 1 starts from a zero-shot classifier, at no
    # privacy cost (the names are config, not data). It helps where the names describe the
    # classes and hurts where they do not (DP at ε=8, BENCHMARKS.md: 20 Newsgroups +3
    # points, SMS "ham"/"spam" -15), so it is a choice, not the default.
    head_init: str = "random"
    # The text embedded for each label by head-init "labels"; "{}" stands for the name, with
    # "_" and "." read as spaces ("sci.med" -> "sci med"). E.g. "This review is {}.".
    label_prompt: str = "{}"

    def __post_init__(self) -> None:
        _require(self.task in TASKS, keys.MODEL_TASK, self.task, f"use one of {', '.join(TASKS)}")
        _require(self.image_size >= 8, keys.MODEL_IMAGE_SIZE, self.image_size, "use at least 8")
        _require(
            self.max_new_tokens >= 1, keys.MODEL_MAX_NEW_TOKENS, self.max_new_tokens, "must be >= 1"
        )
        _require(
            self.max_length == 0 or self.max_length >= 8,
            keys.MODEL_MAX_LENGTH,
            self.max_length,
            "use at least 8 tokens, or 0 to take it from the data",
        )
        _require(
            self.pooling in ("mean", "cls"), "model.pooling", self.pooling, "use 'mean' or 'cls'"
        )
        _require(
            self.head_init in HEAD_INITS,
            keys.MODEL_HEAD_INIT,
            self.head_init,
            f"use one of {', '.join(HEAD_INITS)}",
        )
        _require(
            self.head_init != "labels" or (self.task == "seq-cls" and self.pooling == "mean"),
            keys.MODEL_HEAD_INIT,
            self.head_init,
            "label embeddings fit seq-cls's mean-pooling head only: use model.task = "
            "'seq-cls' with model.pooling = 'mean', or model.head-init = 'random'",
        )
        _require(
            self.label_prompt.count("{}") == 1,
            keys.MODEL_LABEL_PROMPT,
            self.label_prompt,
            "write '{}' once where the label name goes, e.g. 'This review is {}.'",
        )


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # Comma-separated module names; "auto": the task's default (seq-cls: query,value).
    target_modules: str = AUTO
    # Fully trained and sent besides the adapter; "auto": the task's head (seq-cls: classifier).
    modules_to_save: str = AUTO
    # Comma-separated layer indices to adapt ("-1": the last); "" = every layer; "auto": the
    # task's default (seq-cls: -1). Under DP a small adapter learns more per unit of noise,
    # and backward stops at the first adapted layer, so one layer is also fast on a CPU.
    layers: str = AUTO

    def __post_init__(self) -> None:
        _require(self.r >= 1, keys.LORA_R, self.r, "the LoRA rank must be >= 1")
        _require(self.alpha > 0, keys.LORA_ALPHA, self.alpha, "must be > 0")
        _require(0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "must be in [0, 1)")
        _require(
            bool(_split(self.target_modules)),
            "lora.target-modules",
            self.target_modules,
            "name at least one module, e.g. 'query,value', or 'auto'",
        )
        _require(
            self.layers == AUTO or all(i.lstrip("-").isdigit() for i in _split(self.layers)),
            "lora.layers",
            self.layers,
            "give comma-separated layer indices like '4,5' or '-1', '' (all) or 'auto'",
        )

    def resolved(self, target_modules: str, modules_to_save: str, layers: str) -> LoraConfig:
        """This config with each "auto" setting replaced by the given (task's) default."""
        given = {"target_modules": target_modules, "modules_to_save": modules_to_save}
        given["layers"] = layers
        return replace(self, **{k: v for k, v in given.items() if getattr(self, k) == AUTO})

    @property
    def targets(self) -> list[str]:
        return list(_split(self.target_modules))

    @property
    def saved_modules(self) -> list[str]:
        return list(_split(self.modules_to_save))

    @property
    def layer_indices(self) -> list[int] | None:
        return [int(i) for i in _split(self.layers)] or None

    def layers_of(self, num_layers: int) -> list[int] | None:
        """The adapted layers of a model with ``num_layers`` layers, sorted, from 0 (``None``:
        every layer); an error for an index the model does not have."""
        indices = self.layer_indices
        if indices is None:
            return None
        bad = [i for i in indices if not -num_layers <= i < num_layers]
        if bad:
            raise FedhavenError(
                f"config 'lora.layers' = {self.layers!r}: the model has {num_layers} layers "
                f"(indices 0..{num_layers - 1}, or -1 for the last), not {bad[0]}"
            )
        return sorted({i % num_layers for i in indices})


#: The recipe's settings whose best value depends on whether the sites add DP noise: the
#: value each takes when left "auto" (the default), (with DP, without DP). Under DP each
#: step pays for its noise, so a site takes one full-batch step a round and the head a large
#: learning rate (AdamW's first step moves each weight by about its rate); without noise
#: those steps overshoot and miss (a 10-site federation without DP swung from 0.65 to 0.10
#: accuracy between rounds), while minibatch steps at moderate rates come within a few
#: points of pooled training (BENCHMARKS.md, every text set).
RECIPE: dict[str, tuple[float, float]] = {
    keys.TRAIN_LEARNING_RATE: (0.6, 0.03),
    keys.TRAIN_LORA_LEARNING_RATE: (0.001, 0.01),
    keys.TRAIN_LOGIT_ADJUSTMENT: (1.0, 0.5),
    keys.TRAIN_LOCAL_EPOCHS: (1, 2),
    keys.TRAIN_BATCH_SIZE: (256, 32),
    # fedavg's server momentum: without noise it carries the direction the sites share
    # across rounds; under DP it carries their noise too (a constant β = 0.5 on the demo at
    # ε=8: 0.332 against 0.365).
    keys.FEDERATION_SERVER_MOMENTUM: (0.0, 0.5),
}


def recipe(key: str, private: bool) -> float:
    """The value of ``key`` (one of :data:`RECIPE`) when "auto", with or without DP."""
    return RECIPE[key][0 if private else 1]


@dataclass(frozen=True)
class TrainConfig:
    # RECIPE's fields default to their DP values (privacy.enabled's default); from_flat
    # resolves "auto" (or an absent key) by privacy.enabled.
    # The head's (and modules-to-save's) AdamW learning rate.
    learning_rate: float = recipe(keys.TRAIN_LEARNING_RATE, True)
    lora_learning_rate: float = recipe(keys.TRAIN_LORA_LEARNING_RATE, True)  # 0 = learning-rate
    # Learning rate over the rounds: "linear" decays it from the full rate in round 1 to
    # 1/rounds of it in the last; "constant" keeps it. Decay stops the round-to-round
    # overshoot that a fresh AdamW state each round causes under DP noise.
    schedule: str = "linear"
    weight_decay: float = 0.01
    # τ of the logit-adjusted loss CE(logits + τ·log prior, y) (Menon et al., 2021), prior =
    # the site's label distribution (a DP histogram under DP): the head learns balanced
    # scores instead of drifting to the majority class. 0 = plain cross-entropy.
    logit_adjustment: float = recipe(keys.TRAIN_LOGIT_ADJUSTMENT, True)
    local_epochs: int = int(recipe(keys.TRAIN_LOCAL_EPOCHS, True))
    local_steps: int = 0  # > 0 overrides local-epochs: optimizer steps per round
    # The first probe-rounds rounds train the head (lora.modules-to-save) alone, LoRA frozen:
    # linear probing, then fine-tuning (Kumar et al., ICLR 2022). Under DP the noise then
    # falls on the head's weights only. 0: LoRA trains from round 1.
    probe_rounds: int = 0
    # Under DP full-batch steps at sites of up to 256 rows: the noise is added once per step,
    # so fewer, larger steps carry more signal per unit of noise.
    batch_size: int = int(recipe(keys.TRAIN_BATCH_SIZE, True))
    eval_batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        _require(
            self.learning_rate > 0, keys.TRAIN_LEARNING_RATE, self.learning_rate, "must be > 0"
        )
        _require(
            self.lora_learning_rate >= 0,
            keys.TRAIN_LORA_LEARNING_RATE,
            self.lora_learning_rate,
            "must be >= 0 (0 means: same as learning-rate)",
        )
        _require(
            self.schedule in ("linear", "constant"),
            keys.TRAIN_SCHEDULE,
            self.schedule,
            "use 'linear' or 'constant'",
        )
        _require(
            self.logit_adjustment >= 0,
            keys.TRAIN_LOGIT_ADJUSTMENT,
            self.logit_adjustment,
            "must be >= 0 (0 turns it off)",
        )
        _require(self.weight_decay >= 0, "train.weight-decay", self.weight_decay, "must be >= 0")
        _require(self.local_epochs >= 1, keys.TRAIN_LOCAL_EPOCHS, self.local_epochs, "must be >= 1")
        _require(
            self.local_steps >= 0,
            keys.TRAIN_LOCAL_STEPS,
            self.local_steps,
            "must be >= 0 (0 means: use local-epochs)",
        )
        _require(
            self.probe_rounds >= 0,
            keys.TRAIN_PROBE_ROUNDS,
            self.probe_rounds,
            "must be >= 0 (0 means: LoRA trains from round 1)",
        )
        _require(self.batch_size >= 1, keys.TRAIN_BATCH_SIZE, self.batch_size, "must be >= 1")
        _require(
            self.eval_batch_size >= 1,
            keys.TRAIN_EVAL_BATCH_SIZE,
            self.eval_batch_size,
            "must be >= 1",
        )


@dataclass(frozen=True)
class PrivacyConfig:
    enabled: bool = True
    epsilon: float = 8.0  # target ε per site over the planned rounds
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    # σ of the Gaussian noise on each label count of the site's histogram (released once per
    # run for logit adjustment, and accounted like a training step). 0: the σ at which the
    # histogram alone spends a quarter of ε (fedhaven.privacy.prior_noise: 2.16 at ε=8, 15
    # at ε=1).
    # A fixed 8 buried the counts of 20 Newsgroups' sites at ε=8 (4-11 of their 20 classes
    # under 5 rows); about 2 lifted every text set at Dirichlet(0.5) by 2-3 macro-F1 points,
    # IID unchanged (BENCHMARKS.md, every text set), but alone spends ε=2.17.
    prior_noise: float = 0.0
    # Central (site-level) DP at the coordinator, on top of the sites' own record-level DP:
    # off | server-fixed | client-fixed | server-adaptive | client-adaptive — Flower's
    # DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping. Meaningful with many
    # sites: the noise is central-noise × clip / sites on every coordinate.
    central: str = "off"
    central_noise: float = 1.0  # the Gaussian noise multiplier z of each aggregate
    central_clip: float = 1.0  # the bound on a site's update norm (initial bound if adaptive)

    def __post_init__(self) -> None:
        _require(self.epsilon > 0, keys.PRIVACY_EPSILON, self.epsilon, "ε must be > 0")
        _require(0 < self.delta < 1, "privacy.delta", self.delta, "δ must be in (0, 1)")
        _require(
            self.max_grad_norm > 0, keys.PRIVACY_MAX_GRAD_NORM, self.max_grad_norm, "must be > 0"
        )
        _require(
            self.accountant in ("rdp", "prv"),
            "privacy.accountant",
            self.accountant,
            "use 'rdp' or 'prv'",
        )
        _require(
            self.central in CENTRAL_DP,
            keys.PRIVACY_CENTRAL,
            self.central,
            f"use one of {', '.join(CENTRAL_DP)}",
        )
        # a negative σ is a typo (noise is symmetric); 0 is the default, derived from ε
        _require(
            self.prior_noise >= 0,
            "privacy.prior-noise",
            self.prior_noise,
            "must be >= 0 (0 means: spend a quarter of privacy.epsilon on it)",
        )
        _require(self.central_noise > 0, "privacy.central-noise", self.central_noise, "must be > 0")
        _require(self.central_clip > 0, "privacy.central-clip", self.central_clip, "must be > 0")


@dataclass(frozen=True)
class DataConfig:
    path: str = BUNDLED  # csv / jsonl / parquet, or "bundled" for the drug-review set
    test_path: str = BUNDLED  # held-out set for server-side evaluation
    text_column: str = "review"
    label_column: str = "rating"
    labels: str = "negative,neutral,positive"  # fixed label order, the same at every site
    prompt_column: str = "prompt"  # causal-lm: the instruction
    response_column: str = "response"  # causal-lm: the answer the model learns to give
    # image-cls, for a table (csv / jsonl / parquet) of images: the column of image file
    # paths (relative to the table's folder). A folder with one subfolder per label needs none.
    image_column: str = "image"
    val_fraction: float = 0.2  # of each site's rows, for federated evaluation
    partition: str = "dirichlet:1.0"  # iid | dirichlet:ALPHA | column:NAME (simulation)

    def __post_init__(self) -> None:
        names = _split(self.labels)
        _require(
            len(names) >= 2,
            keys.DATA_LABELS,
            self.labels,
            "give at least two comma-separated labels",
        )
        _require(
            len(set(names)) == len(names), keys.DATA_LABELS, self.labels, "labels must be unique"
        )
        _require(
            0.0 <= self.val_fraction < 1.0,
            "data.val-fraction",
            self.val_fraction,
            "must be in [0, 1)",
        )
        _require(bool(self.text_column), keys.DATA_TEXT_COLUMN, self.text_column, "name a column")
        _require(
            bool(self.label_column), keys.DATA_LABEL_COLUMN, self.label_column, "name a column"
        )
        _require(
            self.test_path != BUNDLED or self.path == BUNDLED,
            keys.DATA_TEST_PATH,
            self.test_path,
            "the bundled test set fits only the bundled data: pass --test FILE",
        )
        self.partition_scheme  # validates  # noqa: B018

    @property
    def label_names(self) -> list[str]:
        return list(_split(self.labels))

    @property
    def partition_scheme(self) -> tuple[str, float | str | None]:
        """``("iid", None)``, ``("dirichlet", alpha)`` or ``("column", name)``."""
        kind, _, arg = self.partition.partition(":")
        fix = "use iid, dirichlet:ALPHA (ALPHA > 0) or column:NAME"
        if kind == "iid" and not arg:
            return "iid", None
        if kind == "column" and arg:
            return "column", arg
        if kind == "dirichlet":
            try:
                alpha = float(arg)
            except ValueError:
                alpha = -1.0
            _require(alpha > 0, keys.DATA_PARTITION, self.partition, fix)
            return "dirichlet", alpha
        raise FedhavenError(f"config 'data.partition' = {self.partition!r} is invalid: {fix}")
