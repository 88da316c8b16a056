"""The coordinator's Flower ServerApp: the configured aggregation rule over the adapter,
server-side evaluation on the held-out set each round, federated evaluation on the sites'
validation splits, and at the end the run directory: ``adapter/`` (PEFT format),
``metrics.jsonl``, ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MessageType, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedhaven import data as fdata
from fedhaven import protocol
from fedhaven.config import Config, from_flat
from fedhaven.models import (
    adapter_state,
    build_model,
    full_model_bytes,
    load_tokenizer,
    save_trained,
    set_adapter_state,
)
from fedhaven.report import ADAPTER_DIR, METRICS_FILE, SUMMARY_FILE, write_report
from fedhaven.strategies import STRATEGIES, Validated, central_dp
from fedhaven.training import default_device, evaluate

log = logging.getLogger(__name__)

#: Called after each round with that round's line of metrics.jsonl (the CLI prints progress).
ProgressFn = Callable[[dict[str, Any]], None]
#: How the sites ran, recorded in ``summary.json`` as ``engine``.
SIMULATION, DEPLOYMENT = "simulation", "deployment"


def run_dir(cfg: Config) -> Path:
    if cfg.federation.out_dir:
        return Path(cfg.federation.out_dir)
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def build_strategy(cfg: Config) -> Validated:
    """The rule ``federation.strategy`` names, with its knobs from ``cfg.federation``."""
    fed = cfg.federation
    central = cfg.privacy.central != "off"
    knobs: dict[str, dict[str, Any]] = {
        "fedprox": {"proximal_mu": fed.proximal_mu},
        "fedadam": {"eta": fed.server_learning_rate},
        "fedyogi": {"eta": fed.server_learning_rate},
        "trimmedavg": {"beta": fed.trim_beta},
        "krum": {"num_malicious_nodes": fed.krum_byzantine},
    }
    per_round = central_dp.num_sampled(cfg)
    if fed.strategy == "krum" and per_round <= 2 * fed.krum_byzantine + 2:
        log.warning(
            "krum is sound for %d hostile sites (federation.krum-byzantine) only with more "
            "than %d sites per round: it gets %d",
            fed.krum_byzantine,
            2 * fed.krum_byzantine + 2,
            per_round,
        )
    if fed.strategy == "trimmedavg" and int(fed.trim_beta * per_round) == 0:
        log.warning(
            "trimmedavg cuts nothing with %d sites per round and federation.trim-beta = %g: "
            "it is the plain mean",
            per_round,
            fed.trim_beta,
        )
    return STRATEGIES[fed.strategy](
        weighted_by_key=protocol.SITE_WEIGHT if central else protocol.NUM_EXAMPLES,
        fraction_train=fed.fraction_train,
        fraction_evaluate=fed.fraction_evaluate,
        min_train_nodes=min(fed.min_sites, fed.sites),
        min_evaluate_nodes=min(fed.min_sites, fed.sites) if fed.fraction_evaluate else 0,
        min_available_nodes=min(fed.min_sites, fed.sites),
        update_norm_bound=fed.update_norm_bound,
        **knobs.get(fed.strategy, {}),
    )


def _site_rows(strategy: Validated, server_round: int) -> dict[str, dict[str, Any]]:
    rows = {}
    for node, kinds in sorted(strategy.site_metrics.get(server_round, {}).items()):
        train, ev = kinds.get(MessageType.TRAIN, {}), kinds.get(MessageType.EVALUATE, {})
        rows[str(node)] = {
            "examples": int(train.get(protocol.NUM_EXAMPLES, 0)),
            "epsilon": train.get(protocol.EPSILON),
            "train_loss": train.get(protocol.TRAIN_LOSS),
            "val_examples": int(ev.get(protocol.NUM_EXAMPLES, 0)),
            "accuracy": ev.get(protocol.ACCURACY),
            "macro_f1": ev.get(protocol.MACRO_F1),
            "rows": train.get(protocol.DATA_ROWS),
            "fingerprint": train.get(protocol.DATA_FINGERPRINT),
        }
    return rows


def validation_macro_f1(sites: Mapping[str, Mapping[str, Any]]) -> float | None:
    """The sites' validation macro-F1 of one round, weighted by their validation examples
    (``None`` if no site reported one): what early stopping and ``fedhaven tune`` watch —
    never the held-out test set."""
    rows = [s for s in sites.values() if s["macro_f1"] is not None and s["val_examples"] > 0]
    total = sum(s["val_examples"] for s in rows)
    return sum(s["macro_f1"] * s["val_examples"] for s in rows) / total if total else None


class EarlyStopping:
    """Stop after ``patience`` rounds without an improvement of more than ``min_delta``."""

    def __init__(self, patience: int, min_delta: float = 0.0) -> None:
        self.patience, self.min_delta = patience, min_delta
        self.best: float | None = None
        self.best_round = 0
        self._since = 0

    def update(self, server_round: int, value: float | None) -> bool:
        """Record a round's metric; ``True`` when the run should stop now."""
        if value is not None and (self.best is None or value > self.best + self.min_delta):
            self.best, self.best_round, self._since = value, server_round, 0
            return False
        self._since += 1
        return self._since >= self.patience


class _Stop(Exception):
    """Raised from the per-round evaluation to end Flower's round loop early."""


def run_server(
    grid: Grid, cfg: Config, progress: ProgressFn | None = None, engine: str = DEPLOYMENT
) -> dict[str, Any]:
    """Run the federation on ``grid`` and write the run directory; returns the summary.

    ``engine`` (:data:`SIMULATION` or :data:`DEPLOYMENT`) is recorded in the summary: only a
    simulated run's data can be rebuilt for ``fedhaven audit``.
    """
    t0 = time.perf_counter()
    out = run_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    labels = cfg.data.label_names
    test = fdata.tokenize(
        fdata.load(cfg.data.test_path, cfg.data, split="test"),
        load_tokenizer(cfg.model.path),
        cfg.model.max_length,
    )
    model = build_model(cfg, default_device())
    initial = protocol.to_record(adapter_state(model))
    base = build_strategy(cfg)
    strategy, accountant = central_dp.wrap(base, cfg)

    def central_epsilon() -> float | None:
        if accountant is None:
            return None
        return accountant.get_epsilon(cfg.privacy.delta) if accountant.num_releases else 0.0

    history: list[dict[str, Any]] = []
    final_eval: dict[str, Any] = {}
    patience = cfg.federation.patience
    stopper = EarlyStopping(patience, cfg.federation.min_delta)
    best: dict[str, Any] = {}  # with patience: the best round's arrays and evaluation
    metrics_file = (out / METRICS_FILE).open("w")

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:  # the untrained head says nothing worth the time
            return None
        set_adapter_state(model, protocol.from_record(arrays))
        ev = evaluate(model, test, cfg)
        final_eval.update(ev)
        sites = _site_rows(base, server_round)
        eps = [s["epsilon"] for s in sites.values() if s["epsilon"] is not None]
        validation = validation_macro_f1(sites)
        line = {
            "round": server_round,
            "wall_s": round(time.perf_counter() - t0, 2),
            "global": {k: ev[k] for k in ("loss", "accuracy", "macro_f1", "per_class_f1")},
            "validation_macro_f1": validation,
            "max_epsilon": max(eps, default=None),
            "central_epsilon": central_epsilon(),
            **base.round_stats.get(server_round, {}),
            "sites": sites,
        }
        history.append(line)
        metrics_file.write(json.dumps(line) + "\n")
        metrics_file.flush()
        if progress:
            progress(line)
        if patience:
            stop = stopper.update(server_round, validation)
            if stopper.best_round == server_round:
                best.update(arrays=arrays, eval=dict(ev))
            if stop:
                log.warning(
                    "early stopping after round %d: the sites' validation macro-F1 has not "
                    "improved for %d rounds (best: round %d)",
                    server_round,
                    patience,
                    stopper.best_round,
                )
                raise _Stop
        return MetricRecord(
            {
                protocol.ACCURACY: ev["accuracy"],
                protocol.MACRO_F1: ev["macro_f1"],
                protocol.LOSS: ev["loss"],
            }
        )

    stopped_early = False
    try:
        final = strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=cfg.federation.rounds,
            train_config=ConfigRecord(),
            evaluate_config=ConfigRecord(),
            evaluate_fn=evaluate_global,
        ).arrays
    except _Stop:
        stopped_early, final = True, ArrayRecord()
    finally:
        metrics_file.close()

    if best:  # early stopping on: the best round's model is the run's model
        final = best["arrays"]
        final_eval.update(best["eval"])
    if len(final) == 0:  # no round aggregated anything: every site failed
        log.warning("no site update was accepted in any round: saving the initial adapter")
        final = initial
    set_adapter_state(model, protocol.from_record(final))
    save_trained(model, cfg, out / ADAPTER_DIR)

    sites = {}
    for line in history:  # a site's latest round it took part in
        for node, row in line["sites"].items():
            sites[node] = {
                "examples": row["examples"],
                "epsilon": row["epsilon"],
                "accuracy": row["accuracy"],
                "macro_f1": row["macro_f1"],
                "rows": row["rows"],
                "fingerprint": row["fingerprint"],
                "last_round": line["round"],
            }
    site_eps = [s["epsilon"] for s in sites.values() if s["epsilon"] is not None]
    summary = {
        "rounds": len(history),
        "best_round": stopper.best_round if best else len(history),
        "stopped_early": stopped_early,
        "labels": labels,
        "global": {
            k: final_eval[k] for k in ("accuracy", "macro_f1", "loss", "per_class_f1", "confusion")
        },
        "sites": sites,
        "bytes_per_site_round": protocol.record_nbytes(initial),
        "full_model_bytes": full_model_bytes(model.get_base_model()),
        "max_epsilon": max(site_eps, default=None),
        "delta": cfg.privacy.delta if cfg.privacy.enabled else None,
        # site-level (ε, δ) of the released models, from Flower's accountant
        "central_dp": None
        if accountant is None
        else {
            "mode": cfg.privacy.central,
            "noise_multiplier": cfg.privacy.central_noise,
            "clipping_norm": getattr(strategy, "clipping_norm", cfg.privacy.central_clip),
            "releases": accountant.num_releases,
            "epsilon": central_epsilon(),
            "delta": cfg.privacy.delta,
        },
        "wall_s": round(time.perf_counter() - t0, 2),
        "config": cfg.to_flat(),
        "versions": {p: version(p) for p in ("flwr", "torch", "transformers", "peft", "opacus")},
        "run_dir": str(out),
        "engine": engine,
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    write_report(out)  # report.md, plots/ and the adapter's model card
    return summary


def make_server_app(
    overrides: Mapping[str, Any] | None = None,
    progress: ProgressFn | None = None,
    engine: str = DEPLOYMENT,
) -> ServerApp:
    """A ServerApp whose run config is ``context.run_config`` updated with ``overrides``."""
    fixed = dict(overrides or {})
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, from_flat({**context.run_config, **fixed}), progress, engine)

    return server


app = make_server_app()
