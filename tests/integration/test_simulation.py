"""End to end: `fedhaven.simulations.simulate` on the tiny BERT, 2 sites, 2 rounds, DP on,
through Flower's simulation engine (Ray). Runs once per module; CI runs it too."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from fedhaven import data as fdata
from fedhaven.config import Config, from_flat
from fedhaven.errors import FedhavenError
from fedhaven.models import adapter_state, build_model, load_trained
from fedhaven.run_record import NEVER_PREDICTED
from fedhaven.tasks import get_task
from fedhaven.tasks.seq_cls import MeanPoolingClassifier
from fedhaven.training import evaluate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_flat: dict[str, object]) -> dict[str, Any]:
    from fedhaven.simulations import simulate

    out = tmp_path_factory.mktemp("sim") / "run"
    cfg = from_flat({**tiny_flat, "privacy.enabled": True, "federation.out-dir": str(out)})
    progress: list[dict[str, Any]] = []
    env = dict(os.environ)
    summary = simulate(cfg, progress=progress.append)
    env_after = dict(os.environ)
    return {
        "summary": summary,
        "out": out,
        "cfg": cfg,
        "progress": progress,
        "env_diff": {
            k: (env.get(k), env_after.get(k))
            for k in set(env) | set(env_after)
            if env.get(k) != env_after.get(k)
        },
    }


def test_simulate_restores_the_callers_environment(run: dict[str, Any]) -> None:
    # it sets offline / quiet variables for its Ray actors only while it runs
    assert run["env_diff"] == {}


def test_summary(run: dict[str, Any]) -> None:
    out: Path = run["out"]
    summary = run["summary"]
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["rounds"] == 2
    assert summary["engine"] == "simulation"
    assert summary["labels"] == ["negative", "neutral", "positive"]
    assert 0 <= summary["global"]["accuracy"] <= 1
    assert 0 <= summary["global"]["macro_f1"] <= 1
    assert len(summary["global"]["per_class_f1"]) == 3
    # classes the final model never predicts, from its held-out confusion matrix
    cm = summary["global"]["confusion"]
    assert summary[NEVER_PREDICTED] == [
        name for j, name in enumerate(summary["labels"]) if not any(row[j] for row in cm)
    ]
    assert len(summary["sites"]) == 2
    for site in summary["sites"].values():
        assert site["examples"] > 0
        assert site["epsilon"] > 0
        assert site["accuracy"] is not None and 0 <= site["accuracy"] <= 1
        assert site["last_round"] == 2
    # 60 rows, 2 sites, 20% validation: 24 training rows each
    assert sum(s["examples"] for s in summary["sites"].values()) == 48
    assert summary["bytes_per_site_round"] > 0
    assert summary["full_model_bytes"] > summary["bytes_per_site_round"]
    assert summary["wall_s"] > 0
    assert summary["config"] == run["cfg"].to_flat()
    # ε is cumulative: after the planned rounds it is the target, not more
    assert summary["max_epsilon"] == max(s["epsilon"] for s in summary["sites"].values())
    assert summary["max_epsilon"] <= run["cfg"].privacy.epsilon * 1.001


def test_metrics_jsonl_and_progress(run: dict[str, Any]) -> None:
    lines = (run["out"] / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    rounds = [json.loads(line) for line in lines]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds == run["progress"]
    for r in rounds:
        assert r["sites_used"] == 2 and r["rejected"] == 0
        assert len(r["sites"]) == 2
    eps = [
        {node: s["epsilon"] for node, s in r["sites"].items()} for r in rounds
    ]  # per site, per round
    for node in eps[0]:
        assert 0 < eps[0][node] < eps[1][node]  # cumulative across rounds


def test_adapter_loads_and_reproduces_the_global_metrics(
    run: dict[str, Any], tiny_model_dir: Path
) -> None:
    cfg: Config = run["cfg"]
    if cfg.model.pooling == "cls":
        base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    else:
        # the rows below are encoded past the frozen prefix (hidden states): run the rest only
        frozen = get_task(cfg).frozen_layers()
        base = MeanPoolingClassifier(AutoModel.from_pretrained(tiny_model_dir), 3, frozen)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(base, run["out"] / "adapter")
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    params = dict(loaded.named_parameters())
    fresh = adapter_state(build_model(cfg))
    head = [k for k in fresh if "classifier" in k]
    assert head
    for k in head:
        assert params[k].shape == fresh[k].shape
        assert not torch.equal(params[k].detach(), fresh[k]), k  # trained, not the init
    lora_b = [k for k in fresh if "lora_B" in k]
    assert lora_b and all(params[k].abs().sum() > 0 for k in lora_b)  # LoRA B starts at 0

    assert AutoTokenizer.from_pretrained(run["out"] / "adapter")  # the run saved it there
    task = get_task(cfg)
    test = task.encode(task.load(cfg.data.test_path, split="test"))
    ev = evaluate(loaded, test, cfg)
    assert ev["accuracy"] == pytest.approx(run["summary"]["global"]["accuracy"])
    assert ev["macro_f1"] == pytest.approx(run["summary"]["global"]["macro_f1"])


def test_load_trained_rebuilds_the_model_from_the_run(run: dict[str, Any]) -> None:
    cfg: Config = run["cfg"]
    loaded = load_trained(run["out"] / "adapter")
    task = get_task(cfg)
    test = task.encode(task.load(cfg.data.test_path, split="test"))
    assert evaluate(loaded, test, cfg)["macro_f1"] == pytest.approx(
        run["summary"]["global"]["macro_f1"]
    )


def test_load_trained_rejects_a_directory_without_a_run_config(tmp_path: Path) -> None:
    with pytest.raises(FedhavenError, match="not a fedhaven adapter directory"):
        load_trained(tmp_path)


def test_every_simulated_site_keeps_its_own_ledger(run: dict[str, Any]) -> None:
    from fedhaven.privacy import Ledger

    reported = sorted(s["epsilon"] for s in run["summary"]["sites"].values())
    ledgers = [Ledger(run["out"] / "sites" / f"site-{i}").entries() for i in range(2)]
    assert [[e["round"] for e in entries] for entries in ledgers] == [[1, 2], [1, 2]]
    # what each site reported is what its ledger says it spent
    assert sorted(entries[-1]["epsilon"] for entries in ledgers) == pytest.approx(reported)


def test_the_run_writes_its_report_and_model_card(run: dict[str, Any]) -> None:
    out: Path = run["out"]
    report = (out / "report.md").read_text()
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        assert f"| {r['round']} | {r['wall_s']:.1f} | {r['global']['accuracy']:.3f} |" in report
    for png in ("global", "sites", "epsilon", "confusion"):
        assert (out / "plots" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    card = (out / "adapter" / "model_card.md").read_text()
    # each site's fingerprint and row count, computed at the site, match its rows
    cfg: Config = run["cfg"]
    task = get_task(cfg)
    full = task.load(cfg.data.path)
    for train, val in fdata.simulated_sites(full, cfg.data, 2, cfg.train.seed):
        fp = fdata.fingerprint([*task.rows(train), *task.rows(val)])
        assert f"| {len(train)} | {len(train) + len(val)} | {fp:012x} |" in card
    assert "DP-SGD" in card and "δ = 1e-05" in card
