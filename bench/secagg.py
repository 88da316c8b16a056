"""Secure aggregation: what Flower's SecAgg+ costs the demo, in wall time and bytes.

The demo (`fedhaven simulate`, its defaults: MiniLM-L6 + LoRA, 4 sites, DP at ε=8) for a
few rounds with and without ``federation.secure-aggregation``; extra arguments go to both
runs (default ``--set federation.rounds=2``). Wall time: the run's summary (ServerApp start
to summary). Bytes: each round's train phase as metrics.jsonl records it — without SecAgg+
the adapter tensors sent to the sites and received from them (``ArrayRecord`` payload);
with it the serialised content (protobuf) of every message of its four stages: keys,
encrypted shares, the fit instructions and the masked vectors, both ways.
"""

from __future__ import annotations

import json
import sys

from common import md_table, report, simulate

from fedhaven.run_record import METRICS_FILE

SECURE = "federation.secure-aggregation=true"


def _measure(label: str, args: list[str]) -> dict[str, float]:
    run = simulate(label, args)
    lines = [json.loads(x) for x in (run.run_dir / METRICS_FILE).read_text().splitlines()]
    rounds = len(lines)
    return {
        "rounds": rounds,
        "wall_s": float(run.summary["wall_s"]),
        "sent_per_round": sum(x["bytes_sent"] for x in lines) / rounds,
        "received_per_round": sum(x["bytes_received"] for x in lines) / rounds,
        "macro_f1": float(run.summary["global"].get("macro_f1", float("nan"))),
    }


def main() -> None:
    extra = sys.argv[1:] or ["--set", "federation.rounds=2"]
    plain = _measure("secagg: plain", extra)
    secure = _measure("secagg: SecAgg+", [*extra, "--set", SECURE])
    rows = [
        [
            name,
            f"{m['wall_s']:.1f}",
            f"{m['sent_per_round']:,.0f}",
            f"{m['received_per_round']:,.0f}",
            f"{m['macro_f1']:.3f}",
        ]
        for name, m in (("plain", plain), ("SecAgg+", secure))
    ]
    rows.append(
        [
            "ratio",
            f"{secure['wall_s'] / plain['wall_s']:.2f}×",
            f"{secure['sent_per_round'] / plain['sent_per_round']:.2f}×",
            f"{secure['received_per_round'] / plain['received_per_round']:.2f}×",
            "",
        ]
    )
    header = [
        "aggregation",
        "wall s",
        "bytes to sites / round",
        "bytes from sites / round",
        "macro-F1",
    ]
    notes = [f"{plain['rounds']} rounds, `fedhaven simulate {' '.join(extra)}`"]
    report("secagg", md_table(header, rows), notes, plain=plain, secure=secure)


if __name__ == "__main__":
    main()
