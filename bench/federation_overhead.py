"""Federation overhead: a simulated run's wall time over the same work done in one process.

Both sides run the demo (4 sites, Dirichlet(1.0), 5 rounds, DP at ε=8 unless extra flags
say otherwise) through the same training loop: every round each site trains from the global
adapter (`training.train_round`, with its accountant and label prior carried over), the
adapters are averaged by examples, and the global model is evaluated on the held-out set and
on every site's validation split. The simulation does it through Flower (Ray actors with one
CPU each, messages, the allow-list, the ledgers); the in-process loop calls the same
functions one site after another, with torch using every core. Extra arguments go to
`fedhaven simulate` (e.g. --rounds 2); the in-process loop reads the same config.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from torch.utils.data import TensorDataset

from fedhaven import data as fdata
from fedhaven.config import Config, from_flat
from fedhaven.models import adapter_state, build_model, load_tokenizer, set_adapter_state
from fedhaven.training import evaluate, train_round


def simulated(out: Path, extra: list[str]) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "fedhaven.cli", "simulate", "--out", str(out), *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0, json.loads((out / "summary.json").read_text())


def in_process(cfg: Config) -> tuple[float, float]:
    """Wall seconds of the same rounds in this process, and the final macro-F1."""
    t0 = time.perf_counter()
    tok = load_tokenizer(cfg.model.path)
    full = fdata.load(cfg.data.path, cfg.data)
    n = cfg.federation.sites

    def tokenize(ds: Dataset) -> TensorDataset:
        return fdata.tokenize(ds, tok, cfg.model.max_length)

    sites = [
        (tokenize(tr), tokenize(va))
        for tr, va in fdata.simulated_sites(full, cfg.data, n, cfg.train.seed)
    ]
    test = tokenize(fdata.load(cfg.data.test_path, cfg.data, split="test"))
    global_state = adapter_state(build_model(cfg))
    accountants: list[dict | None] = [None] * n
    priors: list[list[float] | None] = [None] * n
    ev = {}
    for server_round in range(1, cfg.federation.rounds + 1):
        states, weights = [], []
        for k, (train, _) in enumerate(sites):
            model = build_model(cfg)
            set_adapter_state(model, global_state)
            result = train_round(
                model,
                train,
                cfg,
                server_round=server_round,
                accountant_state=accountants[k],
                label_prior=priors[k],
            )
            accountants[k], priors[k] = result.accountant_state, result.label_prior
            states.append(adapter_state(model))
            weights.append(result.num_examples)
        total = sum(weights)
        global_state = {
            key: sum(w * s[key] for w, s in zip(weights, states, strict=True)) / total
            for key in global_state
        }
        model = build_model(cfg)
        set_adapter_state(model, global_state)
        ev = evaluate(model, test, cfg)
        for _, val in sites:
            evaluate(model, val, cfg)
    return time.perf_counter() - t0, ev["macro_f1"]


def main() -> None:
    extra = sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        sim_s, summary = simulated(Path(tmp, "sim"), extra)
    cfg = from_flat(summary["config"])
    local_s, local_f1 = in_process(cfg)
    print(f"torch threads in process: {torch.get_num_threads()}")
    print("| | wall s | macro-F1 |")
    print("|---|---|---|")
    print(f"| simulated run, whole command (Python start, Ray, run) | {sim_s:.0f} | |")
    print(f"| simulated run, ServerApp (first to last round) | {summary['wall_s']:.0f} "
          f"| {summary['global']['macro_f1']:.3f} |")  # fmt: skip
    print(f"| same rounds in one process | {local_s:.0f} | {local_f1:.3f} |")
    print(
        f"\noverhead: ServerApp / in-process = {summary['wall_s'] / local_s:.2f}, "
        f"whole command / in-process = {sim_s / local_s:.2f}"
    )


if __name__ == "__main__":
    main()
