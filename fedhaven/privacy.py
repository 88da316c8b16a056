"""Opacus wiring: DP-SGD for one round whose accountant remembers every earlier round.

Flower's own Opacus example builds a new PrivacyEngine each round, so its ε is per round.
Here the accountant's history is handed in (``accountant_state``) and handed back, so the
ε a site reports is cumulative over all rounds it trained in.

What a site keeps on its own disk (its state directory) lives here too: the privacy ledger
(:class:`Ledger`) and the noisy label prior it released in its current run (:class:`PriorStore`);
:class:`SitePrivacy` holds them, the run's memory and the site's budget check for one round.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import MutableMapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.accountants import create_accountant
from opacus.optimizers import DPOptimizer
from torch.utils.data import DataLoader

from fedhaven.config import EPSILON_BUDGET, RESUME_MAY_CHANGE, STATE_DIR, Config, PrivacyConfig
from fedhaven.errors import FedhavenError
from fedhaven.fileio import write_atomic
from fedhaven.site_config import SiteConfig

if TYPE_CHECKING:  # training imports this module
    from fedhaven.training import RoundResult


@dataclass
class PrivateRound:
    """Drop-in private replacements for one round, plus the engine that accounts for them."""

    model: GradSampleModule
    optimizer: DPOptimizer
    loader: DataLoader
    engine: PrivacyEngine
    noise_multiplier: float
    sample_rate: float

    def epsilon(self, delta: float) -> float:
        """ε spent so far, over this round and every round in the accountant's history."""
        return float(self.engine.accountant.get_epsilon(delta=delta))

    def accountant_state(self) -> dict[str, Any]:
        return self.engine.accountant.state_dict()


def private_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """Randomness nobody can replay: seeded by the OS, never from the (public) run config.

    DP noise or Poisson sampling drawn from a seeded generator could be recomputed by anyone
    who knows the seed, and subtracted.
    """
    generator = torch.Generator(device=device)
    generator.seed()
    return generator


def sample_rate(num_examples: int, batch_size: int) -> float:
    """Opacus's Poisson sample rate for a loader of this size: 1 / batches per epoch."""
    return 1.0 / math.ceil(num_examples / batch_size)


#: One accountant history entry: (noise multiplier, sample rate, steps).
Release = tuple[float, float, int]

_MAX_SIGMA = 1e6


@dataclass(frozen=True)
class RoundPlan:
    """One DP round's noise, solved once before it runs: the budget check and the round
    both use it."""

    noise_multiplier: float  # σ of the round's DP-SGD steps
    releases: list[Release]  # the Gaussian releases the round will make, in order


def noise_for_budget(
    cfg: PrivacyConfig, rate: float, total_steps: int, other: tuple[Release, ...] = ()
) -> float:
    """σ so that ``other`` releases plus ``total_steps`` steps at ``rate`` spend the target ε.

    Opacus's ``get_noise_multiplier`` search, over a history that may begin with other
    Gaussian releases (the label histogram) composed in the same accountant.
    """
    spent = epsilon_of(list(other), cfg.delta, cfg.accountant)  # 0 without other releases
    if spent >= cfg.epsilon:  # no σ of the steps can help
        raise FedhavenError(
            f"the label histogram (privacy.prior-noise = {other[0][0]:g}) alone spends "
            f"ε={spent:.2f} of privacy.epsilon = {cfg.epsilon:g}: raise privacy.prior-noise, "
            "or set it to 0 (a quarter of ε)"
        )
    accountant = create_accountant(mechanism=cfg.accountant)

    def eps(sigma: float) -> float:
        accountant.history = [*other, (sigma, rate, total_steps)]
        return accountant.get_epsilon(delta=cfg.delta)

    low, high, eps_high = 0.0, 10.0, float("inf")
    while eps_high > cfg.epsilon:
        high *= 2
        eps_high = eps(high)
        if high > _MAX_SIGMA:
            raise FedhavenError(
                f"no noise level reaches ε={cfg.epsilon} at δ={cfg.delta} over {total_steps} "
                "steps: raise privacy.epsilon or train fewer steps"
            )
    while cfg.epsilon - eps_high > 0.01:
        mid = (low + high) / 2
        e = eps(mid)
        if e < cfg.epsilon:
            high, eps_high = mid, e
        else:
            low = mid
    return high


#: The share of privacy.epsilon the label histogram spends alone when privacy.prior-noise is
#: 0 (the default): the training steps then carry about 5% more noise at any ε (at ε=8 on
#: the demo σ 1.427 -> 1.494, σ_h 2.16; at ε=1 9.06 -> 9.45, σ_h 15). A fixed σ_h does
#: not scale: 2 alone spends ε=2.17, so ε <= 2 could not be reached at all.
PRIOR_SHARE = 0.25


@functools.cache
def prior_noise(cfg: PrivacyConfig) -> float:
    """σ of the noise on the label histogram's counts: privacy.prior-noise, or where that is
    0 the σ at which the histogram (one release of sensitivity 1) alone spends
    :data:`PRIOR_SHARE` of ε at δ, by the same Opacus search as the training steps' σ."""
    if cfg.prior_noise > 0:
        return cfg.prior_noise
    try:
        return noise_for_budget(replace(cfg, epsilon=PRIOR_SHARE * cfg.epsilon), 1.0, 1)
    except FedhavenError:  # the accountant's orders cannot certify so small an ε
        raise FedhavenError(
            f"no noise on the label histogram reaches a quarter of privacy.epsilon = "
            f"{cfg.epsilon:g} at δ={cfg.delta:g}: raise privacy.epsilon, or set "
            "train.logit-adjustment to 0 (no histogram)"
        ) from None


def label_prior(
    labels: torch.Tensor, num_labels: int, sigma: float | None, generator: torch.Generator
) -> tuple[torch.Tensor, Release | None]:
    """The site's label distribution, for logit adjustment.

    With ``sigma`` (DP on) each count gets N(0, σ²) noise: the Gaussian mechanism on a
    histogram, whose L2 sensitivity to adding or removing one row is 1. The returned release
    ``(σ, 1.0, 1)`` goes into the site's accountant history like any training step.
    """
    counts = torch.bincount(labels, minlength=num_labels).double()
    release = None
    if sigma is not None:
        counts = counts + sigma * torch.randn(num_labels, generator=generator, dtype=torch.float64)
        release = (sigma, 1.0, 1)
    counts = counts.clamp(min=1.0)  # every class stays possible
    return (counts / counts.sum()).float(), release


def make_private(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    cfg: PrivacyConfig,
    *,
    total_steps: int,
    other_releases: tuple[Release, ...] = (),
    new_releases: tuple[Release, ...] = (),
    accountant_state: dict[str, Any] | None = None,
    noise_multiplier: float | None = None,
    poisson_sampling: bool = True,
) -> PrivateRound:
    """Wrap model, optimizer and loader with Opacus for one round of DP-SGD.

    ``total_steps`` is the planned number of steps over all rounds: σ is chosen so that they,
    after ``other_releases`` (planned once per run, e.g. the label histogram), spend the
    target ε. ``new_releases`` made this round are added to the accountant's history.
    ``noise_multiplier`` overrides σ (tests: σ=0 must equal plain SGD).
    """
    engine = PrivacyEngine(accountant=cfg.accountant)
    if accountant_state:
        engine.accountant.load_state_dict(accountant_state)
    engine.accountant.history.extend(new_releases)
    rate = sample_rate(len(loader.dataset), loader.batch_size or 1)
    if noise_multiplier is None:
        sigma = noise_for_budget(cfg, rate, total_steps, other_releases)
    else:
        sigma = noise_multiplier
    # "hooks" measured fastest for LoRA on CPU (DESIGN.md); the base stays frozen (opacus#841).
    dp_model, dp_optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=cfg.max_grad_norm,
        poisson_sampling=poisson_sampling,
        grad_sample_mode="hooks",
        noise_generator=private_generator(next(model.parameters()).device),
    )
    return PrivateRound(dp_model, dp_optimizer, dp_loader, engine, sigma, rate)


#: The site ledger's file inside the site's state directory.
LEDGER_FILE = "privacy-ledger.jsonl"


class Ledger:
    """The site's own record of every private training round, on the site's disk.

    One JSON line per round: run id, round, steps, sample rate, noise multiplier, δ, the
    Gaussian releases the round made (accountant history entries) and ε after the round over
    the site's whole history — every round of every run, across restarts. Appended and
    fsync'ed before the update leaves the site. Never rewritten (only the torn
    fragment of a write a crash interrupted is dropped: that update never left).
    """

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / LEDGER_FILE

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        lines = self.path.read_text().splitlines()
        out = []
        for i, line in enumerate(lines):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                if i == len(lines) - 1:  # a crash mid-write: that round's update never left
                    break
                raise FedhavenError(
                    f"privacy ledger '{self.path}' line {i + 1} is corrupt: restore it from "
                    "a backup; the site's spent budget cannot be known without it"
                ) from e
        return out

    def history(self) -> list[Release]:
        """Every release the site ever made, as an Opacus accountant history."""
        return [tuple(r) for e in self.entries() for r in e["releases"]]  # type: ignore[misc]

    def record(
        self,
        *,
        run_id: int,
        server_round: int,
        steps: int,
        noise_multiplier: float,
        delta: float,
        releases: list[Release],
        epsilon: float,
    ) -> None:
        """Append one private round (the entry's schema lives here only)."""
        self.append(
            {
                "time": datetime.now(UTC).isoformat(timespec="seconds"),
                "run_id": run_id,
                "round": server_round,
                "steps": steps,
                "sample_rate": releases[-1][1],
                "noise_multiplier": noise_multiplier,
                "delta": delta,
                "releases": releases,
                "epsilon": epsilon,
            }
        )

    def append(self, entry: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a+b") as f:
            f.seek(0)
            data = f.read()
            if data and not data.endswith(b"\n"):
                # A crash tore the last entry before its fsync returned, so its update never
                # left the site: drop the fragment (entries() already ignores it).
                f.truncate(data.rfind(b"\n") + 1)
            f.write((json.dumps(entry) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())


def epsilon_of(history: list[Release], delta: float, accountant: str = "rdp") -> float:
    """ε of a release history, as a fresh Opacus accountant computes it."""
    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta)) if history else 0.0


#: The site's stored label prior (its latest run's) inside the site's state directory.
PRIOR_FILE = "label-prior.json"


def run_identity(cfg: Config) -> str:
    """What names one fedhaven run across a coordinator crash and ``federation.resume``.

    Not Flower's run id: a resumed run is a new Flower run (a new id), and the ledger's
    entries show it. The coordinator resumes only with the checkpoint's run config, every key
    equal but those a resume may change (:data:`fedhaven.config.RESUME_MAY_CHANGE`), so the
    hash of the run config without those keys is the same in a resumed run as in the run it
    resumes. A new run with the same config has it too:
    :meth:`PriorStore.load` tells that one apart by the Flower run id and ``federation.resume``.
    """
    named = {k: v for k, v in cfg.to_flat().items() if k not in RESUME_MAY_CHANGE}
    text = json.dumps(named, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


class PriorStore:
    """The label prior a site released in its current run, kept on the site's disk.

    Under DP with logit adjustment a site releases a noisy label histogram once per run
    (:func:`label_prior`) and keeps it in Flower's ``context.state``, run memory. That memory
    is gone after a coordinator crash (the resumed run is a new Flower run) or a site restart:
    without this file the site would release the histogram again, a release the run's noise
    plan does not count. One JSON object (run identity, Flower run id, prior), replaced
    atomically; the site writes it after its ledger records the release and before the
    update leaves, so a crash in between costs a second, recorded release, never an unrecorded
    reuse. Only the latest run's prior is kept.
    """

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / PRIOR_FILE

    def load(self, cfg: Config, run_id: int) -> list[float] | None:
        """The stored prior if it is this run's, else ``None`` (release a new one).

        This run's: the same :func:`run_identity`, and either the same Flower run (the site
        restarted mid-run) or ``federation.resume`` (a new Flower run going on with the same
        run; if a run of the same config stored it in between, it is the same release of the
        same data at the same noise, already counted in the ledger). A new run with the same
        config, not resuming, releases its own.
        """
        if not self.path.is_file():
            return None
        try:
            stored = json.loads(self.path.read_text())
            identity, stored_run, prior = stored["run_identity"], stored["run_id"], stored["prior"]
            if not (
                isinstance(identity, str)
                and isinstance(stored_run, int)
                and isinstance(prior, list)
                and prior
                and all(type(p) in (int, float) and math.isfinite(p) and p > 0 for p in prior)
            ):
                raise ValueError("unexpected content")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise FedhavenError(
                f"stored label prior '{self.path}' is corrupt ({e}): delete it; the site then "
                "releases a new noisy label histogram, which its ledger counts"
            ) from e
        if identity != run_identity(cfg) or (stored_run != run_id and not cfg.federation.resume):
            return None
        return [float(p) for p in prior]

    def save(self, cfg: Config, run_id: int, prior: list[float]) -> None:
        """Keep ``prior`` as this run's: on disk (fsync'ed) when this returns."""
        entry = {"run_identity": run_identity(cfg), "run_id": run_id, "prior": prior}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, lambda f: f.write((json.dumps(entry) + "\n").encode()))


# Keys of the run's privacy memory (the site's node context.state record).
ACCOUNTANT = "accountant"
LABEL_PRIOR = "label-prior"


class SitePrivacy:
    """A site's privacy state for one training round.

    The accountant's history comes from the site's ledger when it has a ``state-dir``
    (cumulative over runs and restarts), else from the run's ``memory`` (the record the
    ClientApp keeps in the node's ``context.state``: cumulative over the rounds of a run).
    The run's label prior comes from that memory, else from the site's disk (a resumed run,
    or a restarted site, has lost the memory but must not release it again).
    """

    def __init__(
        self, site: SiteConfig, cfg: Config, run_id: int, memory: MutableMapping[str, Any]
    ) -> None:
        self.site, self.cfg, self.run_id, self.memory = site, cfg, run_id, memory
        state_dir = site.state_dir
        self.ledger = Ledger(state_dir) if state_dir is not None else None
        self.priors = PriorStore(state_dir) if state_dir is not None else None
        self.history = self.ledger.history() if self.ledger is not None else None  # read once
        self.prior: list[float] | None = (
            json.loads(str(memory[LABEL_PRIOR])) if LABEL_PRIOR in memory else None
        )
        if self.prior is None and self.priors is not None:
            self.prior = self.priors.load(cfg, run_id)

    def check_accountable(self) -> None:
        """Refuse a budget this site cannot keep: no ledger to keep it in, or no DP at all.

        The budget (ε, δ) is the site's node config; the coordinator's run config cannot
        raise it, and a run config that turns DP off is refused outright.
        """
        if self.history is None:
            raise FedhavenError(
                f"node config sets {EPSILON_BUDGET} but no {STATE_DIR}: the budget "
                "needs a ledger on the site's disk"
            )
        if not self.cfg.privacy.enabled:
            raise FedhavenError(
                f"refused: the run turns DP off, but this site allows ε={self.allowed:g}"
            )

    @property
    def allowed(self) -> float:
        return float(self.site.epsilon_budget or 0.0)

    def check_budget(self, plan: RoundPlan) -> None:
        """Refuse, before training, a round whose ``plan`` would take the site past its
        budget (call :meth:`check_accountable` first)."""
        privacy, history = self.cfg.privacy, self.history or []
        delta = privacy.delta if self.site.delta is None else self.site.delta
        spent = epsilon_of(history, delta, privacy.accountant)
        after = epsilon_of([*history, *plan.releases], delta, privacy.accountant)
        if after > self.allowed:
            raise FedhavenError(
                f"privacy budget exhausted: spent ε={spent:.2f}, this round would reach "
                f"ε={after:.2f}, allowed ε={self.allowed:g} at δ={delta:g}"
            )

    def accountant_state(self) -> dict[str, Any] | None:
        """The accountant's history before this round (``None``: none yet)."""
        if self.history is not None:  # the site's whole history, across runs and restarts
            return {"history": self.history, "mechanism": self.cfg.privacy.accountant}
        if ACCOUNTANT in self.memory:  # this run's history, kept in the node's context
            return json.loads(str(self.memory[ACCOUNTANT]))
        return None

    def record(self, result: RoundResult, server_round: int) -> None:
        """Keep what the round spent and released: on the site's disk before the update can
        leave it, and in the run's memory (never sent) for the site's next round."""
        if self.ledger is not None and result.releases:
            self.ledger.record(
                run_id=self.run_id,
                server_round=server_round,
                steps=result.steps,
                noise_multiplier=float(result.noise_multiplier or 0.0),
                delta=self.cfg.privacy.delta,
                releases=result.releases,
                epsilon=float(result.epsilon or 0.0),
            )
        if self.priors is not None and self.prior is None and result.label_prior is not None:
            # after the ledger counted its release, before the update (which used it) leaves
            self.priors.save(self.cfg, self.run_id, result.label_prior)
        if result.label_prior is not None:
            self.memory[LABEL_PRIOR] = json.dumps(result.label_prior)
        if result.accountant_state is not None:
            self.memory[ACCOUNTANT] = json.dumps(result.accountant_state)

    def state_dict(self) -> dict[str, str]:
        """The run's privacy memory (accountant history, label prior), as JSON text."""
        return {k: str(self.memory[k]) for k in (ACCOUNTANT, LABEL_PRIOR) if k in self.memory}

    def load_state_dict(self, state: dict[str, str]) -> None:
        self.memory.update(state)
        if LABEL_PRIOR in state:
            self.prior = json.loads(state[LABEL_PRIOR])
