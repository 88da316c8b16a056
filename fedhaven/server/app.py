"""The coordinator's Flower ServerApp: the configured aggregation rule over the adapter,
server-side evaluation on the held-out set each round, federated evaluation on the sites'
validation splits, a checkpoint after every round, and at the end the run directory:
``adapter/`` (PEFT format), ``metrics.jsonl``, ``summary.json``.

Checkpoint and resume (Flower has none: flwr issue #599). After every round the coordinator
writes ``checkpoint/`` in the run directory: ``manifest.json`` (round, flat run config,
metrics history, strategy / early-stopping state, the last evaluation) and one
``arrays-rNNNN.npz`` (the global adapter, the best round's adapter, the server optimizer's
moments: every array of the state, keys and dtypes kept). Each file is written to a temporary
file in the same directory, fsync'ed and renamed into place, the manifest last: a crash at
any point leaves the previous checkpoint whole. ``federation.resume = true`` goes on from it
with the same run config: the rounds already done are not repeated.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedhaven import auditlog, protocol
from fedhaven.auditlog import AuditLog
from fedhaven.config import RESUME_MAY_CHANGE, Config, from_flat
from fedhaven.errors import FedhavenError
from fedhaven.fileio import write_atomic
from fedhaven.models import (
    adapter_state,
    build_model,
    full_model_bytes,
    save_trained,
    set_adapter_state,
)
from fedhaven.report import (
    ADAPTER_DIR,
    DEPLOYMENT,
    METRICS_FILE,
    NEVER_PREDICTED,
    SUMMARY_FILE,
    never_predicted,
    write_report,
)
from fedhaven.strategies import STRATEGIES, Validated, central_dp
from fedhaven.strategies.secagg import SecureAggregationGrid
from fedhaven.tasks import get_task
from fedhaven.training import default_device, evaluate

log = logging.getLogger(__name__)

#: Called after each round with that round's line of metrics.jsonl (the CLI prints progress).
ProgressFn = Callable[[dict[str, Any]], None]


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
        max_update_norm=fed.max_update_norm,
        **knobs.get(fed.strategy, {}),
    )


#: The totals of a site's data checks (fedhaven.datacheck), as the summary names them.
DATA_CHECKS = {
    "rows_in": protocol.DATA_ROWS_IN,
    "dropped": protocol.DATA_DROPPED,
    "duplicates": protocol.DATA_DUPLICATES,
    "small_classes": protocol.DATA_SMALL_CLASSES,
}


def _site_rows(
    strategy: Validated, server_round: int, metrics: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Each site's own numbers of a round; ``metrics``: the task's validation metrics."""
    rows = {}
    for node, kinds in sorted(strategy.site_metrics.get(server_round, {}).items()):
        train, ev = kinds.get(MessageType.TRAIN, {}), kinds.get(MessageType.EVALUATE, {})
        rows[str(node)] = {
            "examples": int(train.get(protocol.NUM_EXAMPLES, 0)),
            "epsilon": train.get(protocol.EPSILON),
            "train_loss": train.get(protocol.TRAIN_LOSS),
            "val_examples": int(ev.get(protocol.NUM_EXAMPLES, 0)),
            **{m: ev.get(protocol.METRIC_KEYS[m]) for m in metrics if m != "loss"},
            "rows": train.get(protocol.DATA_ROWS),
            "fingerprint": train.get(protocol.DATA_FINGERPRINT),
            **{k: train.get(key) for k, key in DATA_CHECKS.items()},
        }
    return rows


def validation_score(sites: Mapping[str, Mapping[str, Any]], metric: str) -> float | None:
    """The sites' validation ``metric`` (the task's primary one: macro-F1 for classification)
    of one round, weighted by their validation examples (``None`` if no site reported it):
    what early stopping and ``fedhaven tune`` watch — never the held-out test set."""
    rows = [s for s in sites.values() if s.get(metric) is not None and s["val_examples"] > 0]
    total = sum(s["val_examples"] for s in rows)
    return sum(s[metric] * s["val_examples"] for s in rows) / total if total else None


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

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_round": self.best_round, "since": self._since}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best, self.best_round = state["best"], int(state["best_round"])
        self._since = int(state["since"])


class _Stop(Exception):
    """Raised from the per-round evaluation to end Flower's round loop early."""


# --- checkpoint -----------------------------------------------------------------------------

#: The checkpoint's folder in the run directory, and its manifest (replaced last).
CHECKPOINT_DIR = "checkpoint"
MANIFEST = "manifest.json"
CHECKPOINT_FORMAT = 1
_ARRAY = "__ndarray__"  # marks a reference to an array of the checkpoint's .npz in the JSON


def _pack(obj: Any, arrays: dict[str, np.ndarray]) -> Any:
    """``obj`` as JSON, its arrays moved to ``arrays`` and replaced by references."""
    if isinstance(obj, np.ndarray):
        name = f"a{len(arrays)}"
        arrays[name] = obj
        return {_ARRAY: name}
    if isinstance(obj, Mapping):
        return {str(k): _pack(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_pack(v, arrays) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _unpack(obj: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_ARRAY}:
            return arrays[obj[_ARRAY]]
        return {k: _unpack(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unpack(v, arrays) for v in obj]
    return obj


def save_checkpoint(directory: Path, state: Mapping[str, Any]) -> None:
    """Write ``state`` (JSON values and NumPy arrays, nested; ``state["round"]`` an int) as
    the checkpoint in ``directory``, replacing the previous one only once it is complete."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    packed = _pack(state, arrays)
    name = f"arrays-r{int(state['round']):04d}.npz"
    write_atomic(directory / name, lambda f: np.savez(f, allow_pickle=False, **arrays))
    manifest = {
        "format": CHECKPOINT_FORMAT,
        "arrays_file": name,
        "arrays_sha256": hashlib.sha256((directory / name).read_bytes()).hexdigest(),
        "state": packed,
    }
    text = json.dumps(manifest, indent=1) + "\n"
    write_atomic(directory / MANIFEST, lambda f: f.write(text.encode()))
    for old in directory.iterdir():  # earlier rounds' arrays, and temporaries of a crash
        if old.name != name and (old.name.startswith("arrays-") or old.suffix == ".tmp"):
            with contextlib.suppress(OSError):
                old.unlink()


def load_checkpoint(directory: Path) -> dict[str, Any] | None:
    """The state :func:`save_checkpoint` wrote to ``directory``; ``None`` if there is none."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    fix = "restore the run directory from a backup, or run without federation.resume"
    try:
        manifest = json.loads(path.read_text())
        data = (directory / manifest["arrays_file"]).read_bytes()
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FedhavenError(f"checkpoint in {directory} is unreadable ({e}): {fix}") from e
    if manifest.get("format") != CHECKPOINT_FORMAT:
        raise FedhavenError(
            f"checkpoint in {directory} has format {manifest.get('format')!r}, this fedhaven "
            f"reads {CHECKPOINT_FORMAT}: resume with the fedhaven version that wrote it"
        )
    if hashlib.sha256(data).hexdigest() != manifest.get("arrays_sha256"):
        what = manifest["arrays_file"]
        raise FedhavenError(f"checkpoint in {directory}: {what} is corrupt: {fix}")
    with np.load(directory / manifest["arrays_file"], allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return _unpack(manifest["state"], arrays)


def check_resumable(saved: Mapping[str, Any], cfg: Config, directory: Path) -> None:
    """Raise unless ``cfg`` is the run config the checkpoint in ``directory`` was written
    with (:data:`RESUME_MAY_CHANGE` aside)."""
    now = cfg.to_flat()
    missing = "(absent)"
    for key in dict.fromkeys([*saved, *now]):
        if key in RESUME_MAY_CHANGE:
            continue
        before, after = saved.get(key, missing), now.get(key, missing)
        if before != after:
            raise FedhavenError(
                f"the checkpoint in {directory} is of another run config: '{key}' was "
                f"{before!r}, now {after!r}; resume with the run's own config, or start a new "
                "run in another federation.out-dir"
            )


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


def _record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


class _Resumed(Strategy):
    """``strategy`` as Flower's round loop sees it in a resumed run.

    ``Strategy.start`` always counts rounds from 1; a resumed run gives it the rounds left
    and this wrapper shows ``strategy`` round ``r + offset`` for Flower's round ``r``. The
    sites' learning-rate schedule and privacy ledger read the round from the train config,
    which Flower's ``configure_train`` sets from the round it is given: they see it too.
    """

    def __init__(self, strategy: Strategy, offset: int) -> None:
        super().__init__()
        self.strategy, self.offset = strategy, offset

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round + self.offset, replies)

    def summary(self) -> None:
        self.strategy.summary()


def _resume_state(out: Path, cfg: Config) -> dict[str, Any]:
    saved = load_checkpoint(out / CHECKPOINT_DIR)
    if saved is None:
        raise FedhavenError(f"no checkpoint in {out}: run without federation.resume")
    check_resumable(saved["config"], cfg, out)
    return saved


def _drop_checkpoint(out: Path) -> None:
    """A fresh run in a run directory that holds an earlier run's checkpoint: from now on the
    directory is this run's, and a resume must not pick up the other one."""
    directory = out / CHECKPOINT_DIR
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return
    log.warning(
        "%s holds a checkpoint of an earlier run: this run starts over and replaces it "
        "(federation.resume = true would have gone on from it)",
        out,
    )
    manifest.unlink()  # first: without it the arrays are no checkpoint
    for old in directory.glob("arrays-*.npz"):
        old.unlink()


def run_server(
    grid: Grid, cfg: Config, progress: ProgressFn | None = None, engine: str = DEPLOYMENT
) -> dict[str, Any]:
    """Run the federation on ``grid`` and write the run directory; returns the summary.

    ``engine`` (:data:`SIMULATION` or :data:`DEPLOYMENT`) is recorded in the summary: only a
    simulated run's data can be rebuilt for ``fedhaven audit``.

    After every round the run's state goes to ``checkpoint/`` in the run directory. With
    ``federation.resume`` the run goes on from there, after the checkpoint's round, with
    the checkpoint's global adapter, strategy state, early-stopping state and metrics; it
    ends after ``federation.rounds`` rounds in all. Resuming a run that already ended (all
    rounds done, or stopped early) trains nothing: it writes the adapter, summary and report
    again from the checkpoint (what a crash while writing them would need) and says so.
    """
    t0 = time.perf_counter()
    fed = cfg.federation
    out = run_dir(cfg)
    saved = _resume_state(out, cfg) if fed.resume else None
    out.mkdir(parents=True, exist_ok=True)
    if saved is None:
        _drop_checkpoint(out)
    task = get_task(cfg)
    labels = cfg.data.label_names if task.classification else None
    test = task.encode(task.load(cfg.data.test_path, split="test"))
    model = build_model(cfg, default_device())
    initial = protocol.to_record(adapter_state(model))
    base = build_strategy(cfg)
    strategy, accountant = central_dp.wrap(base, cfg)
    # The run's audit log: appended, never rewritten (a resumed run goes on in the same file).
    audit = AuditLog(out / auditlog.AUDIT_FILE)
    base.audit = audit
    # federation.min-sites holds in every round, or the run stops (FedhavenError, RUN_STOPPED).
    base.stop_below_minimum = True
    base.rejoin_wait_s = fed.rejoin_wait
    secure: SecureAggregationGrid | None = None
    if fed.secure_aggregation:  # the train rounds run as Flower's SecAgg+
        central = cfg.privacy.central != "off"
        grid = secure = SecureAggregationGrid(
            grid,
            weight_key=base.weighted_by_key,
            max_weight=1.0 if central else fed.secagg_max_weight,  # site-weight is 1
            clip=fed.secagg_clip,
            timeout=fed.round_timeout,
        )
        base.secure_aggregation = True

    def central_epsilon() -> float | None:
        if accountant is None:
            return None
        return accountant.get_epsilon(cfg.privacy.delta) if accountant.num_releases else 0.0

    history: list[dict[str, Any]] = []
    final_eval: dict[str, Any] = {}
    patience = fed.patience
    stopper = EarlyStopping(patience, fed.min_delta)
    best: dict[str, Any] = {}  # with patience: the best round's arrays and evaluation
    done, wall_before, stopped_early = 0, 0.0, False  # rounds the checkpoint had finished
    if saved is not None:
        done, stopped_early = int(saved["round"]), bool(saved["stopped_early"])
        initial = _record(saved["arrays"])
        strategy.load_state_dict(saved["strategy"])  # type: ignore[attr-defined]
        stopper.load_state_dict(saved["early_stopping"])
        if saved["best"] is not None:
            best.update(arrays=_record(saved["best"]["arrays"]), eval=saved["best"]["eval"])
        history.extend(saved["history"])
        final_eval.update(saved["last_eval"])
        wall_before = float(history[-1]["wall_s"]) if history else 0.0
        log.warning("resuming the run in %s after round %d of %d", out, done, fed.rounds)
    audit.record(
        auditlog.RUN_STARTED,
        run_dir=str(out),
        engine=engine,
        strategy=fed.strategy,
        rounds=fed.rounds,
        sites=fed.sites,
        min_sites=base.min_train_nodes,
        central_dp=cfg.privacy.central,
        secure_aggregation=fed.secure_aggregation,
        resumed_after_round=done or None,
    )
    latest = {"arrays": initial}  # the global adapter after the last round evaluated
    # The checkpoint's rounds only: a line written after the last checkpoint is of a round
    # that runs again now. Then appended, round by round.
    lines = "".join(json.dumps(line) + "\n" for line in history)
    write_atomic(out / METRICS_FILE, lambda f: f.write(lines.encode()))
    metrics_file = (out / METRICS_FILE).open("a")

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round <= done:  # round 0: the untrained head says nothing worth the time;
            return None  # a resumed run's starting point: evaluated before the checkpoint
        latest["arrays"] = arrays
        set_adapter_state(model, protocol.from_record(arrays))
        ev = evaluate(model, test, cfg)
        final_eval.update(ev)
        sites = _site_rows(base, server_round, task.metrics)
        eps = [s["epsilon"] for s in sites.values() if s["epsilon"] is not None]
        validation = validation_score(sites, task.primary_metric)
        line = {
            "round": server_round,
            "wall_s": round(wall_before + time.perf_counter() - t0, 2),
            "global": {k: ev[k] for k in (*task.metrics, "per_class_f1") if k in ev},
            "validation": validation,
            "max_epsilon": max(eps, default=None),
            "central_epsilon": central_epsilon(),
            **base.round_stats.get(server_round, {}),
            # under SecAgg+: the bytes its messages carried, in place of the tensors'
            **(secure.traffic.get(server_round, {}) if secure else {}),
            "sites": sites,
        }
        history.append(line)
        metrics_file.write(json.dumps(line) + "\n")
        metrics_file.flush()
        stop = False
        if patience:
            stop = stopper.update(server_round, validation)
            if stopper.best_round == server_round:
                best.update(arrays=arrays, eval=dict(ev))
        save_checkpoint(
            out / CHECKPOINT_DIR,
            {
                "round": server_round,
                "stopped_early": stop,
                "config": cfg.to_flat(),
                "arrays": _numpy(arrays),
                "strategy": strategy.state_dict(),  # type: ignore[attr-defined]
                "early_stopping": stopper.state_dict(),
                "best": {
                    "round": stopper.best_round,
                    "arrays": _numpy(best["arrays"]),
                    "eval": best["eval"],
                }
                if best
                else None,
                "last_eval": dict(ev),
                "history": history,
            },
        )
        audit.record(
            auditlog.CHECKPOINT_WRITTEN, round=server_round, path=str(out / CHECKPOINT_DIR)
        )
        if progress:
            progress(line)
        if stop:
            log.warning(
                "early stopping after round %d: the sites' validation %s has not "
                "improved for %d rounds (best: round %d)",
                server_round,
                task.primary_metric,
                patience,
                stopper.best_round,
            )
            raise _Stop
        return MetricRecord({protocol.METRIC_KEYS[k]: ev[k] for k in task.metrics})

    updated = True  # whether any round aggregated an update
    try:
        if saved is not None and (stopped_early or done >= fed.rounds):
            log.warning(
                "the run in %s had already ended (%s): nothing left to train; writing its "
                "adapter, summary and report again from the checkpoint",
                out,
                f"stopped early after round {done}" if stopped_early else f"all {done} rounds",
            )
        else:
            runner = _Resumed(strategy, done) if done else strategy
            result = runner.start(
                grid=grid,
                initial_arrays=initial,
                num_rounds=fed.rounds - done,
                timeout=fed.round_timeout,
                train_config=ConfigRecord(),
                evaluate_config=ConfigRecord(),
                evaluate_fn=lambda r, arrays: evaluate_global(r + done, arrays),
            )
            updated = len(result.arrays) > 0
    except _Stop:
        stopped_early = True
    except Exception as e:
        # User errors of the round loop (too few sites) are logged where they are raised.
        if not isinstance(e, FedhavenError):
            audit.record(auditlog.RUN_STOPPED, reason=f"{type(e).__name__}: {e}")
        raise
    finally:
        metrics_file.close()

    final = latest["arrays"]
    if best:  # early stopping on: the best round's model is the run's model
        final = best["arrays"]
        final_eval.update(best["eval"])
    elif not updated:  # no round aggregated anything: every site failed
        log.warning(
            "no site update was accepted in any round%s: saving the %s adapter",
            " since the resume" if done else "",
            "checkpoint's" if done else "initial",
        )
    set_adapter_state(model, protocol.from_record(final))
    save_trained(model, cfg, out / ADAPTER_DIR)
    audit.record(
        auditlog.CHECKPOINT_WRITTEN, round=len(history), path=str(out / ADAPTER_DIR), final=True
    )

    sites = {}
    for line in history:  # a site's latest round it took part in
        for node, row in line["sites"].items():
            sites[node] = {
                "examples": row["examples"],
                "epsilon": row["epsilon"],
                **{m: row[m] for m in task.metrics if m != "loss"},
                "rows": row["rows"],
                "fingerprint": row["fingerprint"],
                **{k: row.get(k) for k in DATA_CHECKS},  # absent in runs written before them
                "last_round": line["round"],
            }
    if done:  # Flower numbers a site anew when a run restarts: the same data is the same site
        later = {s["fingerprint"]: n for n, s in sites.items() if s["last_round"] > done}
        for node in [n for n, s in sites.items() if s["last_round"] <= done]:
            fingerprint = sites[node]["fingerprint"]
            if fingerprint is not None and later.get(fingerprint, node) != node:
                del sites[node]
    site_eps = [s["epsilon"] for s in sites.values() if s["epsilon"] is not None]
    summary = {
        "rounds": len(history),
        "best_round": stopper.best_round if best else len(history),
        "stopped_early": stopped_early,
        "task": task.name,
        "primary_metric": task.primary_metric,
        "metrics": list(task.metrics),
        "labels": labels,
        "global": {
            k: final_eval[k]
            for k in (*task.metrics, "per_class_f1", "confusion")
            if k in final_eval
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
        "wall_s": round(wall_before + time.perf_counter() - t0, 2),
        "resumed_after_round": done or None,
        "config": cfg.to_flat(),
        "versions": {p: version(p) for p in ("flwr", "torch", "transformers", "peft", "opacus")},
        "run_dir": str(out),
        "engine": engine,
    }
    if "confusion" in summary["global"]:  # classification only: a causal LM has no classes
        summary[NEVER_PREDICTED] = never_predicted(summary["global"]["confusion"], labels)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    audit.record(
        auditlog.RUN_FINISHED,
        rounds=summary["rounds"],
        best_round=summary["best_round"],
        stopped_early=stopped_early,
        metrics={k: summary["global"][k] for k in task.metrics},
        max_epsilon=summary["max_epsilon"],
        central_epsilon=central_epsilon(),
        wall_s=summary["wall_s"],
    )
    write_report(out)  # report.md, plots/ and the adapter's model card
    return summary


def make_server_app(
    cfg: Config | None = None,
    progress: ProgressFn | None = None,
    engine: str = DEPLOYMENT,
) -> ServerApp:
    """A ServerApp that runs ``cfg``; without one (``flwr run``), the run config Flower hands
    it, parsed once per run."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, cfg or from_flat(context.run_config), progress, engine)

    return server


app = make_server_app()
