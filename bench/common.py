"""What the benchmark scripts share: `fedhaven simulate` runs, results for the suite, status
lines, markdown tables, and the in-process round loop the simulation is compared with.

Every script runs alone (``python bench/demo.py``) and prints its table. Under the suite
(``bench/suite.py``) two environment variables are set:

- :data:`RESULTS_ENV`: a folder; each script writes ``<name>.json`` there (its table, its
  notes and the numbers the suite's report needs).
- :data:`RUNS_ENV`: a folder of simulate runs shared by the scripts. A run with the same
  arguments and the same code (:func:`code_digest`) is made once: the demo, privacy-audit,
  federation-overhead and utility tables then show the very same runs (DP runs differ from
  run to run on purpose), and the suite spends its half hour once on each.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: The no-DP preset (`fedhaven simulate --config presets/no-dp.toml`).
PRESET = str(ROOT / "presets" / "no-dp.toml")
RESULTS_ENV = "FEDHAVEN_BENCH_RESULTS"
RUNS_ENV = "FEDHAVEN_BENCH_RUNS"
#: Lines on stderr that start with this are progress: the suite shows the latest one.
STATUS_PREFIX = "[bench] "
#: Written into a shared run's folder once the run is complete.
RUN_META = "bench-run.json"
#: The demo's runs, as every table and the report name them: the defaults (DP at ε=8),
#: `--no-dp` (the recipe's no-DP values) and the no-DP preset.
DP_RUN = "DP ε=8 (defaults)"
NO_DP_RUN = "no DP (--no-dp)"
PRESET_RUN = "no DP (presets/no-dp.toml)"
#: Their `fedhaven simulate` arguments, the same in every script: a run is made once, shared.
DEMO_RUNS: dict[str, list[str]] = {
    DP_RUN: [],
    NO_DP_RUN: ["--no-dp"],
    PRESET_RUN: ["--config", PRESET],
}


def status(message: str) -> None:
    """One progress line (stderr, so the printed table stays clean)."""
    print(STATUS_PREFIX + message, file=sys.stderr, flush=True)


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; cells are taken as they are (format numbers before)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def report(name: str, table: str, notes: Sequence[str] = (), **data: Any) -> None:
    """Print the table and notes; under the suite also write them, with ``data``, as JSON."""
    print(table)
    for note in notes:
        print(note)
    folder = os.environ.get(RESULTS_ENV)
    if folder:
        payload = {"name": name, "table": table, "notes": list(notes), **data}
        Path(folder, f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")


def earlier_cells(name: str) -> list[dict[str, Any]]:
    """The cells an earlier invocation of benchmark ``name`` wrote under the suite (none when
    run alone): a separate benchmark measured in slices accumulates them."""
    folder = os.environ.get(RESULTS_ENV)
    path = Path(folder, f"{name}.json") if folder else None
    return json.loads(path.read_text())["cells"] if path and path.is_file() else []


def merge_cells(
    old: Iterable[dict[str, Any]], new: Iterable[dict[str, Any]], key: Sequence[str]
) -> list[dict[str, Any]]:
    """``old`` with every cell ``new`` measures again (same values at ``key``) replaced, then
    the new cells."""
    new = list(new)
    keys = {tuple(c.get(k) for k in key) for c in new}
    return [c for c in old if tuple(c.get(k) for k in key) not in keys] + new


# --- simulate runs ---------------------------------------------------------------------------


@dataclass
class Run:
    """A finished `fedhaven simulate` run."""

    summary: dict[str, Any]
    run_dir: Path
    command_s: float  # the whole command: Python start, imports, Ray, the run, the report
    args: list[str] = field(default_factory=list)
    shared: bool = False  # made earlier in this suite by another script


_own_root: Path | None = None


@functools.cache
def code_digest() -> str:
    """A digest of what a run depends on besides its arguments: fedhaven's sources and the
    run-config defaults in pyproject.toml. A run of other code is not reused: a recipe's new
    default reads the same arguments."""
    h = hashlib.sha256()
    for path in [*sorted((ROOT / "fedhaven").rglob("*.py")), ROOT / "pyproject.toml"]:
        h.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def run_key(args: Sequence[str], draw: int = 1) -> str:
    """The shared run's folder name: its arguments (and draw) under this code."""
    named = list(args) if draw == 1 else [*args, f"draw {draw}"]
    return hashlib.sha256(json.dumps([code_digest(), *named]).encode()).hexdigest()[:16]


def runs_root() -> Path:
    global _own_root
    folder = os.environ.get(RUNS_ENV)
    if folder:
        return Path(folder)
    if _own_root is None:  # running alone: a temporary folder, removed at exit
        _own_root = Path(tempfile.mkdtemp(prefix="fedhaven-bench-"))
        atexit.register(shutil.rmtree, _own_root, ignore_errors=True)
    return _own_root


def simulate(label: str, args: Sequence[str], *, draw: int = 1) -> Run:
    """``fedhaven simulate ARGS`` in its own process, or the suite's earlier run of it.

    ``draw`` > 1: another run of the same arguments, not the shared one (a DP run is one
    draw of its noise; a median needs several). Its per-round lines become status lines
    (``label: round 3, 41 s``).
    """
    args = list(args)
    out = runs_root() / run_key(args, draw)
    meta = out / RUN_META
    from fedhaven.run_record import SUMMARY_FILE

    if meta.is_file():
        status(f"{label}: reusing the suite's run")
        m = json.loads(meta.read_text())
        summary = json.loads((out / SUMMARY_FILE).read_text())
        return Run(summary, out, m["command_s"], args, shared=True)
    if out.exists():  # a run of ours that did not finish
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "fedhaven.cli", "simulate", "--out", str(out), *args]
    status(f"{label}: starting")
    t0 = time.perf_counter()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:  # "round   3     41.2s  macro-F1 ..."
            words = line.split()
            if words[:1] == ["round"] and len(words) > 2:
                status(f"{label}: round {words[1]} done, {words[2]}")
    if proc.returncode != 0:
        raise SystemExit(f"{label}: `fedhaven simulate {' '.join(args)}` failed")
    command_s = time.perf_counter() - t0
    meta.write_text(json.dumps({"args": args, "command_s": command_s}) + "\n")
    return Run(json.loads((out / SUMMARY_FILE).read_text()), out, command_s, args)


def majority_baseline(cfg: Any) -> dict[str, Any]:
    """Accuracy and macro-F1 of always answering the held-out set's most common label."""
    from collections import Counter

    from fedhaven.data import LABEL
    from fedhaven.tasks import get_task

    counts = Counter(get_task(cfg).load(cfg.data.test_path, split="test")[LABEL])
    label, n = counts.most_common(1)[0]
    share = n / sum(counts.values())
    # F1 of that class is 2p/(1+p) (precision p, recall 1); every other class scores 0
    return {
        "label": cfg.data.label_names[label],
        "accuracy": share,
        "macro_f1": 2 * share / (1 + share) / len(cfg.data.label_names),
        "test_rows": sum(counts.values()),
    }


def trajectory(run: Run) -> list[float]:
    """The run's held-out macro-F1 after each round (its metrics.jsonl)."""
    from fedhaven.run_record import METRICS_FILE

    lines = (run.run_dir / METRICS_FILE).read_text().splitlines()
    return [json.loads(line)["global"]["macro_f1"] for line in lines]


# --- the same rounds in one process ----------------------------------------------------------


@dataclass
class Timings:
    """Wall seconds by phase of :func:`local_rounds`."""

    setup: float = 0.0  # data, tokenizer, model: before round 1
    train: float = 0.0  # every site's train_round, all rounds
    train_rounds: list[float] = field(default_factory=list)  # the same, round by round
    aggregate: float = 0.0  # the coordinator's FedAvg over the sites' replies
    evaluate_global: float = 0.0  # the held-out set, every round
    evaluate_sites: float = 0.0  # every site's validation split, every round

    @property
    def total(self) -> float:
        return self.setup + self.train + self.aggregate + self.evaluate_global + self.evaluate_sites


def demo_data(cfg: Any, *, pooled: bool = False) -> tuple[list[tuple[Any, Any]], Any]:
    """The simulated sites' (train, validation) rows, encoded, and the held-out set.

    ``pooled``: one site holding every site's training rows (and no validation rows): the
    centralized baseline, trained on exactly the rows the federation trained on.
    """
    from datasets import concatenate_datasets
    from torch.utils.data import TensorDataset

    from fedhaven import data as fdata
    from fedhaven.tasks import get_task

    task = get_task(cfg)
    full = task.load(cfg.data.path)
    parts = fdata.simulated_sites(full, cfg.data, cfg.federation.sites, cfg.train.seed)
    test = task.encode(task.load(cfg.data.test_path, split="test"))
    if pooled:  # encoded as one set: each site's rows may fit another padded length
        train = task.encode(concatenate_datasets([train for train, _ in parts]))
        return [(train, TensorDataset(*(t[:0] for t in train.tensors)))], test
    return [(task.encode(train), task.encode(val)) for train, val in parts], test


@dataclass
class LoopResult:
    timings: Timings
    evaluation: dict[str, Any]  # the last one on the held-out set
    max_epsilon: float | None  # over the sites, after the last round (None without DP)
    train_rows: int  # every site's training rows


def local_rounds(
    cfg: Any,
    *,
    pooled: bool = False,
    evaluate_every_round: bool = True,
    on_round: Callable[[int], None] | None = None,
    device: str = "cpu",
) -> LoopResult:
    """FedAvg's rounds in this process, through the functions the simulation's sites and
    coordinator call: each round every site trains from the global adapter
    (``training.train_round``, its accountant and label prior carried over from its last
    round), its adapter goes back as the site's reply (``protocol.train_reply``) and the
    coordinator's FedAvg (``fedhaven.strategies.FedAvg.aggregate_train``: replies validated,
    averaged by examples, with ``federation.server-momentum``; ``pooled``: none, since one
    site's training is plain training) makes the new global adapter, evaluated on the held-out
    set and on every site's validation split. One site after another, torch on every core.

    ``evaluate_every_round=False`` evaluates the held-out set after the last round only;
    ``device`` is where the models train and evaluate.
    """
    from flwr.app import Message, MessageType, RecordDict

    from fedhaven import protocol
    from fedhaven.models import adapter_state, build_model, set_adapter_state
    from fedhaven.strategies import FedAvg
    from fedhaven.training import evaluate, lr_factor, train_round

    _coordinator_identity()
    strategy = FedAvg(
        server_momentum=0.0 if pooled else cfg.federation.server_momentum,
        lr_factor=functools.partial(lr_factor, cfg=cfg),
    )
    timings = Timings()
    t = time.perf_counter()
    sites, test = demo_data(cfg, pooled=pooled)
    global_state = adapter_state(build_model(cfg, device))
    strategy.current_arrays = protocol.to_record(global_state)  # what momentum steps from
    accountants: list[dict[str, Any] | None] = [None] * len(sites)
    priors: list[list[float] | None] = [None] * len(sites)
    ev: dict[str, Any] = {}
    epsilons: list[float | None] = []
    timings.setup = time.perf_counter() - t
    rounds = cfg.federation.rounds
    for server_round in range(1, rounds + 1):
        replies, epsilons = [], []
        t = time.perf_counter()
        for k, (train, _) in enumerate(sites):
            model = build_model(cfg, device)
            set_adapter_state(model, global_state)
            result = train_round(
                model,
                train,
                cfg,
                server_round=server_round,
                accountant_state=accountants[k],
                label_prior=priors[k],
            )
            accountants[k], priors[k] = result.accountant_state, result.label_prior
            # the site's reply, as the ClientApp sends it (site node ids 100, 101, ...)
            sent = Message(RecordDict(), dst_node_id=100 + k, message_type=MessageType.TRAIN)
            content = protocol.train_reply(
                adapter_state(model), {protocol.NUM_EXAMPLES: result.num_examples}
            )
            replies.append(Message(content, reply_to=sent))
            epsilons.append(result.epsilon)
        timings.train_rounds.append(time.perf_counter() - t)
        timings.train += timings.train_rounds[-1]
        t = time.perf_counter()
        arrays, _ = strategy.aggregate_train(server_round, replies)
        if arrays is None:
            raise RuntimeError(f"round {server_round}: no site's update passed validation")
        global_state = protocol.from_record(arrays)
        model = build_model(cfg, device)
        set_adapter_state(model, global_state)
        timings.aggregate += time.perf_counter() - t
        if evaluate_every_round or server_round == rounds:
            t = time.perf_counter()
            ev = evaluate(model, test, cfg)
            timings.evaluate_global += time.perf_counter() - t
        if evaluate_every_round:
            t = time.perf_counter()
            for _, val in sites:
                evaluate(model, val, cfg)
            timings.evaluate_sites += time.perf_counter() - t
        if on_round:
            on_round(server_round)
    eps = [e for e in epsilons if e is not None]
    rows = sum(len(train) for train, _ in sites)
    return LoopResult(timings, ev, max(eps) if eps else None, rows)


def _coordinator_identity() -> None:
    """The task identity Flower 1.42 stamps on every Message it builds: a coordinator's, as
    Flower's own in-process simulation sets it, unless this process has one already."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    try:
        TaskIdentity.run_id  # noqa: B018  (raises where no identity is set)
    except RuntimeError:
        TaskIdentity.task_id, TaskIdentity.run_id = 1, 1
        TaskIdentity.node_id = SUPERLINK_NODE_ID


def centralized(flat: dict[str, Any], label: str) -> dict[str, Any]:
    """A run's config, pooled: one site with every site's training rows, trained through
    :func:`local_rounds` for the same rounds and the same optimizer steps per round. The
    batch is the sites' batch times the number of sites, so each step samples the same share
    of the data (under DP: the same sampling rate, steps and ε, hence the same noise
    multiplier, on a batch as large as all the sites' together)."""
    from fedhaven.config import from_flat
    from fedhaven.training import steps_per_round

    cfg = from_flat(flat)
    cfg = cfg.replace(**{"train.batch-size": cfg.train.batch_size * cfg.federation.sites})
    rounds = cfg.federation.rounds

    def on_round(r: int) -> None:
        status(f"centralized {label}, round {r}/{rounds} done")

    loop = local_rounds(cfg, pooled=True, evaluate_every_round=False, on_round=on_round)
    rows = loop.train_rows
    # examples per round: fixed batches without DP, Poisson batches of that expected size with
    samples = rounds * steps_per_round(rows, cfg) * min(cfg.train.batch_size, rows)
    return {
        "evaluation": loop.evaluation,
        "max_epsilon": loop.max_epsilon,
        "wall_s": loop.timings.total,
        "train_s": loop.timings.train,
        "samples": samples,
        "batch": cfg.train.batch_size,
        "rows": rows,
    }
