"""What DP buys against an attacker: loss-threshold membership inference on the demo.

Runs `fedhaven simulate` (defaults: 4 sites, Dirichlet(1.0), MiniLM + LoRA, 5 rounds) with
--no-dp, at ε=8 (the default) and at ε=1, each in its own process, then audits each run's
final model with `fedhaven.audit.audit` (members: site 0's training rows; non-members:
label-matched held-out rows) and prints a markdown table. Extra arguments go to every
simulate run (e.g. --rounds 3).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedhaven.audit import audit

RUNS = {"no DP": ["--no-dp"], "DP ε=8": [], "DP ε=1": ["--epsilon", "1"]}


def simulate(out: Path, extra: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "fedhaven.cli", "simulate", "--out", str(out), *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    extra = sys.argv[1:]
    rows, timings = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, args) in enumerate(RUNS.items()):
            out = Path(tmp, f"run{i}")
            t0 = time.perf_counter()
            summary = simulate(out, [*extra, *args])
            t1 = time.perf_counter()
            rows.append((name, summary, audit(out)))
            timings.append(
                f"{name}: simulate {t1 - t0:.0f} s, audit {time.perf_counter() - t1:.0f} s"
            )
    print("| run | AUC [95% CI] | members/non-members | global accuracy | macro-F1 | max site ε |")
    print("|---|---|---|---|---|---|")
    for name, s, a in rows:
        eps = "-" if s["max_epsilon"] is None else f"{s['max_epsilon']:.2f}"
        cells = [
            name,
            f"{a['auc']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}]",
            f"{a['members']}/{a['non_members']}",
            f"{s['global']['accuracy']:.3f}",
            f"{s['global']['macro_f1']:.3f}",
            eps,
        ]
        print("| " + " | ".join(cells) + " |")
    print("\n" + "; ".join(timings))


if __name__ == "__main__":
    main()
