"""The benchmark suite: every script in bench/, one after another, then BENCHMARKS.md.

    python bench/suite.py            # the full suite (`make bench`): rewrites BENCHMARKS.md
    python bench/suite.py --quick    # a smoke run on tiny settings: runs/bench-quick/BENCHMARKS.md
    python bench/suite.py --only demo,utility   # some scripts again, then the file again
    python bench/suite.py --render   # the file again from the last results, running nothing
    python bench/suite.py --only presets,strategies   # the long benchmarks, run separately
    python bench/suite.py --only strategies --args="--partitions iid --privacy off"  # a slice

Each script runs in its own process (its memory and threads its own), prints its table and
writes its results as JSON (bench/common.py). The scripts share their `fedhaven simulate`
runs: the demo's runs are the ones the privacy audit attacks and the federation-overhead and
utility benchmarks compare with. The report is bench/BENCHMARKS.template.md with the
numbers, and the judgements that depend on them, filled in (bench/render.py). A quick run
never touches BENCHMARKS.md.

Two benchmarks take longer than the suite's half hour on their own (the presets' two demos,
and the aggregation rules' grid of 10-site federations): they are *separate*. A full pass
skips them and keeps their last results, which the report shows with their own date; `--only`
runs them. Their results live in bench/results/, kept in git, so that `make bench` on a fresh
clone still reports them (a quick run keeps its own).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from common import RESULTS_ENV, RUNS_ENV, STATUS_PREFIX
from render import machine, render
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
REPORT = ROOT / "BENCHMARKS.md"
RUN_FILE = "suite.json"  # the suite's own record: settings, per-script times and outcomes
KEPT = BENCH / "results"  # the separate benchmarks' results and record entries (in git)


@dataclass(frozen=True)
class Bench:
    name: str
    args: list[str] = field(default_factory=list)
    #: not in a full pass (too long for its half hour): run with --only, results kept
    separate: bool = False


#: The aggregation rules measured by `--only strategies`: every rule at ε=8 on Dirichlet(0.5),
#: the hostile-site table for the robust rules (bench/strategies.py).
STRATEGIES_SLICE = ["--partitions", "dirichlet:0.5", "--privacy", "8", "--hostile"]
#: The full suite's settings, chosen to fit 30 minutes on a 2-core CPU box (BENCHMARKS.md
#: says what each one costs). The demo runs are the defaults: 4 sites, 5 rounds.
#: presets: about 13 min; strategies: about 2 min per 10-site run (the slice below: 12 runs
#: and a centralized one).
FULL = [
    Bench("dp_overhead", ["--steps", "10"]),
    Bench("demo"),
    Bench("privacy_audit"),
    Bench("federation_overhead"),
    Bench("utility"),
    Bench("communication"),
    Bench("scale", ["--sizes", "10,100,1000"]),
    Bench("gpu", ["--", "--steps", "10"]),
    Bench("presets", separate=True),
    Bench("strategies", STRATEGIES_SLICE, separate=True),
    Bench("sets", separate=True),
]
#: Shared by every simulate run of a quick suite (so that they are shared between scripts).
TINY = ["--rounds", "2", "--set", "model.max-length=16"]
QUICK = [
    Bench("dp_overhead", ["--steps", "2", "--seq", "16", "--lora-layers", "-1"]),
    Bench("demo", TINY),
    Bench("privacy_audit", TINY),
    Bench("federation_overhead", TINY),
    Bench("utility", TINY),
    Bench("communication"),
    Bench("scale", ["--sizes", "10", "--set", "model.max-length=16"]),
    Bench("presets", ["--only", "digits", "--rounds", "1"]),
    Bench("gpu", ["--rounds", "1", "--", "--steps", "2", "--seq", "16"]),
]


def run_one(bench: Bench, env: dict[str, str], log: Path, progress: Progress, task: int) -> int:
    """Run one script, its output to ``log``, its status lines to the progress display."""
    cmd = [sys.executable, str(BENCH / f"{bench.name}.py"), *bench.args]
    with log.open("w") as f:
        f.write("$ " + " ".join(cmd[1:]) + "\n")
        with subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(STATUS_PREFIX):
                    text = line[len(STATUS_PREFIX) :].strip()
                    progress.update(task, description=f"[bold]{bench.name}[/bold]  {text}")
                f.write(line)
                f.flush()
    return proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny settings; never BENCHMARKS.md")
    ap.add_argument("--only", help="comma-separated script names to run (others: last results)")
    ap.add_argument("--render", action="store_true", help="only rewrite the report")
    ap.add_argument("--args", help="with --only NAME: that script's arguments, not the suite's")
    a = ap.parse_args()
    suite = QUICK if a.quick else FULL
    folder = ROOT / "runs" / ("bench-quick" if a.quick else "bench")
    results, runs = folder / "results", folder / "runs"
    target = folder / "BENCHMARKS.md" if a.quick else REPORT
    kept = results if a.quick else KEPT
    console = Console()
    record_path = folder / RUN_FILE
    names = [b.name for b in suite]
    timed = [b.name for b in suite if not b.separate]
    if a.render:
        if not record_path.is_file():
            sys.exit(f"no results in {folder}: run the suite first")
        record = with_kept(json.loads(record_path.read_text()), kept, names, timed)
        write_report(target, [results, kept], record, a.quick)
        console.print(f"wrote {target.relative_to(ROOT)}", highlight=False)
        return
    only = timed if a.only is None else [n.strip() for n in a.only.split(",")]
    unknown = sorted(set(only) - set(names))
    if unknown:
        sys.exit(f"unknown benchmark {unknown[0]!r}: choose from {', '.join(names)}")
    if a.args is not None:
        if len(only) != 1:
            sys.exit("--args needs --only with exactly one benchmark: give it its own arguments")
        suite = [replace(b, args=a.args.split()) if b.name == only[0] else b for b in suite]
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if a.only is None:  # a full pass starts clean, but for the separate benchmarks' results
        shutil.rmtree(runs, ignore_errors=True)
        for name in timed:
            (results / f"{name}.json").unlink(missing_ok=True)
            (folder / f"{name}.log").unlink(missing_ok=True)
        record = {"scripts": {}}
    record = with_kept(record, kept, names, timed)
    results.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, RESULTS_ENV: str(results), RUNS_ENV: str(runs)}
    # library warnings and load bars would only clutter the logs
    env |= {"PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error"}
    env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    now = datetime.now(UTC).isoformat(timespec="seconds")
    record.setdefault("scripts", {})
    if a.only is None or "date" not in record:
        record.update(quick=a.quick, date=now, machine=machine())
    t_suite = time.perf_counter()
    columns = (
        SpinnerColumn(finished_text="[green]✓"),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    failed = []
    with Progress(*columns, console=console) as progress:
        overall = progress.add_task("[bold]benchmarks[/bold]", total=len(only))
        for bench in (b for b in suite if b.name in only):
            task = progress.add_task(f"[bold]{bench.name}[/bold]  starting", total=1)
            t0 = time.perf_counter()
            own = env | {RESULTS_ENV: str(kept)} if bench.separate else env
            rc = run_one(bench, own, folder / f"{bench.name}.log", progress, task)
            seconds = time.perf_counter() - t0
            record["scripts"][bench.name] = {
                "args": bench.args,
                "seconds": seconds,
                "rc": rc,
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "separate": bench.separate,
            }
            outcome = f"{seconds / 60:.1f} min" if rc == 0 else f"[red]failed (exit {rc})"
            progress.update(task, description=f"[bold]{bench.name}[/bold]  {outcome}", completed=1)
            progress.advance(overall)
            if rc != 0:
                failed.append(bench.name)
    if a.only is None:
        record["suite_seconds"] = time.perf_counter() - t_suite
        record.pop("reruns", None)
    else:  # the timed scripts' times, the reruns' new ones included
        record["suite_seconds"] = sum(
            s["seconds"] for n, s in record["scripts"].items() if n in timed
        )
        if set(only) & set(timed):
            rerun = [n for n in only if n in timed]
            record.setdefault("reruns", []).append({"date": now, "scripts": rerun})
    record["scripts"] = {n: record["scripts"][n] for n in names if n in record["scripts"]}
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    separate = {n: s for n, s in record["scripts"].items() if n not in timed}
    kept.mkdir(parents=True, exist_ok=True)
    (kept / RUN_FILE).write_text(json.dumps(separate, indent=1) + "\n")
    write_report(target, [results, kept], record, a.quick)
    console.print(
        f"wrote {target.relative_to(ROOT)} in {record['suite_seconds'] / 60:.1f} min; "
        f"logs in {folder.relative_to(ROOT)}/",
        highlight=False,
    )
    if failed:
        sys.exit(f"failed: {', '.join(failed)} (see their logs)")


def with_kept(record: dict, kept: Path, names: list[str], timed: list[str]) -> dict:
    """``record`` with the separate benchmarks' entries from ``kept`` (the latest of each)."""
    path = kept / RUN_FILE
    entries = json.loads(path.read_text()) if path.is_file() else {}
    record.setdefault("scripts", {})
    record["scripts"] |= {n: s for n, s in entries.items() if n in names and n not in timed}
    return record


def write_report(target: Path, folders: list[Path], record: dict, quick: bool) -> None:
    data = {
        p.stem: json.loads(p.read_text())
        for folder in folders
        for p in sorted(folder.glob("*.json"))
        if p.name != RUN_FILE
    }
    target.write_text(render(data, record))


if __name__ == "__main__":
    main()
