"""Scale: 10, 100 and 1000 simulated sites, ten of them sampled per round.

Each size runs `fedhaven simulate` in its own process (DP on, 2 rounds, IID partition,
fraction-train = fraction-evaluate = 10 / sites) while a sampler adds up the resident memory
of that process and all its children (Ray's workers included) every 0.2 s. The demo's 600
training reviews are too few for 1000 sites with at least two rows each, so the training
file is the demo's rows repeated as often as needed (said in the table). Prints peak memory
of the whole process tree and the seconds per round. Extra arguments go to every run.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from fedhaven.config import Config
from fedhaven.data import read_table

SIZES = (10, 100, 1000)
PER_ROUND = 10


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
        "--sites", str(sites), "--rounds", "2", "--partition", "iid",
        "--data", str(data), "--test", str(test),
        "--set", f"federation.fraction-train={frac}",
        "--set", f"federation.fraction-evaluate={frac}",
        *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    root, peak, done = psutil.Process(proc.pid), 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(root))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if proc.wait() != 0:
        raise SystemExit(f"simulate with {sites} sites failed")
    done.set()
    sampler.join()
    return peak, json.loads((out / "summary.json").read_text())


def main() -> None:
    extra = sys.argv[1:]
    train = read_table(Config().data.path)  # the bundled 600 reviews, as a table
    print("| sites | sampled per round | training rows | peak memory (process tree) GiB "
          "| s per round | macro-F1 |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        test = Path(tmp, "test.csv")
        read_table(Config().data.test_path, split="test").to_pandas().to_csv(test, index=False)
        for sites in SIZES:
            copies = max(1, math.ceil(3 * sites / len(train)))  # >= 3 rows per site
            rows = train.to_pandas()
            data = Path(tmp, f"train-{sites}.csv")
            rows.loc[rows.index.repeat(copies)].to_csv(data, index=False)
            peak, s = run(sites, data, test, Path(tmp, f"run-{sites}"), extra)
            lines = (Path(s["run_dir"]) / "metrics.jsonl").read_text().splitlines()
            walls = [json.loads(x)["wall_s"] for x in lines]
            per_round = (walls[-1] - walls[0]) / max(1, len(walls) - 1)
            print(
                f"| {sites} | {min(sites, PER_ROUND)} | {len(rows) * copies}"
                f"{f' ({copies}× the demo)' if copies > 1 else ''} | {peak / 2**30:.2f} "
                f"| {per_round:.0f} | {s['global']['macro_f1']:.3f} |"
            )


if __name__ == "__main__":
    main()
