"""Empirical privacy audit of a simulated run: a loss-threshold membership-inference attack
(Yeom et al., 2018) against the run's final global model.

Members are one site's training rows; non-members are rows of the same distribution the
federation never trained on (every site's validation split and the held-out test set).
The attacker scores a row by the model's negative loss on it; the ROC AUC of that score
says how well it tells the two apart (0.5: not at all). It needs the rows themselves, so it
rebuilds them from a simulated run's config; a deployed run's data stays at its sites.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, concatenate_datasets
from sklearn.metrics import roc_auc_score, roc_curve

from fedhaven import data as fdata
from fedhaven.config import from_flat
from fedhaven.errors import FedhavenError
from fedhaven.models import load_trained
from fedhaven.run_record import ADAPTER_DIR, MAX_EPSILON, SIMULATION, SUMMARY_FILE
from fedhaven.tasks import get_task
from fedhaven.training import default_device


def label_matched(
    members: np.ndarray, non_members: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Indices into two label arrays keeping, per label, as many rows of each as both have.

    A Dirichlet partition skews a site's labels and the loss depends on the label: without
    matching, the attack would partly detect the label mix rather than membership.
    """
    keep_m, keep_n = [], []
    for c in np.union1d(members, non_members):
        m, n = np.flatnonzero(members == c), np.flatnonzero(non_members == c)
        k = min(len(m), len(n))
        keep_m.append(rng.choice(m, k, replace=False))
        keep_n.append(rng.choice(n, k, replace=False))
    return np.sort(np.concatenate(keep_m)), np.sort(np.concatenate(keep_n))


@torch.no_grad()
def attack_auc(
    member_scores: np.ndarray, non_member_scores: np.ndarray, bootstrap: int, seed: int
) -> dict[str, float]:
    """ROC AUC of "higher score = member", its bootstrap 95% percentile interval, and the
    membership advantage max(TPR − FPR) over thresholds.

    Each group is resampled with replacement on its own, so every resample keeps both sizes.
    """
    y = np.r_[np.ones(len(member_scores)), np.zeros(len(non_member_scores))]
    scores = np.r_[member_scores, non_member_scores]
    fpr, tpr, _ = roc_curve(y, scores)
    rng = np.random.default_rng(seed)
    m, n = len(member_scores), len(non_member_scores)
    aucs = [
        roc_auc_score(
            y, np.r_[member_scores[rng.integers(0, m, m)], non_member_scores[rng.integers(0, n, n)]]
        )
        for _ in range(bootstrap)
    ]
    low, high = np.percentile(aucs, [2.5, 97.5])
    return {
        "auc": float(roc_auc_score(y, scores)),
        "ci_low": float(low),
        "ci_high": float(high),
        "advantage": float(np.max(tpr - fpr)),
    }


def read_run(run_dir: Path) -> dict[str, Any]:
    """The summary of a finished simulated run in ``run_dir``, or a FedhavenError saying why not."""
    fix = "pass a run directory written by `fedhaven simulate`"
    summary_file = run_dir / SUMMARY_FILE
    if not run_dir.is_dir():
        raise FedhavenError(f"run directory '{run_dir}' not found: {fix}")
    if not summary_file.is_file():
        raise FedhavenError(f"'{run_dir}' has no {SUMMARY_FILE}: {fix} that finished")
    if not (run_dir / ADAPTER_DIR).is_dir():
        raise FedhavenError(f"'{run_dir}' has no {ADAPTER_DIR}/ (the final model): {fix}")
    try:
        summary = json.loads(summary_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FedhavenError(f"'{summary_file}' is not valid JSON ({e}): {fix}") from e
    engine = summary.get("engine")
    if engine != SIMULATION:
        raise FedhavenError(
            f"'{run_dir}' is not a simulated run ({SUMMARY_FILE} engine: {engine!r}): the "
            "audit rebuilds the sites' data, which only a simulation has; "
            "audit a run made with `fedhaven simulate`"
        )
    return summary


def audit(
    run_dir: str | Path, site: int = 0, bootstrap: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Loss-threshold membership inference against a simulated run's final global model.

    Members: site ``site``'s training rows (its partition id, 0-based). Non-members: every
    site's validation rows and the held-out test set, label-matched to the members (a seeded
    subsample per label). Returns the attack's AUC with a bootstrap 95% interval.
    """
    d = Path(run_dir)
    summary = read_run(d)
    cfg = from_flat(summary["config"])
    num_sites = cfg.federation.sites
    if not 0 <= site < num_sites:
        raise FedhavenError(
            f"site {site} is out of range: the run had {num_sites} sites, "
            f"pass a site from 0 to {num_sites - 1}"
        )
    if bootstrap < 1:
        raise FedhavenError(f"bootstrap = {bootstrap}: resample at least once, e.g. 1000")

    task = get_task(cfg)
    if not task.classification:
        raise FedhavenError(
            f"model.task = {cfg.model.task!r}: the audit matches members to non-members by "
            "label, which only classification tasks have; audit a seq-cls or image-cls run"
        )
    full = task.load(cfg.data.path)
    sites = fdata.simulated_sites(full, cfg.data, num_sites, cfg.train.seed)
    members = sites[site][0]
    test = task.load(cfg.data.test_path, split="test")
    # the columns the task reads; the sources' other columns may differ
    columns = [c for c in members.column_names if c in test.column_names]
    non_members = concatenate_datasets(
        [ds.select_columns(columns) for ds in [*(val for _, val in sites), test]]
    )
    keep_m, keep_n = label_matched(
        np.asarray(members[fdata.LABEL]),
        np.asarray(non_members[fdata.LABEL]),
        np.random.default_rng(seed),
    )
    if len(keep_m) == 0:
        raise FedhavenError(
            f"site {site}'s training rows share no label with the held-out rows: audit another site"
        )

    model = load_trained(d / ADAPTER_DIR).to(default_device())

    def losses(ds: Dataset) -> np.ndarray:
        return task.example_losses(model, task.encode(ds))

    member_loss = losses(members.select(keep_m))
    non_member_loss = losses(non_members.select(keep_n))
    return {
        **attack_auc(-member_loss, -non_member_loss, bootstrap, seed),
        "members": len(member_loss),
        "non_members": len(non_member_loss),
        "member_loss": float(member_loss.mean()),
        "non_member_loss": float(non_member_loss.mean()),
        "site": site,
        "run_dir": str(d),
        "epsilon": summary.get(MAX_EPSILON),
        "delta": summary.get("delta"),
        "bootstrap": bootstrap,
        "seed": seed,
    }
