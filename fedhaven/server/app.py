"""The coordinator's Flower ServerApp: the configured aggregation rule over the adapter,
server-side evaluation on the held-out set each round, federated evaluation on the sites'
validation splits, a checkpoint after every round (:mod:`fedhaven.server.checkpoint`), and
at the end the run directory (:mod:`fedhaven.run_record`): ``adapter/`` (PEFT format),
``metrics.jsonl``, ``summary.json``.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MessageType, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedhaven import auditlog, protocol, run_record
from fedhaven.auditlog import AuditLog
from fedhaven.config import Config, from_flat
from fedhaven.errors import FedhavenError
from fedhaven.fileio import write_atomic
from fedhaven.models import (
    adapter_state,
    build_model,
    full_model_bytes,
    save_trained,
    set_adapter_state,
)
from fedhaven.report import write_report
from fedhaven.run_record import (
    ADAPTER_DIR,
    AUDIT_FILE,
    BEST_ROUND,
    DEPLOYMENT,
    GLOBAL,
    MAX_EPSILON,
    METRICS_FILE,
    ROUNDS,
    SUMMARY_FILE,
    VALIDATION,
    WALL_S,
    central_dp_row,
    metrics_line,
    site_row,
)
from fedhaven.server.checkpoint import Resumed, RunState, drop_checkpoint, resume_state
from fedhaven.strategies import STRATEGIES, Validated, central_dp
from fedhaven.strategies.secagg import SecureAggregationGrid
from fedhaven.tasks import get_task
from fedhaven.training import default_device, evaluate, lr_factor

log = logging.getLogger(__name__)

#: Called after each round with that round's line of metrics.jsonl (the CLI prints progress).
ProgressFn = Callable[[dict[str, Any]], None]


def build_strategy(cfg: Config) -> Validated:
    """The rule ``federation.strategy`` names, with its knobs from ``cfg.federation``."""
    fed = cfg.federation
    central = cfg.privacy.central != "off"
    knobs: dict[str, dict[str, Any]] = {
        "fedprox": {"proximal_mu": fed.proximal_mu},
        "fedavg": {
            "server_momentum": fed.server_momentum,
            "lr_factor": functools.partial(lr_factor, cfg=cfg),
        },
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


def _site_rows(
    strategy: Validated, server_round: int, metrics: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Each site's own numbers of a round; ``metrics``: the task's validation metrics."""
    rows = {}
    for node, kinds in sorted(strategy.site_metrics.get(server_round, {}).items()):
        train, ev = kinds.get(MessageType.TRAIN, {}), kinds.get(MessageType.EVALUATE, {})
        rows[str(node)] = site_row(train, ev, metrics)
    return rows


class _Run:
    """One run of the federation on a grid: its setup (fresh or resumed), the evaluation
    Flower calls after each round, and the run directory's files at the end."""

    def __init__(self, grid: Grid, cfg: Config, progress: ProgressFn | None, engine: str) -> None:
        self.t0 = time.perf_counter()
        self.cfg, self.progress, self.engine = cfg, progress, engine
        self.out = out = run_record.run_directory(cfg)
        saved = resume_state(out, cfg) if cfg.federation.resume else None
        out.mkdir(parents=True, exist_ok=True)
        if saved is None:
            drop_checkpoint(out)
        self.task = task = get_task(cfg)
        task.check()
        self.test = task.encode(task.load(cfg.data.test_path, split="test"))
        self.model = build_model(cfg, default_device())
        self.base = build_strategy(cfg)
        self.strategy, self.accountant = central_dp.wrap(self.base, cfg)
        # The run's audit log: appended, never rewritten (a resumed run goes on in the same file).
        self.audit = AuditLog(out / AUDIT_FILE)
        self.grid = self._attach(grid)
        self.stopper = EarlyStopping(cfg.federation.patience, cfg.federation.min_delta)
        self.state = RunState(
            self.strategy,  # type: ignore[arg-type]  # the rules all keep state
            self.stopper,
            cfg.to_flat(),
            protocol.to_record(adapter_state(self.model)),
        )
        self.resumed, self.wall_before = saved is not None, 0.0
        if saved is not None:
            self.state.load_state_dict(saved)
            history = self.state.history
            self.wall_before = float(history[-1][WALL_S]) if history else 0.0
            log.warning(
                "resuming the run in %s after round %d of %d",
                out,
                self.state.round,
                cfg.federation.rounds,
            )
        self.done = self.state.round  # rounds the checkpoint had finished
        self.initial = self.state.arrays

    def _attach(self, grid: Grid) -> Grid:
        """The strategy's audit log and site rules; under SecAgg+, the grid that runs it."""
        fed, base = self.cfg.federation, self.base
        base.audit = self.audit
        # federation.min-sites holds in every round, or the run stops (FedhavenError, RUN_STOPPED).
        base.stop_below_minimum = True
        base.rejoin_wait_s = fed.rejoin_wait
        self.secure: SecureAggregationGrid | None = None
        if fed.secure_aggregation:  # the train rounds run as Flower's SecAgg+
            central = self.cfg.privacy.central != "off"
            grid = self.secure = SecureAggregationGrid(
                grid,
                weight_key=base.weighted_by_key,
                max_weight=1.0 if central else fed.secagg_max_weight,  # site-weight is 1
                clip=fed.secagg_clip,
                timeout=fed.round_timeout,
            )
            base.secure_aggregation = True
        return grid

    def wall_s(self) -> float:
        """Seconds the run has taken, the runs before a resume included."""
        return self.wall_before + time.perf_counter() - self.t0

    def central_epsilon(self) -> float | None:
        if self.accountant is None:
            return None
        if not self.accountant.num_releases:
            return 0.0
        return self.accountant.get_epsilon(self.cfg.privacy.delta)

    def evaluate_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's ``evaluate_fn``: the round's global adapter on the held-out set, its line
        of metrics.jsonl, early stopping, the checkpoint."""
        if server_round <= self.done:  # round 0: the untrained head says nothing worth the
            return None  # time; a resumed run's starting point: evaluated before the checkpoint
        state, task = self.state, self.task
        state.arrays = arrays
        set_adapter_state(self.model, protocol.from_record(arrays))
        ev = evaluate(self.model, self.test, self.cfg)
        stats = {
            **self.base.round_stats.get(server_round, {}),
            # under SecAgg+: the bytes its messages carried, in place of the tensors'
            **(self.secure.traffic.get(server_round, {}) if self.secure else {}),
        }
        sites = _site_rows(self.base, server_round, task.metrics)
        line = metrics_line(
            server_round, self.wall_s(), ev, sites, task, self.central_epsilon(), stats
        )
        state.round, state.last_eval = server_round, dict(ev)
        state.history.append(line)
        self.metrics_file.write(json.dumps(line) + "\n")
        self.metrics_file.flush()
        patience = self.cfg.federation.patience
        state.stopped_early = bool(patience) and self.stopper.update(server_round, line[VALIDATION])
        if patience and self.stopper.best_round == server_round:
            state.best_round, state.best_arrays, state.best_eval = server_round, arrays, dict(ev)
        self.audit.record(
            auditlog.CHECKPOINT_WRITTEN, round=server_round, path=str(state.save(self.out))
        )
        if self.progress:
            self.progress(line)
        if state.stopped_early:
            log.warning(
                "early stopping after round %d: the sites' validation %s has not "
                "improved for %d rounds (best: round %d)",
                server_round,
                task.primary_metric,
                patience,
                self.stopper.best_round,
            )
            raise _Stop
        return MetricRecord({protocol.METRIC_KEYS[k]: ev[k] for k in task.metrics})

    def _start(self) -> None:
        """The audit log's first event of this run, and metrics.jsonl opened for its rounds."""
        fed = self.cfg.federation
        self.audit.record(
            auditlog.RUN_STARTED,
            run_dir=str(self.out),
            engine=self.engine,
            strategy=fed.strategy,
            rounds=fed.rounds,
            sites=fed.sites,
            min_sites=self.base.min_train_nodes,
            central_dp=self.cfg.privacy.central,
            secure_aggregation=fed.secure_aggregation,
            resumed_after_round=self.done or None,
        )
        # The checkpoint's rounds only: a line written after the last checkpoint is of a round
        # that runs again now. Then appended, round by round.
        lines = "".join(json.dumps(line) + "\n" for line in self.state.history)
        write_atomic(self.out / METRICS_FILE, lambda f: f.write(lines.encode()))
        self.metrics_file = (self.out / METRICS_FILE).open("a")

    def _rounds(self) -> bool:
        """Flower's round loop over the rounds left; whether any round aggregated an update."""
        fed, done = self.cfg.federation, self.done
        if self.resumed and (self.state.stopped_early or done >= fed.rounds):
            log.warning(
                "the run in %s had already ended (%s): nothing left to train; writing its "
                "adapter, summary and report again from the checkpoint",
                self.out,
                f"stopped early after round {done}"
                if self.state.stopped_early
                else f"all {done} rounds",
            )
            return True
        runner = Resumed(self.strategy, done) if done else self.strategy
        result = runner.start(
            grid=self.grid,
            initial_arrays=self.initial,
            num_rounds=fed.rounds - done,
            timeout=fed.round_timeout,
            train_config=ConfigRecord(),
            evaluate_config=ConfigRecord(),
            evaluate_fn=lambda r, arrays: self.evaluate_round(r + done, arrays),
        )
        return len(result.arrays) > 0

    def run(self) -> dict[str, Any]:
        """The rounds left, then the run directory's adapter, summary and report."""
        self._start()
        updated = True
        try:
            updated = self._rounds()
        except _Stop:
            self.state.stopped_early = True
        except Exception as e:
            # User errors of the round loop (too few sites) are logged where they are raised.
            if not isinstance(e, FedhavenError):
                self.audit.record(auditlog.RUN_STOPPED, reason=f"{type(e).__name__}: {e}")
            raise
        finally:
            self.metrics_file.close()
        return self._finish(updated)

    def _finish(self, updated: bool) -> dict[str, Any]:
        """Save the run's model (the best round's with early stopping) and write the summary
        and the report; ``updated``: whether any round aggregated an update."""
        state, cfg, task = self.state, self.cfg, self.task
        final, final_eval = state.arrays, dict(state.last_eval)
        if state.best_arrays is not None:  # early stopping on: the best round's is the model
            final, final_eval = state.best_arrays, {**final_eval, **state.best_eval}
        elif not updated:  # no round aggregated anything: every site failed
            log.warning(
                "no site update was accepted in any round%s: saving the %s adapter",
                " since the resume" if self.done else "",
                "checkpoint's" if self.done else "initial",
            )
        set_adapter_state(self.model, protocol.from_record(final))
        save_trained(self.model, cfg, self.out / ADAPTER_DIR)
        self.audit.record(
            auditlog.CHECKPOINT_WRITTEN,
            round=len(state.history),
            path=str(self.out / ADAPTER_DIR),
            final=True,
        )
        central = None
        if self.accountant is not None:
            clip = getattr(self.strategy, "clipping_norm", cfg.privacy.central_clip)
            central = central_dp_row(
                cfg, clip, self.accountant.num_releases, self.central_epsilon()
            )
        summary = run_record.summary(
            cfg,
            task,
            state.history,
            final_eval,
            best_round=state.best_round if state.best_arrays is not None else len(state.history),
            stopped_early=state.stopped_early,
            model_bytes=(
                protocol.record_nbytes(self.initial),
                full_model_bytes(self.model.get_base_model()),
            ),
            central_dp=central,
            wall_s=self.wall_s(),
            resumed_after=self.done,
            run_dir=str(self.out),
            engine=self.engine,
        )
        (self.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        self.audit.record(
            auditlog.RUN_FINISHED,
            rounds=summary[ROUNDS],
            best_round=summary[BEST_ROUND],
            stopped_early=state.stopped_early,
            metrics={k: summary[GLOBAL][k] for k in task.metrics},
            max_epsilon=summary[MAX_EPSILON],
            central_epsilon=self.central_epsilon(),
            wall_s=summary[WALL_S],
        )
        write_report(self.out)  # report.md, plots/ and the adapter's model card
        return summary


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
    return _Run(grid, cfg, progress, engine).run()


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
