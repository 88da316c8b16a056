"""fedhaven.training on a tiny BERT: the #820 guard, DP with noise off equals plain training,
cumulative ε across rounds, evaluation metrics, steps per round."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import RDPAccountant
from sklearn.metrics import accuracy_score, f1_score
from torch.utils.data import TensorDataset

from fedhaven import training
from fedhaven.config import Config, PrivacyConfig, from_flat
from fedhaven.errors import FedhavenError
from fedhaven.models import adapter_state, build_model, is_lora, set_adapter_state
from fedhaven.privacy import epsilon_of, noise_for_budget, prior_noise, sample_rate
from fedhaven.tasks import get_task
from fedhaven.training import evaluate, lr_factor, steps_per_round, train_round


@pytest.fixture(scope="module")
def train_data(tiny_cfg: Config) -> TensorDataset:
    task = get_task(tiny_cfg)
    return task.encode(task.load(tiny_cfg.data.path))


@pytest.fixture(scope="module")
def test_data(tiny_cfg: Config) -> TensorDataset:
    task = get_task(tiny_cfg)
    return task.encode(task.load(tiny_cfg.data.test_path, split="test"))


def _one_step(cfg: Config, privacy: bool) -> Config:
    return cfg.replace(**{"train.local-steps": 1, "privacy.enabled": privacy})


def _frozen_embedding(model: torch.nn.Module) -> torch.Tensor:
    (weight,) = (p for n, p in model.named_parameters() if "word_embeddings" in n)
    return weight


@pytest.mark.parametrize("privacy", [False, True])
def test_one_step_moves_lora_b_and_head_but_not_the_base(
    tiny_cfg: Config, train_data: TensorDataset, privacy: bool
) -> None:
    cfg = _one_step(tiny_cfg, privacy)
    model = build_model(cfg)
    before = adapter_state(model)
    emb = _frozen_embedding(model).detach().clone()
    result = train_round(model, train_data, cfg)
    after = adapter_state(model)
    assert result.steps == 1
    assert set(after) == set(before)  # no Opacus prefix leaks into the names
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    lora_b = {k for k in before if "lora_B" in k}
    head = {k for k in before if "classifier" in k}
    assert lora_b and lora_b <= moved
    assert head and head <= moved
    assert torch.equal(_frozen_embedding(model), emb)
    assert not _frozen_embedding(model).requires_grad
    if privacy:
        assert result.epsilon is not None and result.epsilon > 0
        assert result.noise_multiplier is not None and result.noise_multiplier > 0
    else:
        assert result.epsilon is None and result.accountant_state is None


@pytest.mark.parametrize("privacy", [False, True])
def test_guard_raises_when_weights_do_not_move(
    tiny_cfg: Config, train_data: TensorDataset, privacy: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    def frozen_optimizer(model: torch.nn.Module, *_: object) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)

    monkeypatch.setattr(training, "_optimizer", frozen_optimizer)
    cfg = _one_step(tiny_cfg, privacy)
    with pytest.raises(RuntimeError, match="opacus#820"):
        train_round(build_model(cfg), train_data, cfg)


def test_check_weights_moved_directly(tiny_cfg: Config) -> None:
    model = build_model(tiny_cfg)
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(RuntimeError, match="did not change"):
        training._check_weights_moved(model, snapshot)
    # only the head moved, the LoRA matrices did not: still the #820 symptom
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "classifier" in n and p.requires_grad:
                p.add_(1.0)
    with pytest.raises(RuntimeError):
        training._check_weights_moved(model, snapshot)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(1.0)
    training._check_weights_moved(model, snapshot)  # passes


@pytest.mark.parametrize(
    ("optimizer", "atol"),
    [
        # SGD: the update is the gradient itself, so this also catches a wrong normalisation
        # (sum vs mean over the batch), to which Adam is blind.
        ("sgd", 1e-6),
        # fedhaven's AdamW: its first step is about lr * g / (|g| + eps), which turns the
        # float round-off of near-zero per-sample-summed gradients into ~1e-5 differences.
        ("adamw", 1e-4),
    ],
)
def test_dp_with_noise_and_clipping_off_equals_plain_training(
    tiny_cfg: Config,
    train_data: TensorDataset,
    optimizer: str,
    atol: float,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if optimizer == "sgd":
        monkeypatch.setattr(
            training,
            "_optimizer",
            lambda model, cfg, *_: torch.optim.SGD(
                [p for p in model.parameters() if p.requires_grad], lr=cfg.train.learning_rate
            ),
        )
    flat = {
        "train.batch-size": len(train_data),  # one full batch: same mean gradient
        "train.local-steps": 1,
        "train.learning-rate": 1.0 if optimizer == "sgd" else 0.05,
        "privacy.max-grad-norm": 1e6,
    }
    cfg_dp = tiny_cfg.replace(**flat, **{"privacy.enabled": True})
    cfg_plain = tiny_cfg.replace(**flat, **{"privacy.enabled": False})
    model_dp = build_model(cfg_dp)
    model_plain = copy.deepcopy(model_dp)
    start = adapter_state(model_dp)

    prior = [0.2, 0.3, 0.5]  # the same logit adjustment on both paths (no noisy histogram)
    torch.manual_seed(0)
    dp = train_round(
        model_dp,
        train_data,
        cfg_dp,
        noise_multiplier=0.0,
        poisson_sampling=False,
        label_prior=prior,
    )
    torch.manual_seed(0)
    plain = train_round(model_plain, train_data, cfg_plain, label_prior=prior)

    assert dp.steps == plain.steps == 1
    assert dp.noise_multiplier == 0.0
    assert dp.loss == pytest.approx(plain.loss, abs=1e-6)
    a, b = adapter_state(model_dp), adapter_state(model_plain)
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol), k
    # training really moved the weights, by much more than the tolerance
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 100 * atol


def test_epsilon_accumulates_across_rounds(tiny_cfg: Config, train_data: TensorDataset) -> None:
    cfg = tiny_cfg.replace(**{"train.local-steps": 2, "privacy.enabled": True})
    r1 = train_round(build_model(cfg), train_data, cfg)
    r2 = train_round(
        build_model(cfg),
        train_data,
        cfg,
        server_round=2,
        accountant_state=r1.accountant_state,
        label_prior=r1.label_prior,
    )
    assert r1.epsilon is not None and r2.epsilon is not None
    assert 0 < r1.epsilon < r2.epsilon

    sigma, rate = r1.noise_multiplier, sample_rate(len(train_data), cfg.train.batch_size)
    histogram = (prior_noise(cfg.privacy), 1.0, 1)  # the label counts, released once per run
    assert r2.noise_multiplier == sigma
    assert r2.label_prior == r1.label_prior
    assert [tuple(h) for h in r2.accountant_state["history"]] == [histogram, (sigma, rate, 4)]

    fresh = RDPAccountant()
    fresh.history = [histogram, (sigma, rate, 2)]
    assert fresh.get_epsilon(delta=cfg.privacy.delta) == pytest.approx(r1.epsilon, rel=1e-9)
    fresh.history = [histogram, (sigma, rate, 2), (sigma, rate, 2)]
    assert fresh.get_epsilon(delta=cfg.privacy.delta) == pytest.approx(r2.epsilon, rel=1e-9)
    # σ was chosen so that the histogram and the planned rounds (2) spend the target ε
    assert r2.epsilon <= cfg.privacy.epsilon
    assert r2.epsilon == pytest.approx(cfg.privacy.epsilon, rel=0.02)


@pytest.mark.parametrize("epsilon", [1.0, 8.0, 16.0])
def test_the_default_label_histogram_costs_the_training_steps_about_5_percent_of_noise(
    epsilon: float,
) -> None:
    # The demo's plan under DP: 5 rounds of one full-batch step. The histogram's share of the
    # budget is paid in the training steps' σ; a noisier histogram costs less. At every ε:
    # a fixed σ of 2 alone spent more than ε = 1.
    cfg = PrivacyConfig(epsilon=epsilon)
    sigma_h = prior_noise(cfg)
    assert epsilon_of([(sigma_h, 1.0, 1)], cfg.delta) <= epsilon / 4
    alone = noise_for_budget(cfg, 1.0, 5)
    default = noise_for_budget(cfg, 1.0, 5, ((sigma_h, 1.0, 1),))
    noisier = noise_for_budget(cfg, 1.0, 5, ((4 * sigma_h, 1.0, 1),))
    assert alone < noisier < default <= 1.07 * alone
    assert default > 1.02 * alone  # not free: the histogram is a real release


def test_a_histogram_that_alone_spends_epsilon_is_refused_naming_its_key() -> None:
    cfg = PrivacyConfig(epsilon=1.0, prior_noise=2.0)  # σ 2 alone spends ε = 2.17
    with pytest.raises(FedhavenError, match=r"privacy.prior-noise = 2\) alone spends ε=2.17"):
        noise_for_budget(cfg, 1.0, 5, ((prior_noise(cfg), 1.0, 1),))
    assert prior_noise(cfg) == 2.0  # a value given is kept, never derived


def test_an_epsilon_too_small_for_the_histogram_names_the_run_epsilon() -> None:
    # a quarter of ε = 0.01 is below what the accountant's RDP orders can certify
    with pytest.raises(FedhavenError, match=r"quarter of privacy.epsilon = 0.01 .*raise"):
        prior_noise(PrivacyConfig(epsilon=0.01))


def test_without_logit_adjustment_no_histogram_is_released(
    tiny_cfg: Config, train_data: TensorDataset
) -> None:
    cfg = tiny_cfg.replace(**{"privacy.enabled": True, "train.logit-adjustment": 0.0})
    r = train_round(build_model(cfg), train_data, cfg)
    assert r.label_prior is None
    assert all(rate < 1.0 for _, rate, _ in r.accountant_state["history"])


def test_evaluate_matches_sklearn(tiny_cfg: Config, test_data: TensorDataset) -> None:
    model = build_model(tiny_cfg)
    gen = torch.Generator().manual_seed(1)
    # a random head so the predictions spread over the classes
    set_adapter_state(
        model, {k: torch.randn(v.shape, generator=gen) for k, v in adapter_state(model).items()}
    )
    model.train()
    *inputs, labels = test_data.tensors
    got = evaluate(model, test_data, tiny_cfg)
    assert model.training  # restored

    model.eval()
    names = get_task(tiny_cfg).input_names(test_data)
    with torch.no_grad():
        logits = model(**dict(zip(names, inputs, strict=True))).logits
    preds = logits.argmax(-1).numpy()
    y = labels.numpy()
    assert got["num_examples"] == len(y)
    assert got["accuracy"] == pytest.approx(accuracy_score(y, preds))
    assert got["macro_f1"] == pytest.approx(
        f1_score(y, preds, labels=[0, 1, 2], average="macro", zero_division=0)
    )
    assert got["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert len(got["per_class_f1"]) == len(tiny_cfg.data.label_names) == 3
    assert got["per_class_f1"] == pytest.approx(
        f1_score(y, preds, labels=[0, 1, 2], average=None, zero_division=0).tolist()
    )
    confusion = torch.tensor(got["confusion"])
    assert confusion.shape == (3, 3)
    assert confusion.sum().item() == len(y)
    assert confusion.diagonal().sum().item() == int((preds == y).sum())


def test_evaluate_empty_set(tiny_cfg: Config, test_data: TensorDataset) -> None:
    empty = TensorDataset(*(t[:0] for t in test_data.tensors))
    assert evaluate(build_model(tiny_cfg), empty, tiny_cfg) == {"num_examples": 0}


@pytest.mark.parametrize(
    ("examples", "flat", "steps"),
    [
        (100, {"train.batch-size": 32}, 4),
        (96, {"train.batch-size": 32}, 3),
        (100, {"train.batch-size": 32, "train.local-epochs": 3}, 12),
        (5, {"train.batch-size": 32}, 1),
        (100, {"train.batch-size": 32, "train.local-steps": 7}, 7),
        (100, {"train.batch-size": 32, "train.local-epochs": 3, "train.local-steps": 2}, 2),
    ],
)
def test_steps_per_round(examples: int, flat: dict[str, int], steps: int) -> None:
    assert steps_per_round(examples, from_flat(flat)) == steps


def test_train_round_takes_the_planned_steps(tiny_cfg: Config, train_data: TensorDataset) -> None:
    cfg = tiny_cfg.replace(**{"privacy.enabled": False, "train.local-steps": 3})
    result = train_round(build_model(cfg), train_data, cfg)
    assert result.steps == 3 == len(result.step_seconds)
    assert result.num_examples == len(train_data)
    assert result.loss > 0


@pytest.mark.parametrize(
    ("schedule", "rounds", "server_round", "factor"),
    [
        ("linear", 4, 1, 1.0),
        ("linear", 4, 2, 0.75),
        ("linear", 4, 4, 0.25),
        ("linear", 4, 9, 0.25),  # past the plan: stays at the last round's rate
        ("linear", 4, 0, 1.0),
        ("linear", 1, 1, 1.0),
        ("constant", 4, 3, 1.0),
    ],
)
def test_lr_factor(schedule: str, rounds: int, server_round: int, factor: float) -> None:
    cfg = from_flat({"train.schedule": schedule, "federation.rounds": rounds})
    assert lr_factor(server_round, cfg) == pytest.approx(factor)


def test_last_round_steps_at_the_decayed_rate(tiny_cfg: Config, train_data: TensorDataset) -> None:
    # AdamW's first step moves each weight by about lr: round 2 of 2 must move half as far
    cfg = tiny_cfg.replace(
        **{"privacy.enabled": False, "train.local-steps": 1, "train.weight-decay": 0.0}
    )
    assert cfg.train.schedule == "linear" and cfg.federation.rounds == 2
    moves = []
    for server_round in (1, 2):
        model = build_model(cfg)
        start = adapter_state(model)
        train_round(model, train_data, cfg, server_round=server_round)
        end = adapter_state(model)
        moves.append(max((end[k] - start[k]).abs().max().item() for k in end if "classifier" in k))
    assert moves[0] == pytest.approx(cfg.train.learning_rate, rel=0.05)
    assert moves[1] == pytest.approx(moves[0] / 2, rel=0.05)


def test_empty_poisson_batches_still_take_an_accounted_noise_step(
    tiny_cfg: Config, train_data: TensorDataset
) -> None:
    # batch 1 of n rows: each row is drawn with q = 1/n, so P(empty batch) = (1 - 1/n)^n ≈ 0.37
    # per step and 30 steps see some empty ones (all 30 non-empty: p ≈ 1e-6).
    cfg = tiny_cfg.replace(
        **{
            "privacy.enabled": True,
            "train.batch-size": 1,
            "train.local-steps": 30,
            "train.logit-adjustment": 0.0,
        }
    )
    model = build_model(cfg)
    res = train_round(model, train_data, cfg)
    assert res.steps == 30
    history = res.accountant_state["history"]
    assert sum(steps for _, _, steps in history) == 30  # the empty steps were accounted
    assert math.isfinite(res.loss)


@pytest.mark.parametrize("privacy", [False, True])
def test_proximal_term_keeps_the_weights_near_the_global_model(
    tiny_cfg: Config, train_data: TensorDataset, privacy: bool
) -> None:
    # FedProx's gradient μ·(w − w_global) goes in after Opacus's per-sample clipping and
    # noise: as a loss term Opacus would drop it. Both LoRA and head must end closer. (The
    # head's default rate 0.6 makes AdamW overshoot any pull back: it is lowered here.)
    cfg = tiny_cfg.replace(
        **{"privacy.enabled": privacy, "train.local-steps": 6, "train.learning-rate": 0.01}
    )
    distances = {}
    for mu in (0.0, 100.0):
        model = build_model(cfg)
        start = adapter_state(model)
        train_round(model, train_data, cfg, proximal_mu=mu)
        end = adapter_state(model)
        distances[mu] = {
            part: sum(((end[k] - start[k]) ** 2).sum().item() for k in end if is_part(k))
            for part, is_part in (
                ("lora", is_lora),
                ("head", lambda k: not is_lora(k)),
            )
        }
    for part in ("lora", "head"):
        assert distances[100.0][part] < distances[0.0][part] / 3, (part, distances)


@pytest.mark.parametrize("privacy", [False, True])
def test_probe_rounds_train_the_head_alone_then_lora(
    tiny_cfg: Config, train_data: TensorDataset, privacy: bool
) -> None:
    cfg = _one_step(tiny_cfg, privacy).replace(**{"train.probe-rounds": 1})
    model = build_model(cfg)
    start = adapter_state(model)
    lora_b = {k for k in start if "lora_B" in k}
    head = {k for k in start if "classifier" in k}
    result = train_round(model, train_data, cfg, server_round=1)
    probed = adapter_state(model)
    assert set(probed) == set(start)  # LoRA trainable again: the reply carries it
    assert all(torch.equal(probed[k], start[k]) for k in lora_b)
    assert all(not torch.equal(probed[k], start[k]) for k in head)
    model = build_model(cfg)  # a round's model is fresh, as at a site (Opacus hooks it once)
    set_adapter_state(model, probed)
    train_round(
        model,
        train_data,
        cfg,
        server_round=2,
        accountant_state=result.accountant_state,
        label_prior=result.label_prior,
    )
    tuned = adapter_state(model)
    assert all(not torch.equal(tuned[k], probed[k]) for k in lora_b)


def test_probe_rounds_need_a_head(tiny_cfg: Config, train_data: TensorDataset) -> None:
    cfg = _one_step(tiny_cfg, False).replace(
        **{"train.probe-rounds": 1, "lora.modules-to-save": "pooler"}
    )
    model = build_model(cfg)
    for name, p in model.named_parameters():  # LoRA alone is trainable
        if not is_lora(name):
            p.requires_grad_(False)
    before = adapter_state(model)
    with pytest.raises(FedhavenError, match=r"'train\.probe-rounds' = 1: .*no head"):
        train_round(model, train_data, cfg)
    assert all(p.requires_grad for n, p in model.named_parameters() if is_lora(n))
    assert all(torch.equal(adapter_state(model)[k], before[k]) for k in before)


@pytest.mark.parametrize("max_length", [0, 16])  # 0: fitted to the rows, of which there are none
def test_an_empty_split_encodes_to_an_empty_set(
    tiny_flat: dict[str, object], max_length: int
) -> None:
    # a Dirichlet draw can leave a site no validation rows: its evaluation reports 0 examples
    cfg = from_flat({**tiny_flat, "model.max-length": max_length})
    task = get_task(cfg)
    empty = task.encode(task.load(cfg.data.path).select([]))
    assert len(empty) == 0
    assert evaluate(build_model(cfg), empty, cfg) == {"num_examples": 0}
