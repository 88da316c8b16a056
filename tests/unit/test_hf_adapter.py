"""A run's adapter directory loads and predicts with transformers + peft alone (no fedhaven,
no hub): seq-cls with either head, causal-lm and image-cls, each in a subprocess where
``import fedhaven`` fails; and an incomplete adapter directory is one clear error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from fedhaven import cli
from fedhaven import predict as fpredict
from fedhaven.config import Config, from_flat
from fedhaven.errors import FedhavenError
from fedhaven.hf_mean_pooling import BASE_DIR, HEAD_FILE, PRETRAINED_KEY
from fedhaven.models import REMOTE_CODE_FILE, build_model, load_trained, save_trained
from fedhaven.tasks import get_task

LABELS = ["negative", "neutral", "positive"]

#: On PYTHONPATH of the subprocess: ``import fedhaven`` fails, however it is installed.
BLOCK_FEDHAVEN = """
import sys

class NoFedhaven:
    def find_spec(self, name, path=None, target=None):
        if name == "fedhaven" or name.startswith("fedhaven."):
            raise ImportError(f"{name} is not available here")
        return None

sys.meta_path.insert(0, NoFedhaven())
"""

#: What a user without fedhaven runs: the README's snippets, for each (adapter, task, inputs)
#: job of a JSON file, in one interpreter (its imports cost more than the models). Prints the
#: logits (and labels) of each job as one JSON list.
USER_SCRIPT = """
import json, sys
try:
    import fedhaven
except ImportError:
    pass
else:
    sys.exit("fedhaven is importable")
import torch
from peft import AutoPeftModel, AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

results = []
for adapter, task, inputs in json.load(open(sys.argv[1])):
    out = {}
    if task == "seq-cls":
        model = AutoPeftModelForSequenceClassification.from_pretrained(
            adapter, trust_remote_code=True
        )
        tokenizer = AutoTokenizer.from_pretrained(adapter)
        batch = tokenizer(json.load(open(inputs)), padding=True, return_tensors="pt")
        # the two-step route: the base directory by hand, then the adapter on it
        base = AutoModelForSequenceClassification.from_pretrained(
            f"{adapter}/base", trust_remote_code=True
        )
        with torch.no_grad():
            two_step = PeftModel.from_pretrained(base, adapter).eval()(**batch).logits
        out["two_step"] = two_step.tolist()
    elif task == "causal-lm":
        model = AutoPeftModelForCausalLM.from_pretrained(adapter)
        batch = torch.load(inputs)
    else:
        model = AutoPeftModel.from_pretrained(adapter, trust_remote_code=True)
        batch = torch.load(inputs)
    with torch.no_grad():
        logits = model.eval()(**batch).logits
    out["logits"] = logits.tolist()
    if task != "causal-lm":
        out["labels"] = [model.config.id2label[i] for i in logits.argmax(-1).tolist()]
    results.append(out)
print(json.dumps(results))
"""


def run_without_fedhaven(tmp_path: Path, jobs: list[tuple[Path, str, Path]]) -> list[dict]:
    """USER_SCRIPT in a fresh interpreter that cannot import fedhaven, offline, outside the
    repository; its JSON output, one entry per job."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCK_FEDHAVEN)
    script, job_file = tmp_path / "user.py", tmp_path / "jobs.json"
    script.write_text(USER_SCRIPT)
    job_file.write_text(json.dumps([[str(a), task, str(i)] for a, task, i in jobs]))
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "hf-modules"),  # where the remote code is copied
    }
    p = subprocess.run(
        [sys.executable, str(script), str(job_file)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def perturbed(cfg: Config) -> torch.nn.Module:
    """A trained-looking model: LoRA B is zero at init, so the adapter would change nothing."""
    model = build_model(cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    return model


def trained(cfg: Config, steps: int = 12) -> torch.nn.Module:
    """A model whose labels follow the rows' words (full-batch Adam on the training rows), so
    matching its predictions means more than matching a constant."""
    model = perturbed(cfg)
    task = get_task(cfg)
    data = task.encode(task.load(cfg.data.path))
    ((inputs, target),) = task.batches(data, torch.device("cpu"))  # one batch: all rows
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        task.loss(model(**inputs).logits, target).backward()
        optimizer.step()
    return model


# --- the adapters, and what transformers + peft make of them ---------------------------------


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory, make_rows) -> Path:
    """A tiny BERT whose tokenizer knows the rows' words, saved as
    BertForSequenceClassification, so its checkpoint's keys carry the ``bert.`` prefix that
    loading the encoder must strip."""
    words = sorted({w for text in make_rows(60, 0)["review"] for w in text.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    d = tmp_path_factory.mktemp("tiny-bert-words")
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(d / "vocab.txt"), do_lower_case=True)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,  # not the run's 3: the run's head and labels must win
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


LLAMA_WORDS = ["<pad>", "<unk>", "<s>", "</s>", "what", "helped", "pain", "acne", "the", "pill"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny-llama")
    vocab = {w: i for i, w in enumerate(LLAMA_WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory, make_rows) -> Path:
    p = tmp_path_factory.mktemp("new") / "new.csv"
    make_rows(12, 5)[["review"]].to_csv(p, index=False)
    return p


IMAGE_SIZE = 16  # the tiny ViT's image size (conftest.py: tiny_vit_dir)
#: The model inputs of the causal-lm and image-cls jobs (seq-cls reads ``texts``).
LLAMA_IDS = torch.tensor([[2, 4, 5, 6, 8, 9]])
PIXELS = torch.rand(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def adapters(
    tiny_cfg: Config,
    bert_dir: Path,
    llama_dir: Path,
    tiny_vit_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    """A run's adapter directory per case: seq-cls with each head, causal-lm, image-cls."""
    root = tmp_path_factory.mktemp("runs")
    qa = root / "qa.csv"
    pd.DataFrame({"prompt": ["what helped"] * 4, "response": ["the pill"] * 4}).to_csv(qa)
    images = root / "images"
    for y, name in enumerate(("dark", "light")):
        (images / name).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (8, 8), 60 + 120 * y + i).save(images / name / f"{i}.png")
    # trained() steps on all 60 rows at once: one evaluation batch
    seq = {"model.path": str(bert_dir), "train.eval-batch-size": 64}
    cfgs = {
        "mean": (tiny_cfg.replace(**seq, **{"model.pooling": "mean"}), trained),
        "cls": (tiny_cfg.replace(**seq, **{"model.pooling": "cls"}), trained),
        "causal-lm": (
            from_flat(
                {
                    "model.task": "causal-lm",
                    "model.path": str(llama_dir),
                    "data.path": str(qa),
                    "data.test-path": str(qa),
                }
            ),
            perturbed,
        ),
        "image-cls": (
            from_flat(
                {
                    "model.task": "image-cls",
                    "model.path": str(tiny_vit_dir),
                    "model.image-size": IMAGE_SIZE,
                    "data.path": str(images),
                    "data.test-path": str(images),
                    "data.labels": "dark,light",
                }
            ),
            perturbed,
        ),
    }
    out = {}
    for case, (cfg, make) in cfgs.items():
        out[case] = root / case / "adapter"
        save_trained(make(cfg), cfg, out[case])
    return out


@pytest.fixture(scope="module")
def stock(
    adapters: dict[str, Path], texts: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict]:
    """Each adapter as transformers + peft alone load and run it (one subprocess for all)."""
    tmp = tmp_path_factory.mktemp("without-fedhaven")
    rows = tmp / "texts.json"
    rows.write_text(json.dumps(pd.read_csv(texts)["review"].tolist()))
    torch.save({"input_ids": LLAMA_IDS}, tmp / "ids.pt")
    torch.save({"pixel_values": PIXELS}, tmp / "pixels.pt")
    inputs = {
        "mean": rows,
        "cls": rows,
        "causal-lm": tmp / "ids.pt",
        "image-cls": tmp / "pixels.pt",
    }
    tasks = {"mean": "seq-cls", "cls": "seq-cls"}
    cases = list(adapters)
    jobs = [(adapters[c], tasks.get(c, c), inputs[c]) for c in cases]
    return dict(zip(cases, run_without_fedhaven(tmp, jobs), strict=True))


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_seq_cls_adapter_predicts_fedhavens_labels_without_fedhaven(
    pooling: str, adapters: dict[str, Path], stock: dict[str, dict], texts: Path
) -> None:
    expected = fpredict.predict(adapters[pooling], texts)
    labels = [r["label"] for r in expected]
    assert len(set(labels)) > 1  # a test that a constant model would pass proves little
    got = stock[pooling]
    assert got["labels"] == labels
    probs = torch.tensor(got["logits"]).softmax(-1)
    want = torch.tensor([[r[f"p_{n}"] for n in LABELS] for r in expected])
    torch.testing.assert_close(probs, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(got["two_step"]), torch.tensor(got["logits"]))


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_seq_cls_adapter_points_at_a_small_base_directory(
    pooling: str, adapters: dict[str, Path], bert_dir: Path
) -> None:
    adapter = adapters[pooling]
    config = json.loads((adapter / "adapter_config.json").read_text())
    base = Path(config["base_model_name_or_path"])
    assert base == (adapter / BASE_DIR).resolve() and base.is_dir()
    assert "fedhaven" not in json.dumps(config)  # no auto_mapping to our training-time class
    hf_config = json.loads((base / "config.json").read_text())
    assert Path(hf_config[PRETRAINED_KEY]) == bert_dir.resolve()
    assert hf_config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert sorted(p.name for p in base.iterdir()) == sorted(
        ["config.json", REMOTE_CODE_FILE, HEAD_FILE]
    )
    # no copy of the base weights: the head (3 × 32 + 3 floats) and the code only
    assert sum(p.stat().st_size for p in base.iterdir()) < 20_000


def test_causal_lm_adapter_loads_on_the_pretrained_directory_without_fedhaven(
    adapters: dict[str, Path], stock: dict[str, dict], llama_dir: Path
) -> None:
    adapter = adapters["causal-lm"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == llama_dir.resolve()  # stock: as it is
    assert not (adapter / BASE_DIR).exists()
    with torch.no_grad():
        want = load_trained(adapter)(input_ids=LLAMA_IDS).logits
    torch.testing.assert_close(torch.tensor(stock["causal-lm"]["logits"]), want)


def test_image_cls_adapter_loads_without_fedhaven(
    adapters: dict[str, Path], stock: dict[str, dict]
) -> None:
    adapter = adapters["image-cls"]
    assert (
        Path(json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
        == (adapter / BASE_DIR).resolve()
    )
    with torch.no_grad():
        want = load_trained(adapter)(pixel_values=PIXELS).logits
    got = stock["image-cls"]
    torch.testing.assert_close(torch.tensor(got["logits"]), want, atol=1e-5, rtol=1e-4)
    assert got["labels"] == [["dark", "light"][i] for i in want.argmax(-1).tolist()]


# --- a directory missing a file ---------------------------------------------------------------


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "missing",
    [
        "adapter_config.json",
        "adapter_model.safetensors",
        f"{BASE_DIR}/{REMOTE_CODE_FILE}",
        f"{BASE_DIR}/config.json",
        f"{BASE_DIR}/{HEAD_FILE}",
    ],
)
def test_a_missing_file_is_named_and_nothing_is_changed(
    adapters: dict[str, Path], missing: str, tmp_path: Path
) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(adapters["mean"], adapter)
    (adapter / missing).unlink()
    before = _snapshot(adapter)
    with pytest.raises(FedhavenError) as e:
        load_trained(adapter)
    (line,) = str(e.value).splitlines()
    assert f"'{adapter}' has no " in line and missing in line
    assert line.endswith(
        "copy the whole adapter directory again from the run's output (RUN/adapter)"
    )
    assert _snapshot(adapter) == before


def test_predict_and_export_print_one_line_for_a_missing_file(
    adapters: dict[str, Path],
    texts: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(adapters["mean"], adapter)
    (adapter / BASE_DIR / REMOTE_CODE_FILE).unlink()
    before = _snapshot(adapter)
    for args in (
        ["predict", "--adapter", str(adapter), "--input", str(texts)],
        ["export", "--adapter", str(adapter), "--merge", str(tmp_path / "merged")],
    ):
        monkeypatch.setattr(sys, "argv", ["fedhaven", *args])
        with pytest.raises(SystemExit) as e:
            cli.main()  # in-process: what `fedhaven ...` runs, without a second interpreter
        assert e.value.code == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("error: ") and f"has no {BASE_DIR}/{REMOTE_CODE_FILE}" in line
    assert _snapshot(adapter) == before
    assert not (tmp_path / "merged").exists()


def test_an_adapter_config_that_is_not_json_is_named(
    adapters: dict[str, Path], tmp_path: Path
) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(adapters["mean"], adapter)
    (adapter / "adapter_config.json").write_text("{not json")
    with pytest.raises(FedhavenError, match=r"adapter_config.json' is not a PEFT adapter config"):
        load_trained(adapter)
    assert (adapter / "adapter_config.json").read_text() == "{not json"


def test_an_adapter_saved_before_base_existed_still_loads(
    adapters: dict[str, Path], texts: Path, tmp_path: Path
) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(adapters["mean"], adapter)
    shutil.rmtree(adapter / BASE_DIR)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": None})
    )
    assert fpredict.predict(adapter, texts) == fpredict.predict(adapters["mean"], texts)
