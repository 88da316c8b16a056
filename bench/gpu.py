"""The DP-overhead and demo benchmarks on a CUDA device, when there is one.

With CUDA: `dp_overhead.py --device cuda` (its own process), then the demo's rounds (4
sites, Dirichlet(1.0), 5 rounds; DP at ε=8 and without DP) in one process on the GPU through
the same loop as the federation-overhead benchmark (`common.local_rounds`): wall time and
held-out macro-F1. Without CUDA it says so, records that it skipped, and exits 0.
Options after ``--`` go to dp_overhead.py (e.g. ``-- --steps 4``); ``--rounds`` sets the
demo's rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from common import NO_DP_RUN, RESULTS_ENV, local_rounds, md_table, report, status

from fedhaven.config import Config

DP_OVERHEAD = str(Path(__file__).with_name("dp_overhead.py"))
NAME = "gpu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=Config().federation.rounds)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # "cpu": a dry run
    ap.add_argument("dp_overhead_args", nargs="*")
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        reason = (
            f"no CUDA device found (torch {torch.__version__}, "
            f"CUDA build: {torch.version.cuda or 'none'}): the GPU benchmarks were skipped"
        )
        print(reason)
        report(NAME, "", skipped=True, reason=reason)
        return
    device_name = torch.cuda.get_device_name(0) if a.device == "cuda" else a.device
    # DP overhead on the device, its own process (its results go to the suite as gpu_dp_overhead)
    subprocess.run(
        [sys.executable, DP_OVERHEAD, "--device", a.device, "--name", f"{NAME}_dp_overhead",
         *a.dp_overhead_args],
        check=True,
    )  # fmt: skip
    overhead = None
    if os.environ.get(RESULTS_ENV):
        path = Path(os.environ[RESULTS_ENV], f"{NAME}_dp_overhead.json")
        overhead = json.loads(path.read_text())
    rows, data = [], []
    for name, dp in (("DP ε=8", True), (NO_DP_RUN, False)):
        cfg = Config().replace(**{"privacy.enabled": dp, "federation.rounds": a.rounds})

        def on_round(r: int, name: str = name) -> None:
            status(f"gpu: demo {name}, round {r}/{a.rounds} done")

        loop = local_rounds(cfg, on_round=on_round, device=a.device)
        ev = loop.evaluation
        rows.append([name, f"{ev['macro_f1']:.3f}", f"{ev['accuracy']:.3f}",
                     f"{loop.timings.total:.1f}"])  # fmt: skip
        data.append({"name": name, "macro_f1": ev["macro_f1"], "accuracy": ev["accuracy"],
                     "wall_s": loop.timings.total})  # fmt: skip
    header = ["demo rounds in one process", "macro-F1", "accuracy", "wall s"]
    report(
        NAME,
        md_table(header, rows),
        [f"\ndevice: {device_name}"],
        skipped=False,
        device=device_name,
        demo=data,
        rounds=a.rounds,
        dp_overhead=overhead,
    )


if __name__ == "__main__":
    main()
