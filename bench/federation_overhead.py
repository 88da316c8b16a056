"""Federation overhead: a simulated run's wall time over the same work done in one process.

Both sides run the demo (4 sites, Dirichlet(1.0), 5 rounds, DP at ε=8 unless extra flags
say otherwise) through the same training loop: every round each site trains from the global
adapter (`training.train_round`, with its accountant and label prior carried over), the
adapters are averaged by examples (the coordinator's FedAvg over the sites' replies), and the
global model is evaluated on the held-out set and on every site's validation split. The
simulation does it through Flower (Ray actors with one CPU each, messages, the allow-list,
the ledgers, a checkpoint per round); the in-process loop calls the same functions one site
after another, with torch using every core.

Both are timed as whole commands (each in a fresh Python process: start, imports, the run)
and as runs (the simulation's ServerApp from its start to its summary; the loop from loading
the data to the last evaluation), and split into phases: the simulation's from the
coordinator's audit log (the time each round started, its train and evaluate replies were in,
its checkpoint was written), the loop's from timers around the same steps. Extra arguments go
to `fedhaven simulate` (e.g. --rounds 2); the in-process loop reads the run's config.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from common import Timings, local_rounds, md_table, report, simulate, status

from fedhaven import auditlog
from fedhaven.config import from_flat

GOAL = 1.15  # ServerApp wall time / in-process loop, on the demo
IN_PROCESS = "--in-process"  # internal: run the loop for a config file, write its timings
PHASES = {
    "setup": "set-up (before round 1)",
    "train": "training, all rounds",
    "first_round_extra": "… of which round 1 over the median round",
    "evaluate_sites": "site validation (federated evaluation)",
    "evaluate_global": "held-out evaluation (+ checkpoint in the simulation)",
    "other": "aggregation, adapter save, between phases",
}


def _seconds(entry: dict[str, Any]) -> float:
    return datetime.fromisoformat(entry[auditlog.TIME]).timestamp()


def simulation_phases(run_dir: Path, wall_s: float) -> dict[str, float]:
    """The ServerApp's wall time split by phase, from the coordinator's audit log.

    Each round: training from `round_started` to the last train reply, site validation to
    the last evaluate reply, held-out evaluation and checkpoint to `checkpoint_written`.
    """
    events = auditlog.AuditLog(run_dir / auditlog.AUDIT_FILE).entries()
    by = {e: [x for x in events if x[auditlog.EVENT] == e] for e in auditlog.COORDINATOR_EVENTS}
    replies = [
        x
        for e in (auditlog.REPLY_ACCEPTED, auditlog.REPLY_REJECTED, auditlog.REPLY_FAILED)
        for x in by[e]
    ]
    end = _seconds(by[auditlog.RUN_FINISHED][-1])
    start = end - wall_s
    phases = dict.fromkeys(PHASES, 0.0)
    phases["setup"] = _seconds(by[auditlog.ROUND_STARTED][0]) - start
    train_rounds = []
    for begun in by[auditlog.ROUND_STARTED]:
        r = begun["round"]
        t0 = _seconds(begun)
        t1 = max(_seconds(x) for x in replies if x["round"] == r and x["kind"] == "train")
        evals = [_seconds(x) for x in replies if x["round"] == r and x["kind"] == "evaluate"]
        t2 = max(evals, default=t1)
        t3 = min(_seconds(x) for x in by[auditlog.CHECKPOINT_WRITTEN] if x["round"] == r)
        train_rounds.append(t1 - t0)
        phases["evaluate_sites"] += t2 - t1
        phases["evaluate_global"] += t3 - t2
    phases["train"] = sum(train_rounds)
    phases["first_round_extra"] = _first_round_extra(train_rounds)
    phases["other"] = wall_s - sum(v for k, v in phases.items() if k != "first_round_extra")
    return phases


def _first_round_extra(train_rounds: list[float]) -> float:
    if len(train_rounds) < 2:
        return 0.0
    return train_rounds[0] - statistics.median(train_rounds[1:])


def loop_phases(t: Timings) -> dict[str, float]:
    return {
        "setup": t.setup,
        "train": t.train,
        "first_round_extra": _first_round_extra(t.train_rounds),
        "evaluate_sites": t.evaluate_sites,
        "evaluate_global": t.evaluate_global,
        "other": t.aggregate,
    }


def in_process_command(flat: dict[str, Any], tmp: Path) -> tuple[float, Timings, float]:
    """The loop as a whole command, in a fresh Python process like `fedhaven simulate`:
    its wall time, its phase timings and its final held-out macro-F1."""
    config, result = tmp / "config.json", tmp / "loop.json"
    config.write_text(json.dumps(flat))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, IN_PROCESS, str(config), str(result)], check=True)
    command_s = time.perf_counter() - t0
    out = json.loads(result.read_text())
    return command_s, Timings(**out["timings"]), out["macro_f1"]


def _in_process_main(config: str, result: str) -> None:
    cfg = from_flat(json.loads(Path(config).read_text()))

    def on_round(r: int) -> None:
        status(f"federation overhead: in-process round {r}/{cfg.federation.rounds} done")

    loop = local_rounds(cfg, on_round=on_round)
    out = {"timings": asdict(loop.timings), "macro_f1": loop.evaluation["macro_f1"]}
    Path(result).write_text(json.dumps(out))


def main() -> None:
    if sys.argv[1:2] == [IN_PROCESS]:
        _in_process_main(*sys.argv[2:4])
        return
    import torch

    extra = sys.argv[1:]
    run = simulate("federation overhead: simulated run", extra)
    sim = simulation_phases(run.run_dir, run.summary["wall_s"])
    with tempfile.TemporaryDirectory() as tmp:
        loop_command_s, timings, loop_f1 = in_process_command(run.summary["config"], Path(tmp))
    loop = loop_phases(timings)
    sim_wall, loop_wall = run.summary["wall_s"], timings.total
    rows = [
        [label, f"{sim[k]:.1f}", f"{loop[k]:.1f}", f"{sim[k] - loop[k]:+.1f}"]
        for k, label in PHASES.items()
    ]
    rows += [
        ["**run** (ServerApp / loop)", f"{sim_wall:.1f}", f"{loop_wall:.1f}",
         f"{sim_wall - loop_wall:+.1f}"],
        ["**whole command** (Python start, imports, Ray, run, report)", f"{run.command_s:.1f}",
         f"{loop_command_s:.1f}", f"{run.command_s - loop_command_s:+.1f}"],
        ["held-out macro-F1", f"{run.summary['global']['macro_f1']:.3f}", f"{loop_f1:.3f}", ""],
    ]  # fmt: skip
    table = md_table(["phase", "simulated s", "in one process s", "difference s"], rows)
    ratio, command_ratio = sim_wall / loop_wall, run.command_s / loop_command_s
    notes = [
        f"\ntorch threads in process: {torch.get_num_threads()}",
        f"overhead: run {ratio:.2f}, whole command {command_ratio:.2f} (goal <= {GOAL})",
    ]
    report(
        "federation_overhead",
        table,
        notes,
        ratio=ratio,
        command_ratio=command_ratio,
        goal=GOAL,
        simulated={"phases": sim, "wall_s": sim_wall, "command_s": run.command_s},
        in_process={"phases": loop, "wall_s": loop_wall, "command_s": loop_command_s},
        macro_f1={"simulated": run.summary["global"]["macro_f1"], "in_process": loop_f1},
        rounds=run.summary["rounds"],
        sites=len(run.summary["sites"]),
        shared_run=run.shared,
        args=extra,
    )


if __name__ == "__main__":
    main()
