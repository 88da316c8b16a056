"""Aggregation rules on non-IID sites: strategy × partition × privacy on the drug-review demo.

Each cell is one `fedhaven simulate` run with `--sites 10` (default) and the demo's other
defaults (DP-tuned; `--no-dp` keeps them), the rule set by `federation.strategy`: global
(held-out) accuracy and macro-F1, the worst site's validation accuracy under the final
model, bytes per round (sent + received, mean over rounds) and the sites used per round.
A centralized row per privacy setting trains every site's training rows pooled through the
same loop for the same rounds and steps (bench/common.py: `centralized`).

The whole grid (8 rules × 4 partitions × 2) is about 64 runs, hours on 2 cores: choose a
slice with --rules, --partitions and --privacy; extra arguments go to every run.

    python bench/strategies.py --rules fedavg,ffa --partitions iid,dirichlet:0.1 --privacy 8
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

from common import Run, centralized, md_table, report, simulate

from fedhaven.config import STRATEGIES
from fedhaven.report import METRICS_FILE

PARTITIONS = "iid,dirichlet:1.0,dirichlet:0.5,dirichlet:0.1"
#: flexlora needs sites at ranks of their own (a site setting): its own benchmark
RULES = ",".join(r for r in STRATEGIES if r != "flexlora")


def cell(run: Run) -> dict[str, Any]:
    rounds = [json.loads(x) for x in (run.run_dir / METRICS_FILE).read_text().splitlines()]
    g, sites = run.summary["global"], run.summary["sites"].values()
    return {
        "macro_f1": g["macro_f1"],
        "accuracy": g["accuracy"],
        "worst_site_accuracy": min(s["accuracy"] for s in sites if s.get("accuracy") is not None),
        "bytes_per_round": statistics.mean(r["bytes_sent"] + r["bytes_received"] for r in rounds),
        "sites_used": statistics.mean(r["sites_used"] for r in rounds),
        "max_epsilon": run.summary["max_epsilon"],
        "wall_s": run.summary["wall_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rules", default=RULES)
    ap.add_argument("--partitions", default=PARTITIONS)
    ap.add_argument("--privacy", default="off,8", help="off and/or target ε values")
    ap.add_argument("--sites", default="10")
    a, extra = ap.parse_known_args()
    rows, data = [], []
    for eps in a.privacy.split(","):
        dp = ["--no-dp"] if eps == "off" else ["--epsilon", eps]
        flat = None
        for partition in a.partitions.split(","):
            for rule in a.rules.split(","):
                args = ["--sites", a.sites, "--partition", partition, *dp, *extra]
                args += ["--set", f"federation.strategy={rule}"]
                run = simulate(f"strategies: {rule}, {partition}, ε {eps}", args)
                flat = flat or run.summary["config"]
                c = {"rule": rule, "partition": partition, "epsilon": eps, **cell(run)}
                data.append(c)
                rows.append(
                    [partition, eps, rule, f"{c['macro_f1']:.3f}", f"{c['accuracy']:.3f}",
                     f"{c['worst_site_accuracy']:.3f}", f"{c['bytes_per_round']:,.0f}",
                     f"{c['sites_used']:.1f}"]
                )  # fmt: skip
        assert flat is not None
        central = centralized(flat, f"strategies: centralized, ε {eps}")["evaluation"]
        data.append({"rule": "centralized", "epsilon": eps, **central})
        rows.append(
            ["pooled", eps, "centralized", f"{central['macro_f1']:.3f}",
             f"{central['accuracy']:.3f}", "-", "-", "-"]
        )  # fmt: skip
    header = ["partition", "ε", "rule", "macro-F1", "accuracy", "worst-site accuracy",
              "bytes per round", "sites per round"]  # fmt: skip
    report("strategies", md_table(header, rows), cells=data, args=extra)


if __name__ == "__main__":
    main()
