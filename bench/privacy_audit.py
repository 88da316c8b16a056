"""What DP buys against an attacker: loss-threshold membership inference on the demo.

Runs `fedhaven simulate` (defaults: 4 sites, Dirichlet(1.0), MiniLM + LoRA, 5 rounds) with
--no-dp, at ε=8 (the default) and at ε=1, each in its own process, then audits each run's
final model with `fedhaven.audit.audit` (members: site 0's training rows; non-members:
label-matched held-out rows) and prints a markdown table. Extra arguments go to every
simulate run (e.g. --rounds 3).
"""

from __future__ import annotations

import sys
import time

from common import DEMO_RUNS, DP_RUN, NO_DP_RUN, md_table, report, simulate, status

from fedhaven.audit import audit

RUNS = {"no DP": DEMO_RUNS[NO_DP_RUN], "DP ε=8": DEMO_RUNS[DP_RUN], "DP ε=1": ["--epsilon", "1"]}
GOAL = 0.55  # attack AUC at ε=8


def main() -> None:
    extra = sys.argv[1:]
    rows, data = [], []
    for name, args in RUNS.items():
        run = simulate(f"privacy audit: {name}", [*extra, *args])
        status(f"privacy audit: attacking {name}")
        t0 = time.perf_counter()
        a = audit(run.run_dir)
        audit_s = time.perf_counter() - t0
        s = run.summary
        eps = "-" if s["max_epsilon"] is None else f"{s['max_epsilon']:.2f}"
        rows.append(
            [
                name,
                f"{a['auc']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}]",
                f"{a['members']} / {a['non_members']}",
                f"{s['global']['accuracy']:.3f}",
                f"{s['global']['macro_f1']:.3f}",
                eps,
            ]
        )
        data.append(
            {
                "name": name,
                **{k: a[k] for k in ("auc", "ci_low", "ci_high", "members", "non_members")},
                "bootstrap": a["bootstrap"],
                "accuracy": s["global"]["accuracy"],
                "macro_f1": s["global"]["macro_f1"],
                "max_epsilon": s["max_epsilon"],
                "simulate_s": run.command_s,
                "audit_s": audit_s,
                "shared": run.shared,
            }
        )
    header = ["run", "attack AUC [95% CI]", "members / non-members", "global accuracy",
              "macro-F1", "max site ε"]  # fmt: skip
    timings = "; ".join(
        f"{d['name']}: simulate {d['simulate_s']:.0f} s, audit {d['audit_s']:.0f} s" for d in data
    )
    report("privacy_audit", md_table(header, rows), ["\n" + timings], runs=data, goal=GOAL,
           args=extra)  # fmt: skip


if __name__ == "__main__":
    main()
