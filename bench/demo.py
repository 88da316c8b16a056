"""The default demo with and without DP, side by side: what privacy costs.

Runs `fedhaven simulate` (defaults: 4 sites, Dirichlet(1.0), MiniLM + LoRA, 5 rounds) with
DP at ε=8, with --no-dp, and with the no-DP preset, each in its own process, and prints a
table from their summary.json files. Extra arguments go to every run (e.g. --rounds 3).
"""

from __future__ import annotations

import sys

from common import PRESET, majority_baseline, md_table, report, simulate, trajectory

from fedhaven.config import from_flat

RUNS = {
    "DP ε=8": [],
    "no DP (same defaults)": ["--no-dp"],
    "no DP (presets/no-dp.toml)": ["--config", PRESET],
}


def main() -> None:
    extra = sys.argv[1:]
    runs = {name: simulate(f"demo: {name}", [*extra, *args]) for name, args in RUNS.items()}
    rows, data = [], []
    for name, run in runs.items():
        s = run.summary
        g = s["global"]
        eps = "-" if s["max_epsilon"] is None else f"{s['max_epsilon']:.2f}"
        pc = " / ".join(f"{f:.2f}" for f in g["per_class_f1"])
        rows.append(
            [name, f"{g['macro_f1']:.3f}", f"{g['accuracy']:.3f}", pc, eps, f"{s['wall_s']:.0f}",
             f"{run.command_s:.0f}"]
        )  # fmt: skip
        data.append(
            {
                "name": name,
                "macro_f1": g["macro_f1"],
                "accuracy": g["accuracy"],
                "per_class_f1": g["per_class_f1"],
                "max_epsilon": s["max_epsilon"],
                "wall_s": s["wall_s"],
                "command_s": run.command_s,
                "rounds": s["rounds"],
                "trajectory": trajectory(run),
                "shared": run.shared,
            }
        )
    header = ["run", "macro-F1", "accuracy", "per-class F1", "max site ε", "run s", "command s"]
    cfg = from_flat(runs["DP ε=8"].summary["config"])
    majority = majority_baseline(cfg)
    report(
        "demo",
        md_table(header, rows),
        [
            f"\nalways answering {majority['label']!r}: accuracy {majority['accuracy']:.3f}, "
            f"macro-F1 {majority['macro_f1']:.3f}"
        ],
        runs=data,
        majority=majority,
        labels=runs["DP ε=8"].summary["labels"],
        sites=cfg.federation.sites,
        rounds=cfg.federation.rounds,
        partition=cfg.data.partition,
        args=extra,
    )


if __name__ == "__main__":
    main()
