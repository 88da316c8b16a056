"""The default demo with and without DP, side by side: what privacy costs.

Runs `fedhaven simulate` (defaults: 4 sites, Dirichlet(1.0), MiniLM + LoRA, 5 rounds) with
DP at ε=8, with --no-dp, and with the no-DP preset, each in its own process, and prints a
table from their summary.json files. Extra arguments go to every run (e.g. --rounds 3).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

PRESET = str(Path(__file__).resolve().parents[1] / "presets" / "no-dp.toml")


def run(out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "fedhaven.cli", "simulate", "--out", str(out), *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    extra = sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            ("DP ε=8", run(Path(tmp, "dp"), extra)),
            ("no DP (same defaults)", run(Path(tmp, "nodp"), [*extra, "--no-dp"])),
            ("no DP (presets/no-dp.toml)", run(Path(tmp, "preset"), [*extra, "--config", PRESET])),
        ]
    print("| run | macro-F1 | accuracy | per-class F1 | max site ε | wall s |")
    print("|---|---|---|---|---|---|")
    for name, s in rows:
        g = s["global"]
        pc = " / ".join(f"{f:.2f}" for f in g["per_class_f1"])
        eps = "-" if s["max_epsilon"] is None else f"{s['max_epsilon']:.2f}"
        cells = [
            name,
            f"{g['macro_f1']:.3f}",
            f"{g['accuracy']:.3f}",
            pc,
            eps,
            f"{s['wall_s']:.0f}",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
