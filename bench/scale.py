"""Scale: 10, 100 and 1000 simulated sites, ten of them sampled per round.

Each size runs `fedhaven simulate` in its own process (DP on, 2 rounds, IID partition,
fraction-train = fraction-evaluate = 10 / sites) while a sampler adds up the resident memory
of that process and all its children (Ray's workers included) every 0.2 s. The demo's 600
training reviews are too few for 1000 sites with at least three rows each, so the training
file is the demo's rows repeated as often as needed (said in the table), each copy's
reviews ending in "copy K": the sites' data checks drop duplicate texts. Prints peak memory
of the whole process tree and the seconds per round. ``--sizes`` picks the site counts;
other arguments go to every run.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
from common import md_table, report, status

from fedhaven.config import Config
from fedhaven.data import read_table

SIZES = (10, 100, 1000)
PER_ROUND = 10
ROUNDS = 2  # seconds per round: the mean gap between the rounds' ends
GOAL_SITES, GOAL_GIB = 100, 4.0


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:  # a worker that just exited
            pass
    return total


def run(sites: int, data: Path, test: Path, out: Path, extra: list[str]) -> tuple[int, dict]:
    frac = min(1.0, PER_ROUND / sites)
    cmd = [
        sys.executable, "-m", "fedhaven.cli", "simulate", "--out", str(out),
        "--sites", str(sites), "--rounds", str(ROUNDS), "--partition", "iid",
        "--data", str(data), "--test", str(test),
        "--set", f"federation.fraction-train={frac}",
        "--set", f"federation.fraction-evaluate={frac}",
        *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    root, peak, done = psutil.Process(proc.pid), 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(root))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    assert proc.stdout is not None
    for line in proc.stdout:
        words = line.split()
        if words[:1] == ["round"] and len(words) > 2:
            status(f"scale: {sites} sites, round {words[1]}/{ROUNDS} done, {words[2]}")
    if proc.wait() != 0:
        raise SystemExit(f"simulate with {sites} sites failed")
    done.set()
    sampler.join()
    return peak, json.loads((out / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="site counts, e.g. 10,100")
    a, extra = ap.parse_known_args()
    sizes = [int(x) for x in a.sizes.split(",")]
    train = read_table(Config().data.path)  # the bundled 600 reviews, as a table
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        test = Path(tmp, "test.csv")
        read_table(Config().data.test_path, split="test").to_pandas().to_csv(test, index=False)
        for sites in sizes:
            status(f"scale: {sites} sites, starting")
            copies = max(1, math.ceil(3 * sites / len(train)))  # >= 3 rows per site
            table = train.to_pandas()
            data = Path(tmp, f"train-{sites}.csv")
            text = Config().data.text_column
            marked = [
                table.assign(**{text: table[text] + f" copy {k}"}) for k in range(2, copies + 1)
            ]
            pd.concat([table, *marked]).to_csv(data, index=False)
            peak, s = run(sites, data, test, Path(tmp, f"run-{sites}"), extra)
            lines = (Path(s["run_dir"]) / "metrics.jsonl").read_text().splitlines()
            walls = [json.loads(x)["wall_s"] for x in lines]
            per_round = (walls[-1] - walls[0]) / max(1, len(walls) - 1)
            n_rows = len(table) * copies
            rows.append(
                [sites, min(sites, PER_ROUND),
                 f"{n_rows}" + (f" ({copies}× the demo)" if copies > 1 else ""),
                 f"{peak / 2**30:.2f}", f"{per_round:.0f}", f"{s['global']['macro_f1']:.3f}"]
            )  # fmt: skip
            results.append(
                {"sites": sites, "sampled": min(sites, PER_ROUND), "rows": n_rows,
                 "copies": copies, "peak_gib": peak / 2**30, "s_per_round": per_round,
                 "macro_f1": s["global"]["macro_f1"]}
            )  # fmt: skip
    header = ["sites", "sampled per round", "training rows",
              "peak memory (process tree) GiB", "s per round", "macro-F1"]  # fmt: skip
    goal = {"sites": GOAL_SITES, "gib": GOAL_GIB}
    report("scale", md_table(header, rows), results=results, rounds=ROUNDS,
           per_round=PER_ROUND, goal=goal, args=extra)  # fmt: skip


if __name__ == "__main__":
    main()
