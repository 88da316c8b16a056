"""DP overhead: median step time of DP-LoRA over non-DP LoRA, one process, default model.

Batch 32, sequence 128, the default LoRA settings, through fedhaven's own training loop
(one round of N steps each, timed per step after warm-up). Prints a table and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch

from fedhaven import data as fdata
from fedhaven.config import from_flat
from fedhaven.models import build_model, load_tokenizer
from fedhaven.training import train_round

warnings.filterwarnings("ignore")


def step_times(dp: bool, steps: int, batch: int, seq: int, layers: str) -> list[float]:
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
    rows = fdata.load(cfg.data.path, cfg.data).select(range(batch * 4))
    ds = fdata.tokenize(rows, load_tokenizer(cfg.model.path), seq)
    # DP: fixed batches (no Poisson) so both paths see exactly `batch` rows per step
    res = train_round(build_model(cfg), ds, cfg, poisson_sampling=False)
    return res.step_seconds[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lora-layers", default="-1", help='LoRA layers ("": all; default: last)')
    a = ap.parse_args()
    # Interleave the two so machine noise hits both alike.
    plain, dp = [], []
    for _ in range(2):
        plain += step_times(False, a.steps // 2, a.batch, a.seq, a.lora_layers)
        dp += step_times(True, a.steps // 2, a.batch, a.seq, a.lora_layers)
    mp, md = statistics.median(plain), statistics.median(dp)
    print(
        f"threads {torch.get_num_threads()}  batch {a.batch}  seq {a.seq}  steps {len(plain)} each"
    )
    print("| path | median step s | samples/s |\n|---|---|---|")
    print(f"| LoRA | {mp:.3f} | {a.batch / mp:.1f} |")
    print(f"| DP-LoRA | {md:.3f} | {a.batch / md:.1f} |")
    print(f"DP / non-DP step time ratio: {md / mp:.2f}")


if __name__ == "__main__":
    main()
