"""Opacus wiring: DP-SGD for one round whose accountant remembers every earlier round.

Flower's own Opacus example builds a new PrivacyEngine each round, so its ε is per round.
Here the accountant's history is handed in (``accountant_state``) and handed back, so the
ε a site reports is cumulative over all rounds it trained in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from torch.utils.data import DataLoader

from fedhaven.config import PrivacyConfig
from fedhaven.errors import FedhavenError


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


def sample_rate(num_examples: int, batch_size: int) -> float:
    """Opacus's Poisson sample rate for a loader of this size: 1 / batches per epoch."""
    return 1.0 / math.ceil(num_examples / batch_size)


def noise_for_budget(cfg: PrivacyConfig, rate: float, total_steps: int) -> float:
    """σ so that ``total_steps`` steps at ``rate`` spend exactly the target (ε, δ)."""
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=cfg.epsilon,
                target_delta=cfg.delta,
                sample_rate=rate,
                steps=total_steps,
                accountant=cfg.accountant,
            )
        )
    except ValueError as e:
        raise FedhavenError(
            f"no noise level reaches ε={cfg.epsilon} at δ={cfg.delta} over {total_steps} steps "
            f"({e}): raise privacy.epsilon or train fewer steps"
        ) from e


def make_private(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    cfg: PrivacyConfig,
    *,
    total_steps: int,
    accountant_state: dict[str, Any] | None = None,
    noise_multiplier: float | None = None,
    poisson_sampling: bool = True,
) -> PrivateRound:
    """Wrap model, optimizer and loader with Opacus for one round of DP-SGD.

    ``total_steps`` is the planned number of steps over all rounds: σ is chosen so that they
    spend the target ε. ``noise_multiplier`` overrides that (tests: σ=0 must equal plain SGD).
    """
    engine = PrivacyEngine(accountant=cfg.accountant)
    if accountant_state:
        engine.accountant.load_state_dict(accountant_state)
    rate = sample_rate(len(loader.dataset), loader.batch_size or 1)
    sigma = (
        noise_for_budget(cfg, rate, total_steps) if noise_multiplier is None else noise_multiplier
    )
    # "hooks" measured fastest for LoRA on CPU (DESIGN.md); the base stays frozen (opacus#841).
    dp_model, dp_optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=cfg.max_grad_norm,
        poisson_sampling=poisson_sampling,
        grad_sample_mode="hooks",
    )
    return PrivateRound(dp_model, dp_optimizer, dp_loader, engine, sigma, rate)
