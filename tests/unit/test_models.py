"""fedhaven.models on a tiny BERT: what is trainable, strict adapter get/set, saving."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModel, AutoModelForSequenceClassification

from fedhaven.config import Config, from_flat
from fedhaven.errors import FedhavenError
from fedhaven.models import (
    adapter_state,
    build_model,
    full_model_bytes,
    set_adapter_state,
)
from fedhaven.tasks import get_task
from fedhaven.tasks.seq_cls import HEAD_INIT_SCALE, MeanPoolingClassifier, label_texts


def _batch(cfg: Config) -> dict[str, torch.Tensor]:
    tok = get_task(cfg).processor()
    enc = tok(
        ["good drug", "awful pain and nausea", "okay i felt fine"],
        padding="max_length",
        max_length=cfg.model.max_length,
        truncation=True,
        return_tensors="pt",
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


POOLINGS = ["mean", "cls"]


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize(
    ("layers", "adapted"),
    [("", {"0", "1"}), ("1", {"1"}), ("0", {"0"}), ("-1", {"1"}), ("0,1", {"0", "1"})],
)
def test_only_lora_and_head_are_trainable(
    tiny_cfg: Config, pooling: str, layers: str, adapted: set[str]
) -> None:
    model = build_model(tiny_cfg.replace(**{"model.pooling": pooling, "lora.layers": layers}))
    assert isinstance(model, PeftModel)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert trainable and frozen
    for name in trainable:
        assert "lora_" in name or "classifier.modules_to_save" in name, name
    # LoRA A and B on query and value of each adapted layer, plus the head's weight and bias
    lora = [n for n in trainable if "lora_" in n]
    assert len(lora) == 2 * 2 * len(adapted)
    assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n in lora} == {"query", "value"}
    assert {n.split(".layer.")[1].split(".")[0] for n in lora} == adapted
    head = [n for n in trainable if "classifier" in n]
    assert len(head) == 2
    assert any("embeddings" in n for n in frozen)
    assert model.training  # the modules_to_save copy too (Opacus needs activations)
    assert all(m.training for m in model.modules())


def test_adapter_state_round_trip(tiny_cfg: Config) -> None:
    model = build_model(tiny_cfg)
    state = adapter_state(model)
    assert set(state) == {n for n, p in model.named_parameters() if p.requires_grad}
    new = {k: torch.randn_like(v) for k, v in state.items()}
    set_adapter_state(model, new)
    got = adapter_state(model)
    for k in new:
        assert torch.equal(got[k], new[k])
    # adapter_state is a copy: editing it does not touch the model
    got[next(iter(got))].add_(1.0)
    assert torch.equal(adapter_state(model)[next(iter(got))], new[next(iter(got))])


def test_set_adapter_state_is_strict(tiny_cfg: Config) -> None:
    model = build_model(tiny_cfg)
    state = adapter_state(model)
    name = next(k for k in state if "lora_B" in k)

    missing = dict(state)
    del missing[name]
    with pytest.raises(ValueError, match="missing"):
        set_adapter_state(model, missing)

    with pytest.raises(ValueError, match="unexpected"):
        set_adapter_state(
            model, {**state, "base_model.model.bert.pooler.dense.weight": torch.zeros(1)}
        )

    wrong = {**state, name: torch.zeros(state[name].shape[0] + 1, state[name].shape[1])}
    with pytest.raises(ValueError, match="shape"):
        set_adapter_state(model, wrong)


def _word_embeddings(model: torch.nn.Module) -> torch.Tensor:
    (weight,) = (p for n, p in model.named_parameters() if "word_embeddings" in n)
    return weight


def test_build_model_returns_independent_copies(tiny_cfg: Config) -> None:
    a, b = build_model(tiny_cfg), build_model(tiny_cfg)
    sa, sb = adapter_state(a), adapter_state(b)
    for k in sa:  # the same init at every site
        assert torch.equal(sa[k], sb[k])
    emb = _word_embeddings(b).detach().clone()
    set_adapter_state(a, {k: v + 1.0 for k, v in sa.items()})
    with torch.no_grad():
        _word_embeddings(a).add_(1.0)
    for k, v in adapter_state(b).items():
        assert torch.equal(v, sb[k])
    assert torch.equal(_word_embeddings(b), emb)
    assert torch.equal(_word_embeddings(build_model(tiny_cfg)), emb)  # the cache is untouched


@pytest.mark.parametrize(
    ("pooling", "labels"),
    [
        ("mean", "a,b,c,d,e"),
        ("mean", "x,y"),
        ("cls", "neg,neu,pos"),
        ("cls", "a,b,c,d,e"),
    ],
)
def test_head_has_one_output_per_label(tiny_cfg: Config, pooling: str, labels: str) -> None:
    # the tiny checkpoint was saved with a 3-label head
    cfg = tiny_cfg.replace(**{"model.pooling": pooling, "data.labels": labels})
    names = labels.split(",")
    model = build_model(cfg)
    model.eval()
    with torch.no_grad():
        assert model(**_batch(cfg)).logits.shape == (3, len(names))
    if pooling == "cls":
        assert model.config.id2label == dict(enumerate(names))


@pytest.mark.parametrize("pooling", POOLINGS)
def test_full_model_is_bigger_than_the_adapter(tiny_cfg: Config, pooling: str) -> None:
    model = build_model(tiny_cfg.replace(**{"model.pooling": pooling}))
    assert full_model_bytes(model.get_base_model()) > sum(
        t.numel() * t.element_size() for t in adapter_state(model).values()
    )


@pytest.mark.parametrize("sub", ["nonexistent", "empty"])
def test_resolve_model_path_rejects_missing_dir(tmp_path: Path, sub: str) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FedhavenError, match="model directory"):
        get_task(from_flat({"model.path": str(tmp_path / sub)})).model_path()


def test_resolve_model_path_accepts_hf_dir(tiny_model_dir: Path) -> None:
    assert get_task(from_flat({"model.path": str(tiny_model_dir)})).model_path() == tiny_model_dir


def test_bad_target_module_is_a_user_error(tiny_cfg: Config) -> None:
    with pytest.raises(FedhavenError, match=r"lora\.target-modules"):
        build_model(tiny_cfg.replace(**{"lora.target-modules": "no_such_module"}))


def _exported_base(model_dir: Path, cfg: Config) -> torch.nn.Module:
    """The base a user loads the exported adapter onto, for the config's pooling."""
    if cfg.model.pooling == "cls":
        return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=3)
    return MeanPoolingClassifier(AutoModel.from_pretrained(model_dir), 3)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_saved_adapter_reloads_to_identical_logits(
    tiny_cfg: Config, tiny_model_dir: Path, tmp_path: Path, pooling: str
) -> None:
    cfg = tiny_cfg.replace(**{"model.pooling": pooling})
    model = build_model(cfg)
    gen = torch.Generator().manual_seed(3)
    # non-trivial adapter and head, so equality means they were really saved and loaded
    set_adapter_state(
        model,
        {k: torch.randn(v.shape, generator=gen) * 0.5 for k, v in adapter_state(model).items()},
    )
    model.eval()
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(_exported_base(tiny_model_dir, cfg), tmp_path)
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    loaded.eval()
    batch = _batch(cfg)
    with torch.no_grad():
        want = model(**batch).logits
        got = loaded(**batch).logits
        plain = _exported_base(tiny_model_dir, cfg).eval()(**batch).logits
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(plain, want, atol=1e-3)  # the adapter matters


#: Labels that are words of the tiny model's vocabulary (the default ones are not: [UNK]).
WORDS = "bad,okay,good"


def _head(model: PeftModel) -> torch.nn.Linear:
    return model.base_model.model.classifier.modules_to_save["default"]


def test_label_head_starts_as_the_label_embeddings(tiny_cfg: Config) -> None:
    """Row c of the head is HEAD_INIT_SCALE × the unit mean-pooled embedding of label c's
    prompt, computed here by hand through the pretrained encoder; the bias is 0."""
    flat = {"model.head-init": "labels", "model.label-prompt": "it was {}", "data.labels": WORDS}
    cfg = tiny_cfg.replace(**flat)
    head = _head(build_model(cfg))
    encoder = AutoModel.from_pretrained(cfg.model.path).eval()
    tok = get_task(cfg).processor()
    for c, name in enumerate(cfg.data.label_names):
        ids = tok(f"it was {name}", return_tensors="pt")
        with torch.no_grad():
            states = encoder(**ids).last_hidden_state[0]  # one text: no padding to mask
        expected = HEAD_INIT_SCALE * states.mean(0) / states.mean(0).norm()
        torch.testing.assert_close(head.weight[c].detach(), expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(head.bias.detach(), torch.zeros(len(cfg.data.label_names)))


def test_label_head_scores_each_label_text_highest(tiny_cfg: Config) -> None:
    """The zero-shot classifier it starts as: each label's own prompt is its best class."""
    cfg = tiny_cfg.replace(**{"model.head-init": "labels", "data.labels": WORDS})
    model = build_model(cfg).eval()
    tok = get_task(cfg).processor()
    enc = tok(label_texts(cfg.data.label_names, "{}"), padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    assert logits.argmax(-1).tolist() == list(range(len(cfg.data.label_names)))


def test_random_head_init_is_the_seeded_linear_init(tiny_cfg: Config) -> None:
    """The default: nn.Linear's init under the run's seed, the same at every site."""

    def head(init: str, seed: int) -> torch.Tensor:
        cfg = tiny_cfg.replace(**{"model.head-init": init, "train.seed": seed})
        return _head(build_model(cfg)).weight.detach()

    assert torch.equal(head("random", 0), head("random", 0))
    assert not torch.equal(head("random", 0), head("random", 1))
    assert not torch.equal(head("random", 0), head("labels", 0))
    assert torch.equal(head("labels", 0), head("labels", 1))  # no randomness in it


def test_label_texts_read_separators_as_spaces() -> None:
    assert label_texts(["sci.med", "not_spam", "ham"], "A {} message.") == [
        "A sci med message.",
        "A not spam message.",
        "A ham message.",
    ]
