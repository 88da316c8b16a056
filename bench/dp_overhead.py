"""DP overhead: median step time of DP-LoRA over non-DP LoRA, one process, default model.

Batch 32, sequence 128, the default LoRA settings (and LoRA on every layer), through
fedhaven's own training loop (one round of N steps each, timed per step after warm-up, the
two paths interleaved). Prints a table and the ratios. ``--device cuda`` runs it on a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch
from common import md_table, report, status

from fedhaven.config import from_flat
from fedhaven.models import build_model
from fedhaven.tasks import get_task
from fedhaven.training import train_round

warnings.filterwarnings("ignore")

GOAL = 1.10  # DP / non-DP step time, default LoRA layers
LAYERS = {"-1": "last (default)", "": "all six"}


def step_times(dp: bool, steps: int, batch: int, seq: int, layers: str, device: str) -> list[float]:
    """Per-step wall times of one round of ``steps`` steps (the first, warm-up, dropped)."""
    cfg = from_flat(
        {
            "privacy.enabled": dp,
            "train.batch-size": batch,
            "model.max-length": seq,
            "train.local-steps": steps + 1,
            "lora.layers": layers,
        }
    )
    task = get_task(cfg)
    ds = task.encode(task.load(cfg.data.path).select(range(batch * 4)))
    # DP: fixed batches (no Poisson) so both paths see exactly `batch` rows per step
    res = train_round(build_model(cfg, device), ds, cfg, poisson_sampling=False)
    return res.step_seconds[1:]


def measure(steps: int, batch: int, seq: int, layers: str, device: str) -> dict[str, float]:
    # Interleave the two so machine noise hits both alike.
    plain: list[float] = []
    dp: list[float] = []
    for rep in range(2):
        status(f"DP overhead: LoRA layers {layers or 'all'}, pass {rep + 1}/2 ({device})")
        plain += step_times(False, steps // 2, batch, seq, layers, device)
        dp += step_times(True, steps // 2, batch, seq, layers, device)
    mp, md = statistics.median(plain), statistics.median(dp)
    return {"plain_s": mp, "dp_s": md, "ratio": md / mp, "steps": len(plain)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per path")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument(
        "--lora-layers",
        action="append",
        help='LoRA layers, repeatable ("": all; default: "-1" (last) and "")',
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--name", default="dp_overhead", help="the results' name under the suite")
    a = ap.parse_args()
    results = []
    for layers in a.lora_layers if a.lora_layers is not None else list(LAYERS):
        m = measure(a.steps, a.batch, a.seq, layers, a.device)
        results.append({"layers": layers, "label": LAYERS.get(layers, layers), **m})
    rows = [
        [
            r["label"],
            f"{r['plain_s']:.3f} ({a.batch / r['plain_s']:.1f} samples/s)",
            f"{r['dp_s']:.3f} ({a.batch / r['dp_s']:.1f} samples/s)",
            f"{r['ratio']:.2f}",
        ]
        for r in results
    ]
    header = ["LoRA layers", "LoRA step s", "DP-LoRA step s", "DP / non-DP"]
    threads = torch.get_num_threads()
    settings = f"device {a.device}, threads {threads}, batch {a.batch}, seq {a.seq}"
    report(
        a.name,
        md_table(header, rows),
        [f"\n{settings}, {a.steps} timed steps per path"],
        results=results,
        goal=GOAL,
        device=a.device,
        threads=threads,
        batch=a.batch,
        seq=a.seq,
        steps=a.steps,
    )


if __name__ == "__main__":
    main()
