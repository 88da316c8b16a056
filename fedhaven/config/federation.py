"""The federation's section of the run configuration: rounds, sites, the aggregation rule and
what guards it (update norm bounds, central DP's and SecAgg+'s constraints on the rule).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedhaven.config import keys
from fedhaven.config.sections import _require, recipe

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
    # fedavg: heavy-ball momentum β of the server step (Flower's FedAvgM, Hsu et al. 2019):
    # the global adapter moves by the sites' mean update plus β times its last move, β
    # scaled each round with the sites' learning-rate schedule. Sites whose updates disagree
    # average to a shorter step than pooled training takes; the momentum carries the
    # direction they share across rounds. "auto" (RECIPE): 0.5 without DP, 0 (plain FedAvg)
    # with it. Defaults to its DP value, as the recipe's train.* settings do.
    server_momentum: float = recipe(keys.FEDERATION_SERVER_MOMENTUM, True)
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
        _require(self.rounds >= 1, keys.FEDERATION_ROUNDS, self.rounds, "must be >= 1")
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
            keys.FEDERATION_ROUND_TIMEOUT,
            self.round_timeout,
            "must be > 0 seconds",
        )
        _require(
            self.rejoin_wait >= 0,
            keys.FEDERATION_REJOIN_WAIT,
            self.rejoin_wait,
            "must be >= 0 seconds (0: no wait)",
        )
        _require(
            not self.resume or bool(self.out_dir),
            keys.FEDERATION_RESUME,
            self.resume,
            "set federation.out-dir to the directory of the run to resume",
        )
        _require(self.patience >= 0, "federation.patience", self.patience, "must be >= 0")
        _require(self.min_delta >= 0, "federation.min-delta", self.min_delta, "must be >= 0")
        self._check_sites()
        self._check_rule()

    def _check_sites(self) -> None:
        """How many sites there are, how many a round takes, and their CPUs."""
        _require(self.sites >= 1, keys.FEDERATION_SITES, self.sites, "must be >= 1")
        _require(self.site_cpus >= 1, keys.FEDERATION_SITE_CPUS, self.site_cpus, "must be >= 1")
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
        _require(self.min_sites >= 1, keys.FEDERATION_MIN_SITES, self.min_sites, "must be >= 1")

    def _check_rule(self) -> None:
        """The aggregation rule, its parameters and the update norm bounds it is given."""
        _require(
            self.strategy in STRATEGIES,
            keys.FEDERATION_STRATEGY,
            self.strategy,
            f"use one of {', '.join(STRATEGIES)}",
        )
        # Norm bounds compare each reply with the one adapter sent to every site; flexlora
        # sends each site factors of its own rank.
        for key, value in (
            (keys.FEDERATION_UPDATE_NORM_BOUND, self.update_norm_bound),
            (keys.FEDERATION_MAX_UPDATE_NORM, self.max_update_norm),
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
            0.0 <= self.server_momentum < 1.0,
            keys.FEDERATION_SERVER_MOMENTUM,
            self.server_momentum,
            "must be >= 0 and < 1 (0 means: plain FedAvg)",
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
            keys.FEDERATION_UPDATE_NORM_BOUND,
            self.update_norm_bound,
            "must be >= 0 (0 turns it off)",
        )
        _require(
            self.max_update_norm >= 0,
            keys.FEDERATION_MAX_UPDATE_NORM,
            self.max_update_norm,
            "must be >= 0 (0 turns it off)",
        )

    def _check_secure_aggregation(self) -> None:
        """What SecAgg+ cannot serve: rules and checks that need each site's own tensors."""
        _require(
            self.strategy in SECURE_AGGREGATION_STRATEGIES,
            keys.FEDERATION_STRATEGY,
            self.strategy,
            "secure aggregation reveals only the sites' mean, this rule needs each site's "
            f"update: use {', '.join(SECURE_AGGREGATION_STRATEGIES)}, or "
            "federation.secure-aggregation = false",
        )
        for key, value in (
            (keys.FEDERATION_UPDATE_NORM_BOUND, self.update_norm_bound),
            (keys.FEDERATION_MAX_UPDATE_NORM, self.max_update_norm),
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
            keys.FEDERATION_MIN_SITES,
            self.min_sites,
            "SecAgg+ masks each update with the other sites': it needs at least 2 sites per "
            "round (federation.sites and federation.min-sites >= 2)",
        )
