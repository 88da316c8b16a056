"""THE training loop and evaluation. The site ClientApp, the simulation and the
centralized baseline all call :func:`train_round` / :func:`evaluate`; nothing else trains.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix, f1_score
from torch.utils.data import DataLoader, TensorDataset

from fedhaven.config import Config
from fedhaven.privacy import make_private


@dataclass
class RoundResult:
    num_examples: int
    steps: int
    loss: float  # mean training loss over the round's steps
    epsilon: float | None = None  # cumulative over every round in the accountant history
    noise_multiplier: float | None = None
    accountant_state: dict[str, Any] | None = None
    step_seconds: list[float] = field(default_factory=list)  # wall time of each step


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
            (lora if "lora_" in name else other).append(p)
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
    lora = [n for n in before if "lora_" in n]
    if not moved or (lora and not set(lora) & set(moved)):
        raise RuntimeError(
            "trainable weights did not change after the first optimizer step "
            "(opacus#820: was the model moved to a device after get_peft_model?)"
        )


def train_round(
    model: torch.nn.Module,
    data: TensorDataset,
    cfg: Config,
    *,
    server_round: int = 1,
    accountant_state: dict[str, Any] | None = None,
    noise_multiplier: float | None = None,
    poisson_sampling: bool = True,
) -> RoundResult:
    """One round of local training (DP-SGD when ``cfg.privacy.enabled``), in place."""
    device = next(model.parameters()).device
    steps = steps_per_round(len(data), cfg)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    loader = DataLoader(
        data, batch_size=min(cfg.train.batch_size, len(data)), shuffle=True, generator=generator
    )
    optimizer = _optimizer(model, cfg, lr_factor(server_round, cfg))
    private = None
    if cfg.privacy.enabled:
        private = make_private(
            model,
            optimizer,
            loader,
            cfg.privacy,
            total_steps=steps * cfg.federation.rounds,
            accountant_state=accountant_state,
            noise_multiplier=noise_multiplier,
            poisson_sampling=poisson_sampling,
        )
        optimizer, loader = private.optimizer, private.loader
        forward: torch.nn.Module = private.model
    else:
        forward = model

    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses: list[float] = []
    step_seconds: list[float] = []
    while len(losses) < steps:
        for input_ids, attention_mask, labels in loader:
            if len(labels) == 0:  # Poisson sampling can draw an empty batch: nothing to release
                continue
            t = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            logits = forward(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)
            ).logits
            loss = F.cross_entropy(logits, labels.to(device))
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step_seconds.append(time.perf_counter() - t)
            if len(losses) == 1:
                _check_weights_moved(model, before)
            if len(losses) == steps:
                break
    optimizer.zero_grad(set_to_none=True)
    result = RoundResult(
        num_examples=len(data),
        steps=len(losses),
        loss=float(np.mean(losses)),
        step_seconds=step_seconds,
    )
    if private is not None:
        result.epsilon = private.epsilon(cfg.privacy.delta)
        result.noise_multiplier = private.noise_multiplier
        result.accountant_state = private.accountant_state()
    return result


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: TensorDataset, cfg: Config) -> dict[str, Any]:
    """Loss, accuracy, macro-F1 (first: the demo set is imbalanced), per-class F1, confusion."""
    num_labels = len(cfg.data.label_names)
    if len(data) == 0:
        return {"num_examples": 0}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    preds, golds, loss_sum = [], [], 0.0
    for input_ids, attention_mask, labels in DataLoader(data, batch_size=cfg.train.eval_batch_size):
        logits = model(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)
        ).logits
        loss_sum += F.cross_entropy(logits, labels.to(device), reduction="sum").item()
        preds.append(logits.argmax(-1).cpu())
        golds.append(labels)
    model.train(was_training)
    y_pred, y_true = torch.cat(preds).numpy(), torch.cat(golds).numpy()
    classes = list(range(num_labels))
    return {
        "num_examples": len(y_true),
        "loss": loss_sum / len(y_true),
        "accuracy": float((y_pred == y_true).mean()),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=classes, average="macro", zero_division=0)
        ),
        "per_class_f1": f1_score(
            y_true, y_pred, labels=classes, average=None, zero_division=0
        ).tolist(),
        "confusion": confusion_matrix(y_true, y_pred, labels=classes).tolist(),
    }
