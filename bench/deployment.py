"""Deployment cost: the demo deployed on loopback against the same demo simulated, in one run.

The deployed side is what an operator runs: `fedhaven certs`, `fedhaven coordinator` (a
SuperLink with TLS and site authentication) and one `fedhaven site` per site (a SuperNode,
each its own process tree), the run started with the `flwr run` line the coordinator
prints. Each site's file holds exactly the rows the simulation gives that site. The
simulated side is `fedhaven simulate` with the same flags (the suite's demo run, if any).

Per training message, each site's audit log says where the time went (its `sent` event):
how long its process had run before the handler was entered (interpreter, imports, the
ClientApp's loading), the handler's time, and the training's. A message's overhead is
everything but the training, from the round's start at the coordinator to the reply leaving
the site. Sites run warm by default; ``--cold`` adds the same deployment with
``fedhaven site --cold-start`` (a new interpreter per message, as Flower starts it).
Extra arguments go to both runs' config (e.g. ``--rounds 2``). On one box the
sites share its cores: each runs ``cores // sites`` torch threads (at least one).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from common import md_table, report, simulate, status

from fedhaven import auditlog
from fedhaven.deploy.warm import READY as WARM_READY
from fedhaven.run_record import SUMMARY_FILE

FEDHAVEN = [sys.executable, "-m", "fedhaven.cli"]
OVERHEAD_GOAL_S = 3.0  # a site's per-message overhead, demo model
WALL_GOAL = 1.3  # deployed wall / simulated wall
RUN_LINE = "start a run from anywhere with:\n"
COORDINATOR_READY = "Ctrl-C stops the coordinator"
TIMEOUT_S = 1800


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _seconds(entry: dict[str, Any]) -> float:
    return datetime.fromisoformat(entry[auditlog.TIME]).timestamp()


def _wait_for(log: Path, text: str, proc: subprocess.Popen[bytes], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        content = log.read_text(errors="replace") if log.exists() else ""
        if text in content:
            return content
        if proc.poll() is not None:
            raise SystemExit(f"{log.stem} exited with {proc.returncode}:\n{content[-3000:]}")
        time.sleep(0.25)
    raise SystemExit(f"{log.stem} did not print {text!r} within {timeout_s:g} s")


def write_site_files(flat: dict[str, Any], folder: Path) -> list[Path]:
    """Each simulated site's rows (its training and validation rows) as its own CSV."""
    from fedhaven import data as fdata
    from fedhaven.config import from_flat
    from fedhaven.tasks import get_task

    cfg = from_flat(flat)
    full = get_task(cfg).load(cfg.data.path)
    columns = [cfg.data.text_column, cfg.data.label_column]
    files = []
    for k, idx in enumerate(fdata.partition(full, cfg.data, cfg.federation.sites, cfg.train.seed)):
        path = folder / f"site-{k}.csv"
        full.select(idx).select_columns(columns).to_csv(str(path), index=False)
        files.append(path)
    return files


class Deployment:
    """The coordinator and the sites as real processes, each its own process group."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "FLWR_TELEMETRY_ENABLED": "0"}
        self.env.pop("FLWR_HOME", None)

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Path:
        log = self.root / f"{name}.log"
        with log.open("ab") as f:
            self.procs[name] = subprocess.Popen(
                args,
                cwd=self.root,
                env=env or self.env,
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return log

    def stop(self) -> None:
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        for proc in self.procs.values():
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def deployed_run(
    flat: dict[str, Any], files: list[Path], root: Path, *, cold: bool
) -> tuple[dict[str, Any], Path, list[Path], float]:
    """One deployed run: its summary, run dir, the sites' state dirs, and the whole
    command's seconds (the `flwr run` submission to its end)."""
    subprocess.run([*FEDHAVEN, "certs", "init", str(root / "pki")], check=True, capture_output=True)
    names = [f.stem for f in files]
    for name in names:
        subprocess.run(
            [*FEDHAVEN, "certs", "site", name, str(root / "keys")], check=True, capture_output=True
        )
    dep = Deployment(root)
    port = _free_port()
    try:
        flags = ["--certs", "pki", "--state", "coordinator", "--sites", "keys", "--port", str(port)]
        coordinator = dep.start("coordinator", [*FEDHAVEN, "coordinator", *flags])
        run_line = (
            _wait_for(coordinator, COORDINATOR_READY, dep.procs["coordinator"], 180)
            .split(RUN_LINE, 1)[1]
            .splitlines()[0]
        )
        states = []
        # One box stands in for a machine per site: the sites share its cores, as the
        # simulation's actors do (Ray gives each its site-cpus), instead of each running as
        # many torch threads as the box has cores.
        threads = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // len(names)))}
        for name, data in zip(names, files, strict=True):
            states.append(root / f"state-{name}")
            flags = ["--coordinator", f"127.0.0.1:{port}", "--certs", "pki/ca.crt"]
            flags += ["--key", f"keys/{name}.key", "--data", str(data), "--state", str(states[-1])]
            flags += ["--port", str(_free_port()), *(["--cold-start"] if cold else [])]
            dep.start(name, [*FEDHAVEN, "site", *flags], {**dep.env, **threads})
        for name in names:
            _wait_for(root / f"{name}.log", "SuperNode ID:", dep.procs[name], 300)
            if not cold:
                _wait_for(root / f"{name}.log", WARM_READY, dep.procs[name], 300)
        run_dir = root / "run"
        assignment, *command = shlex.split(run_line)
        key, _, value = assignment.partition("=")
        config = {**flat, "federation.out-dir": str(run_dir)}
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
        status(f"deployed ({'cold' if cold else 'warm'}): run started")
        t0 = time.perf_counter()
        done = subprocess.run(
            [*command, "--run-config", overrides],
            cwd=root,
            env={**dep.env, key: value},
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        if done.returncode != 0:
            raise SystemExit(f"flwr run failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        summary_path = run_dir / SUMMARY_FILE
        while not summary_path.is_file():  # `flwr run` returns once the run is submitted
            if time.perf_counter() - t0 > TIMEOUT_S:
                raise SystemExit("the deployed run wrote no summary in time")
            time.sleep(1.0)
        command_s = time.perf_counter() - t0
        return json.loads(summary_path.read_text()), run_dir, states, command_s
    finally:
        dep.stop()


def message_overheads(run_dir: Path, states: list[Path]) -> list[dict[str, float]]:
    """Per training message: from the round's start at the coordinator to the reply leaving
    the site, split into waiting for the process, the process's start, the handler, training."""
    started = {
        int(e["round"]): _seconds(e)
        for e in auditlog.AuditLog(run_dir / auditlog.AUDIT_FILE).entries(auditlog.ROUND_STARTED)
    }
    out = []
    for state in states:
        for e in auditlog.AuditLog(state / auditlog.AUDIT_FILE).entries(auditlog.SENT):
            t = e[auditlog.TIMINGS]
            total = _seconds(e) - started[int(e["round"])]
            out.append(
                {
                    "total_s": total,
                    "waiting_s": total - t[auditlog.PROCESS_S] - t[auditlog.HANDLER_S],
                    "process_s": t[auditlog.PROCESS_S],
                    "handler_s": t[auditlog.HANDLER_S],
                    "train_s": t[auditlog.TRAIN_S],
                    "overhead_s": total - t[auditlog.TRAIN_S],
                }
            )
    return out


def _median(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cold", action="store_true", help="also deploy with --cold-start sites")
    a, extra = ap.parse_known_args()
    sim = simulate("deployment: simulated run", extra)
    flat = sim.summary["config"]
    cells: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="fh-dep-") as tmp:
        files = write_site_files(flat, Path(tmp))
        for cold in [False, True] if a.cold else [False]:
            label = "cold" if cold else "warm"
            root = Path(tmp) / label
            root.mkdir()
            summary, run_dir, states, command_s = deployed_run(flat, files, root, cold=cold)
            msgs = message_overheads(run_dir, states)
            cells[label] = {
                "wall_s": summary["wall_s"],
                "command_s": command_s,
                "macro_f1": summary["global"].get("macro_f1"),
                "messages": len(msgs),
                **{k: _median(msgs, k) for k in msgs[0]},
            }
            status(f"deployed ({label}): {summary['wall_s']:.0f} s")
            shutil.rmtree(root, ignore_errors=True)
    sim_wall = sim.summary["wall_s"]
    header = ["", "wall s", "÷ simulated", "held-out macro-F1", "per training message (median s)"]
    sim_f1 = sim.summary["global"]["macro_f1"]
    rows = [["simulated", f"{sim_wall:.1f}", "1.00", f"{sim_f1:.3f}", ""]]
    for label, c in cells.items():
        split = (
            f"overhead {c['overhead_s']:.1f} = waiting {c['waiting_s']:.1f} + process start "
            f"{c['process_s']:.1f} + handler {c['handler_s'] - c['train_s']:.1f}; "
            f"training {c['train_s']:.1f}"
        )
        ratio = c["wall_s"] / sim_wall
        rows.append(
            [
                f"deployed, {label} sites",
                f"{c['wall_s']:.1f}",
                f"{ratio:.2f}",
                f"{c['macro_f1']:.3f}",
                split,
            ]
        )
    warm = cells["warm"]
    notes = [
        f"\nper-message overhead (warm, median of {warm['messages']}): "
        f"{warm['overhead_s']:.1f} s (goal <= {OVERHEAD_GOAL_S:g} s); deployed / simulated "
        f"wall: {warm['wall_s'] / sim_wall:.2f} (goal <= {WALL_GOAL:g})"
    ]
    report(
        "deployment",
        md_table(header, rows),
        notes,
        simulated={"wall_s": sim_wall, "command_s": sim.command_s},
        deployed=cells,
        ratio=warm["wall_s"] / sim_wall,
        overhead_s=warm["overhead_s"],
        goals={"overhead_s": OVERHEAD_GOAL_S, "ratio": WALL_GOAL},
        args=extra,
    )


if __name__ == "__main__":
    main()
