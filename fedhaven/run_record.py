"""The run record: what a run leaves in its run directory, in one place.

The directory's file names, the keys of ``metrics.jsonl`` (one line a round) and of
``summary.json`` (the run's end), and the functions that build a round's line, a site's row
and the summary. The coordinator (:mod:`fedhaven.server.app`) writes the record; the report,
the audit and ``fedhaven tune`` read it.

Only light imports here: the report and the audit log read these names, and need neither
Flower nor torch (:mod:`fedhaven.protocol` is imported where a site's reply is read).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fedhaven.config import Config
    from fedhaven.tasks import Task

# --- the run directory's files ----------------------------------------------------------------
#: The final adapter (PEFT format), with its model card.
ADAPTER_DIR, MODEL_CARD_FILE = "adapter", "model_card.md"
METRICS_FILE, SUMMARY_FILE = "metrics.jsonl", "summary.json"
REPORT_FILE, PLOTS_DIR = "report.md", "plots"
#: The plots in :data:`PLOTS_DIR`.
GLOBAL_PLOT, SITES_PLOT, EPSILON_PLOT = "global.png", "sites.png", "epsilon.png"
CONFUSION_PLOT = "confusion.png"  # classification only
PLOTS = (GLOBAL_PLOT, SITES_PLOT, EPSILON_PLOT, CONFUSION_PLOT)
#: The audit log, in the coordinator's run directory and in a site's state directory.
AUDIT_FILE = "audit-log.jsonl"
#: The checkpoint's folder (:mod:`fedhaven.server.checkpoint`).
CHECKPOINT_DIR = "checkpoint"

#: How the sites ran, recorded in ``summary.json`` as ``engine`` (only a simulated run's
#: data can be rebuilt, for ``fedhaven audit``).
SIMULATION, DEPLOYMENT = "simulation", "deployment"

# --- keys of a metrics.jsonl line ------------------------------------------------------------
ROUND, WALL_S, GLOBAL, SITES = "round", "wall_s", "global", "sites"
#: The sites' validation score of the primary metric (:func:`validation_score`).
VALIDATION = "validation"
#: The largest record-level ε of the sites, and the site-level ε of central DP.
MAX_EPSILON, CENTRAL_EPSILON = "max_epsilon", "central_epsilon"
#: In ``global``: the held-out set's F1 per class and confusion matrix (classification).
PER_CLASS_F1, CONFUSION = "per_class_f1", "confusion"

# --- keys of a site's row (in a line's and the summary's ``sites``) -------------------------
EXAMPLES, VAL_EXAMPLES, TRAIN_LOSS = "examples", "val_examples", "train_loss"
#: The site's cumulative record-level ε (``None`` without DP).
EPSILON = "epsilon"
ROWS, FINGERPRINT = "rows", "fingerprint"
#: The totals of a site's data checks (fedhaven.datacheck), as the record names them.
ROWS_IN = "rows_in"  # the rows in the site's file, before its checks
DATA_CHECKS = (ROWS_IN, "dropped", "duplicates", "small_classes")
#: In the summary: the latest round the site took part in.
LAST_ROUND = "last_round"

# --- keys of summary.json ---------------------------------------------------------------------
ROUNDS, BEST_ROUND, STOPPED_EARLY = "rounds", "best_round", "stopped_early"
TASK, PRIMARY_METRIC, METRICS, LABELS = "task", "primary_metric", "metrics", "labels"
DELTA, CENTRAL_DP, CONFIG, ENGINE = "delta", "central_dp", "config", "engine"
RESUMED_AFTER_ROUND, VERSIONS, RUN_DIR = "resumed_after_round", "versions", "run_dir"
#: The adapter's bytes a site receives (and sends) per round, and the whole model's.
BYTES_PER_SITE_ROUND, FULL_MODEL_BYTES = "bytes_per_site_round", "full_model_bytes"
#: In ``central_dp``: the mode, noise and clipping bound, and the models released so far.
DP_MODE, NOISE_MULTIPLIER, CLIPPING_NORM = "mode", "noise_multiplier", "clipping_norm"
RELEASES = "releases"
#: Written by the simulation when some sites scaled their updates (a hostile-site run).
SIMULATED_UPDATE_SCALE = "simulated_update_scale"
#: A classification run's labels the final model never predicts on the held-out set (an
#: empty list when it predicts every class).
NEVER_PREDICTED = "never_predicted"
#: The packages whose versions the summary records.
VERSIONED = ("flwr", "torch", "transformers", "peft", "opacus")


def run_directory(cfg: Config) -> Path:
    """The run's directory: ``federation.out-dir``, else a new ``runs/<date>-<time>``."""
    if cfg.federation.out_dir:
        return Path(cfg.federation.out_dir)
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def site_row(
    train: Mapping[str, Any], ev: Mapping[str, Any], metrics: Sequence[str]
) -> dict[str, Any]:
    """A site's own numbers of a round, from its train and evaluate replies' metrics;
    ``metrics``: the task's validation metrics."""
    from fedhaven import protocol  # Flower and torch: only the coordinator reads replies

    checks = (
        protocol.DATA_ROWS_IN,
        protocol.DATA_DROPPED,
        protocol.DATA_DUPLICATES,
        protocol.DATA_SMALL_CLASSES,
    )
    return {
        EXAMPLES: int(train.get(protocol.NUM_EXAMPLES, 0)),
        EPSILON: train.get(protocol.EPSILON),
        TRAIN_LOSS: train.get(protocol.TRAIN_LOSS),
        VAL_EXAMPLES: int(ev.get(protocol.NUM_EXAMPLES, 0)),
        **{m: ev.get(protocol.METRIC_KEYS[m]) for m in metrics if m != "loss"},
        ROWS: train.get(protocol.DATA_ROWS),
        FINGERPRINT: train.get(protocol.DATA_FINGERPRINT),
        **{k: train.get(key) for k, key in zip(DATA_CHECKS, checks, strict=True)},
    }


def validation_score(sites: Mapping[str, Mapping[str, Any]], metric: str) -> float | None:
    """The sites' validation ``metric`` (the task's primary one: macro-F1 for classification)
    of one round, weighted by their validation examples (``None`` if no site reported it):
    what early stopping and ``fedhaven tune`` watch — never the held-out test set."""
    rows = [s for s in sites.values() if s.get(metric) is not None and s[VAL_EXAMPLES] > 0]
    total = sum(s[VAL_EXAMPLES] for s in rows)
    return sum(s[metric] * s[VAL_EXAMPLES] for s in rows) / total if total else None


def _max_epsilon(sites: Mapping[str, Mapping[str, Any]]) -> float | None:
    return max((s[EPSILON] for s in sites.values() if s[EPSILON] is not None), default=None)


def metrics_line(
    server_round: int,
    wall_s: float,
    ev: Mapping[str, Any],
    sites: dict[str, dict[str, Any]],
    task: Task,
    central_epsilon: float | None,
    stats: Mapping[str, Any],
) -> dict[str, Any]:
    """A round's line of ``metrics.jsonl``: the global model's evaluation ``ev`` on the
    held-out set, the sites' rows (:func:`site_row`) and the round's aggregation ``stats``."""
    return {
        ROUND: server_round,
        WALL_S: round(wall_s, 2),
        GLOBAL: {k: ev[k] for k in (*task.metrics, PER_CLASS_F1) if k in ev},
        VALIDATION: validation_score(sites, task.primary_metric),
        MAX_EPSILON: _max_epsilon(sites),
        CENTRAL_EPSILON: central_epsilon,
        **stats,
        SITES: sites,
    }


def summary_sites(
    history: Sequence[Mapping[str, Any]], metrics: Sequence[str], resumed_after: int
) -> dict[str, dict[str, Any]]:
    """Each site's row in the summary: from the latest round it took part in."""
    sites = {}
    for line in history:
        for node, row in line[SITES].items():
            sites[node] = {
                EXAMPLES: row[EXAMPLES],
                EPSILON: row[EPSILON],
                **{m: row[m] for m in metrics if m != "loss"},
                ROWS: row[ROWS],
                FINGERPRINT: row[FINGERPRINT],
                **{k: row.get(k) for k in DATA_CHECKS},  # absent in runs written before them
                LAST_ROUND: line[ROUND],
            }
    if resumed_after:  # Flower numbers a site anew when a run restarts: same data, same site
        later = {s[FINGERPRINT]: n for n, s in sites.items() if s[LAST_ROUND] > resumed_after}
        for node in [n for n, s in sites.items() if s[LAST_ROUND] <= resumed_after]:
            fingerprint = sites[node][FINGERPRINT]
            if fingerprint is not None and later.get(fingerprint, node) != node:
                del sites[node]
    return sites


def central_dp_row(
    cfg: Config, clipping_norm: float, releases: int, epsilon: float | None
) -> dict[str, Any]:
    """The summary's ``central_dp``: site-level (ε, δ) of the released models."""
    return {
        DP_MODE: cfg.privacy.central,
        NOISE_MULTIPLIER: cfg.privacy.central_noise,
        CLIPPING_NORM: clipping_norm,
        RELEASES: releases,
        EPSILON: epsilon,
        DELTA: cfg.privacy.delta,
    }


def never_predicted(confusion: list[list[int]], labels: list[str]) -> list[str]:
    """The labels whose prediction column (rows: truth) is all zeros, in label order: classes
    the model never outputs, whether or not the held-out set has examples of them."""
    predicted = np.asarray(confusion).sum(axis=0)
    return [name for name, n in zip(labels, predicted, strict=True) if n == 0]


def summary(
    cfg: Config,
    task: Task,
    history: Sequence[Mapping[str, Any]],
    final_eval: Mapping[str, Any],
    *,
    best_round: int,
    stopped_early: bool,
    model_bytes: tuple[int, int],
    central_dp: dict[str, Any] | None,
    wall_s: float,
    resumed_after: int,
    run_dir: str,
    engine: str,
) -> dict[str, Any]:
    """``summary.json``: the run's final model on the held-out set (``final_eval``), each
    site's latest row, the privacy spent, and what ran. ``model_bytes``: the adapter's bytes
    sent to a site each round, and the full model's."""
    labels = cfg.data.label_names if task.classification else None
    sites = summary_sites(history, task.metrics, resumed_after)
    record = {
        ROUNDS: len(history),
        BEST_ROUND: best_round,
        STOPPED_EARLY: stopped_early,
        TASK: task.name,
        PRIMARY_METRIC: task.primary_metric,
        METRICS: list(task.metrics),
        LABELS: labels,
        GLOBAL: {
            k: final_eval[k] for k in (*task.metrics, PER_CLASS_F1, CONFUSION) if k in final_eval
        },
        SITES: sites,
        BYTES_PER_SITE_ROUND: model_bytes[0],
        FULL_MODEL_BYTES: model_bytes[1],
        MAX_EPSILON: _max_epsilon(sites),
        DELTA: cfg.privacy.delta if cfg.privacy.enabled else None,
        CENTRAL_DP: central_dp,
        WALL_S: round(wall_s, 2),
        RESUMED_AFTER_ROUND: resumed_after or None,
        CONFIG: cfg.to_flat(),
        VERSIONS: {p: version(p) for p in VERSIONED},
        RUN_DIR: run_dir,
        ENGINE: engine,
    }
    if CONFUSION in record[GLOBAL]:  # classification only: a causal LM has no classes
        record[NEVER_PREDICTED] = never_predicted(record[GLOBAL][CONFUSION], labels)
    return record
