"""THE training loop and evaluation. The site ClientApp, the simulation and the
centralized baseline all call :func:`train_round` / :func:`evaluate`; nothing else trains.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.hooks import RemovableHandle

from fedhaven.config import Config
from fedhaven.models import is_lora
from fedhaven.privacy import (
    PrivateRound,
    Release,
    RoundPlan,
    make_private,
    noise_for_budget,
    prior_noise,
    private_generator,
    sample_rate,
)
from fedhaven.privacy import label_prior as private_label_prior
from fedhaven.tasks import get_task
from fedhaven.tasks.base import no_head_to_probe


@dataclass
class RoundResult:
    num_examples: int
    steps: int
    loss: float  # mean training loss over the round's steps
    epsilon: float | None = None  # cumulative over every round in the accountant history
    noise_multiplier: float | None = None
    accountant_state: dict[str, Any] | None = None
    step_seconds: list[float] = field(default_factory=list)  # wall time of each step
    label_prior: list[float] | None = None  # for logit adjustment; keep it for later rounds
    #: this round's Gaussian releases, as accountant history entries (noise, rate, steps)
    releases: list[tuple[float, float, int]] = field(default_factory=list)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def steps_per_round(num_examples: int, cfg: Config) -> int:
    """Optimizer steps one site takes per round."""
    if cfg.train.local_steps:
        return cfg.train.local_steps
    return cfg.train.local_epochs * math.ceil(num_examples / cfg.train.batch_size)


def lr_factor(server_round: int, cfg: Config) -> float:
    """The share of the configured learning rates used in ``server_round`` (1-based)."""
    if cfg.train.schedule == "constant":
        return 1.0
    rounds = cfg.federation.rounds
    return (rounds - min(max(server_round, 1), rounds) + 1) / rounds


def _optimizer(model: torch.nn.Module, cfg: Config, factor: float) -> torch.optim.Optimizer:
    lora, other = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (lora if is_lora(name) else other).append(p)
    lr = cfg.train.learning_rate * factor
    lora_lr = (cfg.train.lora_learning_rate or cfg.train.learning_rate) * factor
    groups = [{"params": other}, {"params": lora, "lr": lora_lr}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=lr, weight_decay=cfg.train.weight_decay
    )


def _check_weights_moved(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Guard against opacus#820: after step 1 the trainable weights must have changed."""
    now = dict(model.named_parameters())
    moved = [n for n, t in before.items() if not torch.equal(t, now[n].detach())]
    lora = [n for n in before if is_lora(n)]
    if not moved or (lora and not set(lora) & set(moved)):
        raise RuntimeError(
            "trainable weights did not change after the first optimizer step "
            "(opacus#820: was the model moved to a device after get_peft_model?)"
        )


def logit_adjustment(cfg: Config) -> float:
    """τ of the logit-adjusted loss: ``train.logit-adjustment`` for classification tasks
    (which have a label prior), 0 for the others."""
    return cfg.train.logit_adjustment if get_task(cfg).classification else 0.0


def round_plan(cfg: Config, num_examples: int, *, release_prior: bool) -> RoundPlan:
    """One DP round at a site of this size, before it runs: σ, solved once, and the
    Gaussian releases the round will make.

    A site checks its budget with it and hands its σ to :func:`train_round`.
    """
    steps = steps_per_round(num_examples, cfg)
    rate = sample_rate(num_examples, min(cfg.train.batch_size, num_examples))
    prior = [(prior_noise(cfg.privacy), 1.0, 1)] if logit_adjustment(cfg) else []
    sigma = noise_for_budget(cfg.privacy, rate, steps * cfg.federation.rounds, tuple(prior))
    return RoundPlan(sigma, [*(prior if release_prior else []), (sigma, rate, steps)])


def _add_proximal_gradient(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, mu: float
) -> RemovableHandle:
    """FedProx: from now on each step of ``optimizer`` adds μ·(w − w_global) to the gradient
    of every trainable weight (w_global: its value now, the global model's).

    It is the gradient of μ/2·‖w − w_global‖², added as a gradient, not as a loss term:
    under DP, Opacus builds ``p.grad`` from the per-sample gradients and would drop a term
    that depends on the weights alone. The hook runs on the inner optimizer's step, so
    under DP it comes after clipping and noise: the term is data-independent and needs
    neither. Returns the hook's handle.
    """
    anchors = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]

    def hook(*_: Any) -> None:
        with torch.no_grad():
            for p, w0 in anchors:
                if p.grad is not None:  # no gradient: the optimizer leaves p as it is
                    p.grad.add_(p - w0, alpha=mu)

    return optimizer.register_step_pre_hook(hook)


def _noise_only_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad(set_to_none=True)
    for p in model.parameters():
        if p.requires_grad:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _label_prior(
    data: TensorDataset, cfg: Config, label_prior: list[float] | None, generator: torch.Generator
) -> tuple[list[float] | None, tuple[Release, ...], tuple[Release, ...]]:
    """(the run's label prior, its release planned in every round, its release made now).

    Under logit adjustment only: the histogram is released once per run (``label_prior``:
    the one released earlier), and its noise is part of the run's budget in every round.
    """
    if not logit_adjustment(cfg):
        return label_prior, (), ()
    sigma = prior_noise(cfg.privacy) if cfg.privacy.enabled else None
    planned: tuple[Release, ...] = ((sigma, 1.0, 1),) if sigma is not None else ()
    if label_prior is not None:
        return label_prior, planned, ()
    prior, release = private_label_prior(
        data.tensors[-1], len(cfg.data.label_names), sigma, generator
    )
    return prior.tolist(), planned, (release,) if release else ()


def _run_steps(
    model: torch.nn.Module,
    forward: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    cfg: Config,
    steps: int,
    adjust: torch.Tensor | None,
) -> tuple[list[float], list[float]]:
    """Take ``steps`` optimizer steps over ``loader``; returns each step's loss and time."""
    device = next(model.parameters()).device
    task = get_task(cfg)
    names = task.input_names(loader.dataset)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses: list[float] = []
    step_seconds: list[float] = []
    while len(losses) < steps:
        for *inputs, target in loader:
            t = time.perf_counter()
            if len(target) == 0:  # Poisson sampling drew nobody (DP only: plain batches never
                # are empty). DP-SGD still takes the step: noise only, and accounted for —
                # skipping it would reveal that the batch was empty.
                _noise_only_step(model, optimizer)
                losses.append(float("nan"))
                step_seconds.append(time.perf_counter() - t)
            else:
                optimizer.zero_grad(set_to_none=True)
                batch = {k: v.to(device) for k, v in zip(names, inputs, strict=True)}
                # adjust: train only, predictions use the raw logits
                loss = task.loss(forward(**batch).logits, target.to(device), adjust)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                step_seconds.append(time.perf_counter() - t)
                if before:  # once, after the first real step
                    _check_weights_moved(model, before)
                    before = {}
            if len(losses) == steps:
                break
    optimizer.zero_grad(set_to_none=True)
    return losses, step_seconds


@contextmanager
def _probe_round(model: torch.nn.Module, cfg: Config, server_round: int) -> Iterator[None]:
    """In a probe round (``train.probe-rounds``) the LoRA weights are frozen, so that the
    optimizer, Opacus's clipping and its noise see the head alone; trainable again after,
    so that the reply (``adapter_state``) carries every adapter tensor."""
    frozen: list[torch.nn.Parameter] = []
    if server_round <= cfg.train.probe_rounds:
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        frozen = [p for n, p in trainable if is_lora(n)]
        if len(frozen) == len(trainable):
            raise no_head_to_probe(cfg)  # e.g. modules-to-save names no module of the model
    try:
        for p in frozen:
            p.requires_grad_(False)
        with warnings.catch_warnings():
            # Nothing below the head needs a gradient now; the head's backward hook (Opacus's
            # per-sample gradients) needs only the gradient of its output, which torch warns of.
            warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
            yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def train_round(
    model: torch.nn.Module,
    data: TensorDataset,
    cfg: Config,
    *,
    server_round: int = 1,
    accountant_state: dict[str, Any] | None = None,
    label_prior: list[float] | None = None,
    noise_multiplier: float | None = None,
    poisson_sampling: bool = True,
    proximal_mu: float = 0.0,
) -> RoundResult:
    """One round of local training (DP-SGD when ``cfg.privacy.enabled``), in place.

    ``accountant_state`` and ``label_prior`` come from the site's previous round (the
    result carries them): the label histogram is released once per run, not once per round.
    ``noise_multiplier``: σ planned already (:func:`round_plan`; tests: 0), else solved here.
    ``proximal_mu`` > 0 adds FedProx's proximal term μ/2·‖w − w_start‖² over the trainable
    weights (w_start: the weights this round starts from, the global model's). In the first
    ``train.probe-rounds`` rounds LoRA stays frozen and the head trains alone.
    """
    steps = steps_per_round(len(data), cfg)
    if cfg.privacy.enabled:  # sampling and histogram noise must not be replayable
        generator = private_generator()
    else:
        generator = torch.Generator().manual_seed(cfg.train.seed + server_round)
    label_prior, planned, released = _label_prior(data, cfg, label_prior, generator)
    adjust, tau = None, logit_adjustment(cfg)
    if tau and label_prior is not None:
        device = next(model.parameters()).device
        adjust = tau * torch.tensor(label_prior, device=device).log()
    loader = DataLoader(
        data, batch_size=min(cfg.train.batch_size, len(data)), shuffle=True, generator=generator
    )
    with _probe_round(model, cfg, server_round):
        optimizer = _optimizer(model, cfg, lr_factor(server_round, cfg))
        if proximal_mu:  # on the inner optimizer, before Opacus wraps it
            _add_proximal_gradient(model, optimizer, proximal_mu)
        private: PrivateRound | None = None
        forward = model
        if cfg.privacy.enabled:
            private = make_private(
                model,
                optimizer,
                loader,
                cfg.privacy,
                total_steps=steps * cfg.federation.rounds,
                other_releases=planned,
                new_releases=released,
                accountant_state=accountant_state,
                noise_multiplier=noise_multiplier,
                poisson_sampling=poisson_sampling,
            )
            optimizer, loader, forward = private.optimizer, private.loader, private.model
        losses, step_seconds = _run_steps(model, forward, optimizer, loader, cfg, steps, adjust)
    result = RoundResult(
        num_examples=len(data),
        steps=len(losses),
        loss=float(np.nanmean(losses)) if not np.isnan(losses).all() else float("nan"),
        step_seconds=step_seconds,
        label_prior=label_prior,
    )
    if private is not None:
        result.epsilon = private.epsilon(cfg.privacy.delta)
        result.noise_multiplier = private.noise_multiplier
        result.accountant_state = private.accountant_state()
        result.releases = [*released, (private.noise_multiplier, private.sample_rate, len(losses))]
    return result


def evaluate(model: torch.nn.Module, data: TensorDataset, cfg: Config) -> dict[str, Any]:
    """The task's evaluation metrics (classification: loss, accuracy, macro-F1 first — the
    demo set is imbalanced —, per-class F1, confusion)."""
    return get_task(cfg).evaluate(model, data)
