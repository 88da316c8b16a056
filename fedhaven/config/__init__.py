"""The one typed run configuration.

Flower's run-config is flat (``{"train.learning-rate": 0.01, ...}``, values str|int|float|bool).
:func:`from_flat` turns it into a frozen :class:`Config` once, at each app boundary; everything
inward takes typed objects. Flat keys are ``<section>.<field>`` with ``-`` for ``_``.
Unknown keys and bad values raise :class:`~fedhaven.errors.FedhavenError`.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints

from fedhaven.errors import FedhavenError

#: Marks the bundled model / data (shipped by the packages installed with fedhaven).
BUNDLED = "bundled"

Scalar = str | int | float | bool

# A site's own settings: Flower node-config keys, never run-config keys. Set by the site's
# operator (`fedhaven site`), or in a simulation by Flower (partition-id, num-partitions) and
# the harness (the rest). Here, not in the ClientApp, so the site launcher needs no torch.
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
DATA_PATH = "data-path"
STATE_DIR = "state-dir"  # the site's own directory: its privacy ledger lives there
EPSILON_BUDGET = "epsilon-budget"  # the site's own ε limit over its whole ledger
DELTA = "delta"  # the site's own δ for that limit
LORA_RANK = "lora-rank"  # the site's own LoRA rank (federation.strategy = flexlora only)
# The site's rules for its own data (fedhaven.datacheck): what a label outside the run's set,
# or one differing only by case or whitespace, does (drop | map | stop), and the rows per
# class below which the site warns.
LABEL_RULE = "label-rule"
MIN_PER_CLASS = "min-per-class"
#: Simulation only, for research on robust rules: the site sends the global adapter plus this
#: multiple of its update (a hostile or broken site). No deployed site reads it.
UPDATE_SCALE = "update-scale"
#: model.task choices: one module each in fedhaven.tasks.
TASKS = ("seq-cls", "causal-lm", "image-cls")
#: A LoRA setting left to the task's default (fedhaven.tasks: which modules fit its models).
AUTO = "auto"
#: privacy.central choices ("where clipping happens"-"how the bound is set").
CENTRAL_DP = ("off", "server-fixed", "client-fixed", "server-adaptive", "client-adaptive")
#: federation.strategy choices: the aggregation rule (fedhaven.strategies, one file each).
STRATEGIES = (
    "fedavg",
    "ffa",
    "fedprox",
    "fedadam",
    "fedyogi",
    "fedmedian",
    "trimmedavg",
    "krum",
    "flexlora",
)
#: Run-config keys a resume may change: the switch itself, how long a round waits for the
#: sites, where the run directory lies (a moved run directory can still be resumed), and the
#: simulated sites' CPUs. Everything else shapes the model or the privacy guarantee and must
#: stay the checkpoint's (fedhaven.server.app) and names the run (fedhaven.privacy).
RESUME_MAY_CHANGE = (
    "federation.resume",
    "federation.round-timeout",
    "federation.rejoin-wait",
    "federation.out-dir",
    "federation.site-cpus",
)
#: Rules whose server side is the plain average that central DP's sensitivity bound assumes
#: (FedProx changes only the sites' local objective).
CENTRAL_DP_STRATEGIES = ("fedavg", "ffa", "fedprox")
#: Rules whose server side needs only the sites' weighted mean, which is all that SecAgg+
#: reveals (fedadam/fedyogi take their server step from that mean); the robust rules and
#: flexlora need each site's own tensors.
SECURE_AGGREGATION_STRATEGIES = ("fedavg", "ffa", "fedprox", "fedadam", "fedyogi")
#: Central DP modes that clip at the site, before the update is masked; server-side
#: clipping needs each site's update in the clear.
SECURE_AGGREGATION_CENTRAL = ("off", "client-fixed", "client-adaptive")


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

    def __post_init__(self) -> None:
        _require(self.task in TASKS, "model.task", self.task, f"use one of {', '.join(TASKS)}")
        _require(self.image_size >= 8, "model.image-size", self.image_size, "use at least 8")
        _require(
            self.max_new_tokens >= 1, "model.max-new-tokens", self.max_new_tokens, "must be >= 1"
        )
        _require(
            self.max_length == 0 or self.max_length >= 8,
            "model.max-length",
            self.max_length,
            "use at least 8 tokens, or 0 to take it from the data",
        )
        _require(
            self.pooling in ("mean", "cls"), "model.pooling", self.pooling, "use 'mean' or 'cls'"
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
        _require(self.r >= 1, "lora.r", self.r, "the LoRA rank must be >= 1")
        _require(self.alpha > 0, "lora.alpha", self.alpha, "must be > 0")
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


@dataclass(frozen=True)
class TrainConfig:
    learning_rate: float = 0.6  # the head's (and modules-to-save's) AdamW learning rate
    lora_learning_rate: float = 0.001  # 0 = same as learning-rate
    # Learning rate over the rounds: "linear" decays it from the full rate in round 1 to
    # 1/rounds of it in the last; "constant" keeps it. Decay stops the round-to-round
    # overshoot that a fresh AdamW state each round causes under DP noise.
    schedule: str = "linear"
    weight_decay: float = 0.01
    # τ of the logit-adjusted loss CE(logits + τ·log prior, y) (Menon et al., 2021), prior =
    # the site's label distribution (a DP histogram under DP): the head learns balanced
    # scores instead of drifting to the majority class. 0 = plain cross-entropy.
    logit_adjustment: float = 1.0
    local_epochs: int = 1
    local_steps: int = 0  # > 0 overrides local-epochs: optimizer steps per round
    # Full-batch steps at demo-sized sites (~150 rows): under DP the noise is added once per
    # step, so fewer, larger steps carry more signal per unit of noise.
    batch_size: int = 256
    eval_batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.learning_rate > 0, "train.learning-rate", self.learning_rate, "must be > 0")
        _require(
            self.lora_learning_rate >= 0,
            "train.lora-learning-rate",
            self.lora_learning_rate,
            "must be >= 0 (0 means: same as learning-rate)",
        )
        _require(
            self.schedule in ("linear", "constant"),
            "train.schedule",
            self.schedule,
            "use 'linear' or 'constant'",
        )
        _require(
            self.logit_adjustment >= 0,
            "train.logit-adjustment",
            self.logit_adjustment,
            "must be >= 0 (0 turns it off)",
        )
        _require(self.weight_decay >= 0, "train.weight-decay", self.weight_decay, "must be >= 0")
        _require(self.local_epochs >= 1, "train.local-epochs", self.local_epochs, "must be >= 1")
        _require(
            self.local_steps >= 0,
            "train.local-steps",
            self.local_steps,
            "must be >= 0 (0 means: use local-epochs)",
        )
        _require(self.batch_size >= 1, "train.batch-size", self.batch_size, "must be >= 1")
        _require(
            self.eval_batch_size >= 1, "train.eval-batch-size", self.eval_batch_size, "must be >= 1"
        )


@dataclass(frozen=True)
class PrivacyConfig:
    enabled: bool = True
    epsilon: float = 8.0  # target ε per site over the planned rounds
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    # σ of the Gaussian noise on each label count of the site's histogram (released once per
    # run for logit adjustment, and accounted like a training step)
    prior_noise: float = 8.0
    # Central (site-level) DP at the coordinator, on top of the sites' own record-level DP:
    # off | server-fixed | client-fixed | server-adaptive | client-adaptive — Flower's
    # DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping. Meaningful with many
    # sites: the noise is central-noise × clip / sites on every coordinate.
    central: str = "off"
    central_noise: float = 1.0  # the Gaussian noise multiplier z of each aggregate
    central_clip: float = 1.0  # the bound on a site's update norm (initial bound if adaptive)

    def __post_init__(self) -> None:
        _require(self.epsilon > 0, "privacy.epsilon", self.epsilon, "ε must be > 0")
        _require(0 < self.delta < 1, "privacy.delta", self.delta, "δ must be in (0, 1)")
        _require(self.max_grad_norm > 0, "privacy.max-grad-norm", self.max_grad_norm, "must be > 0")
        _require(
            self.accountant in ("rdp", "prv"),
            "privacy.accountant",
            self.accountant,
            "use 'rdp' or 'prv'",
        )
        _require(
            self.central in CENTRAL_DP,
            "privacy.central",
            self.central,
            f"use one of {', '.join(CENTRAL_DP)}",
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
            len(names) >= 2, "data.labels", self.labels, "give at least two comma-separated labels"
        )
        _require(len(set(names)) == len(names), "data.labels", self.labels, "labels must be unique")
        _require(
            0.0 <= self.val_fraction < 1.0,
            "data.val-fraction",
            self.val_fraction,
            "must be in [0, 1)",
        )
        _require(bool(self.text_column), "data.text-column", self.text_column, "name a column")
        _require(bool(self.label_column), "data.label-column", self.label_column, "name a column")
        _require(
            self.test_path != BUNDLED or self.path == BUNDLED,
            "data.test-path",
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
            _require(alpha > 0, "data.partition", self.partition, fix)
            return "dirichlet", alpha
        raise FedhavenError(f"config 'data.partition' = {self.partition!r} is invalid: {fix}")


@dataclass(frozen=True)
class FederationConfig:
    rounds: int = 5
    sites: int = 4  # simulated sites (fedhaven simulate)
    # fedhaven simulate: CPUs (torch threads) for each simulated site's Ray actor, at most the
    # machine's; C cores train C // site-cpus sites at once. Two threads per site beat two
    # one-thread sites side by side on 2 cores: uneven sites leave no core idle waiting, and
    # one actor loads the model once (BENCHMARKS.md: federation overhead).
    site_cpus: int = 2
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_sites: int = 2
    out_dir: str = ""  # the run directory; "" = runs/<timestamp>
    # The aggregation rule: fedavg | ffa (LoRA's A frozen: exact, half the bytes) | fedprox |
    # fedadam | fedyogi (server optimizers) | fedmedian | trimmedavg | krum (robust to a
    # minority of hostile sites) | flexlora (sites at LoRA ranks of their own, node config
    # lora-rank: the mean of B·A, truncated by SVD to each site's rank).
    strategy: str = "fedavg"
    # fedprox: μ of the proximal term μ/2·‖w − w_global‖² each site adds to its local loss.
    proximal_mu: float = 0.01
    # fedadam / fedyogi: the server optimizer's step size η over the LoRA factors (the head
    # takes the sites' mean: strategies/base.py). Their step moves each coordinate by about
    # η per round whatever the size of the averaged update (m/√v ≈ its sign), so η must be
    # on the scale of one round's change of a LoRA weight: a few AdamW steps at
    # train.lora-learning-rate (1e-3) each, i.e. ~1e-2. Flower's FedAdam default (0.1) would
    # move every LoRA weight 10-100× further than the sites themselves did.
    server_learning_rate: float = 0.01
    # trimmedavg: the fraction of updates cut at each end, per coordinate, before averaging.
    trim_beta: float = 0.2
    # krum: the number of hostile sites f to tolerate (Krum is sound for sites > 2f + 2).
    krum_byzantine: int = 1
    # > 0: clip each site's update (reply − the adapter sent) to this L2 norm before the
    # rule sees it, so no single site can move the model further than that. 0 = off.
    update_norm_bound: float = 0.0
    # > 0: reject (leave out of the round, in the audit log) a site's update whose L2 norm
    # exceeds this; checked before update-norm-bound clips. 0 = off.
    max_update_norm: float = 0.0
    # > 0: stop when the sites' validation macro-F1 (example-weighted) has not improved by
    # more than min-delta for this many rounds, and export the best round's adapter. Under
    # DP the rounds not run are budget not spent. 0 = run every round, export the last.
    patience: int = 0
    min_delta: float = 0.0
    # Seconds each phase of a round (train, then evaluate) waits for the sites' replies; a
    # site that has not answered by then is left out of that round (Flower's default: 3600).
    round_timeout: float = 600.0
    # Seconds a round waits, before it picks its sites, for sites of earlier rounds that are
    # not connected (a site restarted mid-run rejoins once Flower frees its old connection,
    # about a minute after its last heartbeat). 0 = no wait: a round takes who is there.
    rejoin_wait: float = 0.0
    # Go on from the checkpoint in out-dir (written after every round) instead of starting
    # over: the run config must be the checkpoint's (resume, round-timeout and out-dir aside).
    resume: bool = False
    # Flower's SecAgg+: the coordinator learns only the sites' weighted mean of each round,
    # never one site's tensors (fedhaven.strategies.secagg).
    secure_aggregation: bool = False
    # SecAgg+ quantises each site's weighted tensors, w·x with w = weight / max-weight, to
    # 2^22 levels over [-clip, +clip]: every |w·x| must lie within it (a site refuses its
    # update otherwise), and the error of the mean grows with clip / (sum of the w): keep clip
    # small and max-weight near the largest site's example count (the weight is 1 per site
    # under central DP, where max-weight is ignored).
    secagg_clip: float = 8.0
    secagg_max_weight: float = 1000.0

    def __post_init__(self) -> None:
        _require(self.rounds >= 1, "federation.rounds", self.rounds, "must be >= 1")
        _require(self.secagg_clip > 0, "federation.secagg-clip", self.secagg_clip, "must be > 0")
        _require(
            self.secagg_max_weight > 0,
            "federation.secagg-max-weight",
            self.secagg_max_weight,
            "must be > 0",
        )
        if self.secure_aggregation:
            self._check_secure_aggregation()
        _require(
            self.round_timeout > 0,
            "federation.round-timeout",
            self.round_timeout,
            "must be > 0 seconds",
        )
        _require(
            self.rejoin_wait >= 0,
            "federation.rejoin-wait",
            self.rejoin_wait,
            "must be >= 0 seconds (0: no wait)",
        )
        _require(
            not self.resume or bool(self.out_dir),
            "federation.resume",
            self.resume,
            "set federation.out-dir to the directory of the run to resume",
        )
        _require(self.patience >= 0, "federation.patience", self.patience, "must be >= 0")
        _require(self.min_delta >= 0, "federation.min-delta", self.min_delta, "must be >= 0")
        _require(self.sites >= 1, "federation.sites", self.sites, "must be >= 1")
        _require(self.site_cpus >= 1, "federation.site-cpus", self.site_cpus, "must be >= 1")
        _require(
            0.0 < self.fraction_train <= 1.0,
            "federation.fraction-train",
            self.fraction_train,
            "must be in (0, 1]",
        )
        _require(
            0.0 <= self.fraction_evaluate <= 1.0,
            "federation.fraction-evaluate",
            self.fraction_evaluate,
            "must be in [0, 1]",
        )
        _require(self.min_sites >= 1, "federation.min-sites", self.min_sites, "must be >= 1")
        _require(
            self.strategy in STRATEGIES,
            "federation.strategy",
            self.strategy,
            f"use one of {', '.join(STRATEGIES)}",
        )
        # Norm bounds compare each reply with the one adapter sent to every site; flexlora
        # sends each site factors of its own rank.
        for key, value in (
            ("federation.update-norm-bound", self.update_norm_bound),
            ("federation.max-update-norm", self.max_update_norm),
        ):
            _require(
                self.strategy != "flexlora" or value == 0,
                key,
                value,
                "flexlora sends each site factors of its own rank, which these bounds do not "
                "handle: set it to 0",
            )
        _require(self.proximal_mu >= 0, "federation.proximal-mu", self.proximal_mu, "must be >= 0")
        _require(
            self.server_learning_rate > 0,
            "federation.server-learning-rate",
            self.server_learning_rate,
            "must be > 0",
        )
        _require(
            0.0 <= self.trim_beta < 0.5,
            "federation.trim-beta",
            self.trim_beta,
            "must be in [0, 0.5)",
        )
        _require(
            self.krum_byzantine >= 0,
            "federation.krum-byzantine",
            self.krum_byzantine,
            "must be >= 0",
        )
        _require(
            self.update_norm_bound >= 0,
            "federation.update-norm-bound",
            self.update_norm_bound,
            "must be >= 0 (0 turns it off)",
        )
        _require(
            self.max_update_norm >= 0,
            "federation.max-update-norm",
            self.max_update_norm,
            "must be >= 0 (0 turns it off)",
        )

    def _check_secure_aggregation(self) -> None:
        """What SecAgg+ cannot serve: rules and checks that need each site's own tensors."""
        _require(
            self.strategy in SECURE_AGGREGATION_STRATEGIES,
            "federation.strategy",
            self.strategy,
            "secure aggregation reveals only the sites' mean, this rule needs each site's "
            f"update: use {', '.join(SECURE_AGGREGATION_STRATEGIES)}, or "
            "federation.secure-aggregation = false",
        )
        for key, value in (
            ("federation.update-norm-bound", self.update_norm_bound),
            ("federation.max-update-norm", self.max_update_norm),
        ):
            _require(
                value == 0,
                key,
                value,
                "the coordinator cannot see a site's update under secure aggregation: set it "
                "to 0, or federation.secure-aggregation = false",
            )
        _require(
            min(self.min_sites, self.sites) >= 2,
            "federation.min-sites",
            self.min_sites,
            "SecAgg+ masks each update with the other sites': it needs at least 2 sites per "
            "round (federation.sites and federation.min-sites >= 2)",
        )


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)

    def __post_init__(self) -> None:
        central, fed = self.privacy.central, self.federation
        _require(
            not fed.secure_aggregation or central in SECURE_AGGREGATION_CENTRAL,
            "privacy.central",
            central,
            "server-side clipping needs each site's update, which secure aggregation hides: "
            "use 'client-fixed' or 'client-adaptive', or federation.secure-aggregation = false",
        )
        if central == "off":
            return
        _require(
            fed.strategy in CENTRAL_DP_STRATEGIES,
            "federation.strategy",
            fed.strategy,
            f"privacy.central = {central!r} calibrates its noise to the plain average of "
            f"clipped updates: use {' or '.join(CENTRAL_DP_STRATEGIES)}, or privacy.central = "
            "'off'",
        )
        _require(
            fed.update_norm_bound == 0,
            "federation.update-norm-bound",
            fed.update_norm_bound,
            f"privacy.central = {central!r} already clips each update to privacy.central-clip:"
            " set it to 0",
        )

    def to_flat(self) -> dict[str, Scalar]:
        """The flat form Flower's run-config uses (inverse of :func:`from_flat`)."""
        return {
            _flat_key(sec.name, f.name): getattr(getattr(self, sec.name), f.name)
            for sec in fields(self)
            for f in fields(getattr(self, sec.name))
        }

    def replace(self, **flat: Scalar) -> Config:
        """A copy with some flat keys changed (validated like :func:`from_flat`)."""
        return from_flat({**self.to_flat(), **flat})


def _flat_key(section: str, name: str) -> str:
    return f"{section}.{name.replace('_', '-')}"


def _coerce(key: str, value: Any, typ: type) -> Scalar:
    # bool is an int subclass: check it first so True never passes as 1
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
    raise FedhavenError(f"config '{key}' = {value!r} is invalid: expected a {typ.__name__}")


def valid_keys() -> list[str]:
    return list(Config().to_flat())


def from_flat(flat: Mapping[str, Any]) -> Config:
    """Build the typed config from a flat mapping; absent keys take their defaults."""
    sections: dict[str, dict[str, Scalar]] = {f.name: {} for f in fields(Config)}
    types: dict[str, tuple[str, str, type]] = {}
    for sec in fields(Config):
        sec_type = get_type_hints(Config)[sec.name]
        hints = get_type_hints(sec_type)
        for f in fields(sec_type):
            types[_flat_key(sec.name, f.name)] = (sec.name, f.name, hints[f.name])
    for key, value in flat.items():
        if key not in types:
            raise FedhavenError(f"unknown config key '{key}': valid keys are {', '.join(types)}")
        sec_name, name, typ = types[key]
        sections[sec_name][name] = _coerce(key, value, typ)
    hints = get_type_hints(Config)
    return Config(**{name: hints[name](**values) for name, values in sections.items()})


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a run-config TOML file (nested tables or dotted keys) into flat form."""
    p = Path(path)
    if not p.is_file():
        raise FedhavenError(f"config file '{p}' not found: pass an existing TOML file")
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise FedhavenError(f"config file '{p}' is not valid TOML ({e}): fix its syntax") from e
    # accept a pyproject-style file too
    data = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", data)
    return _flatten(data)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out
