"""The site ClientApp's handlers, called directly: what leaves the site, and cumulative ε."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flwr.app import Context, Message, MessageType, RecordDict

from fedhaven import protocol
from fedhaven.client.app import PRIVACY_STATE, handle_evaluate, handle_train
from fedhaven.config import Config
from fedhaven.models import adapter_state, build_model
from fedhaven.privacy import ACCOUNTANT, LABEL_PRIOR

pytestmark = pytest.mark.usefixtures("flower_identity")


def site_context(partition: int = 0) -> Context:
    return Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": partition, "num-partitions": 2},
        state=RecordDict(),
        run_config={},
    )


def instruction(cfg: Config, kind: str = MessageType.TRAIN, server_round: int = 1) -> Message:
    content = RecordDict(
        {
            protocol.ARRAYS: protocol.to_record(adapter_state(build_model(cfg))),
            protocol.CONFIG: protocol.train_config(server_round),
        }
    )
    return Message(content, dst_node_id=1, message_type=kind)


def _trainable_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in build_model(cfg).named_parameters() if p.requires_grad}


@pytest.mark.parametrize("privacy", [True, False])
def test_train_reply_carries_only_the_adapter_and_allowed_metrics(
    tiny_cfg: Config, privacy: bool
) -> None:
    cfg = tiny_cfg.replace(**{"privacy.enabled": privacy})
    msg = instruction(cfg)
    context = site_context()
    out = handle_train(msg, context, cfg)

    assert out.metadata.reply_to_message_id == msg.metadata.message_id
    assert out.metadata.message_type == MessageType.TRAIN
    content = out.content
    assert set(content.keys()) == {protocol.ARRAYS, protocol.METRICS}
    assert list(content.array_records) == [protocol.ARRAYS]
    assert list(content.metric_records) == [protocol.METRICS]
    assert not content.config_records

    shapes = _trainable_shapes(cfg)
    arrays = content[protocol.ARRAYS]
    assert {k: tuple(a.shape) for k, a in arrays.items()} == shapes
    protocol.check_reply(content, train=True, expected=shapes)

    metrics = content[protocol.METRICS]
    assert set(metrics.keys()) <= protocol.TRAIN_METRICS
    # 60 rows, 2 iid sites -> 30 each, 20% held out for validation -> 24 to train on
    assert metrics[protocol.NUM_EXAMPLES] == 24
    assert metrics[protocol.STEPS] == 3  # ceil(24 / batch 8)
    if privacy:
        assert metrics[protocol.EPSILON] > 0
        assert metrics[protocol.NOISE_MULTIPLIER] > 0
        assert ACCOUNTANT in context.state[PRIVACY_STATE]
    else:
        assert protocol.EPSILON not in metrics
        assert ACCOUNTANT not in context.state.get(PRIVACY_STATE, {})
    # the label prior for logit adjustment stays at the site for the next round
    assert len(json.loads(str(context.state[PRIVACY_STATE][LABEL_PRIOR]))) == 3

    # the site trained: the returned adapter is not the one it was sent
    sent = protocol.from_record(msg.content[protocol.ARRAYS])
    got = protocol.from_record(arrays)
    assert any(not (sent[k] == got[k]).all() for k in sent)


def test_epsilon_is_cumulative_over_rounds_of_one_site(tiny_cfg: Config) -> None:
    context = site_context()
    first = handle_train(instruction(tiny_cfg), context, tiny_cfg).content[protocol.METRICS]
    second = handle_train(instruction(tiny_cfg, server_round=2), context, tiny_cfg).content[
        protocol.METRICS
    ]
    assert 0 < first[protocol.EPSILON] < second[protocol.EPSILON]
    # planned rounds (2) spend the target budget, up to the noise search's tolerance
    assert second[protocol.EPSILON] <= tiny_cfg.privacy.epsilon
    assert second[protocol.EPSILON] == pytest.approx(tiny_cfg.privacy.epsilon, rel=0.02)

    # another site's context starts from its own, empty history
    other = handle_train(instruction(tiny_cfg), site_context(1), tiny_cfg).content[protocol.METRICS]
    assert other[protocol.EPSILON] < second[protocol.EPSILON]


def test_evaluate_reply_carries_only_allowed_metrics(tiny_cfg: Config) -> None:
    msg = instruction(tiny_cfg, MessageType.EVALUATE)
    out = handle_evaluate(msg, site_context(), tiny_cfg)
    content = out.content
    assert set(content.keys()) == {protocol.METRICS}
    assert not content.array_records and not content.config_records
    metrics = content[protocol.METRICS]
    assert set(metrics.keys()) <= protocol.EVALUATE_METRICS
    # exactly the task's metrics (seq-cls: loss, accuracy, macro-F1) and the count
    expected = {protocol.NUM_EXAMPLES, protocol.LOSS, protocol.ACCURACY, protocol.MACRO_F1}
    assert set(metrics.keys()) == expected
    assert metrics[protocol.NUM_EXAMPLES] == 6  # 20% of the site's 30 rows
    assert 0 <= metrics[protocol.ACCURACY] <= 1
    assert 0 <= metrics[protocol.MACRO_F1] <= 1
    protocol.check_reply(content, train=False)


def test_the_harness_config_wins_over_the_run_config(tiny_cfg: Config) -> None:
    context = site_context()
    context.run_config.update({"train.local-steps": 5})
    cfg = tiny_cfg.replace(**{"privacy.enabled": False, "train.local-steps": 1})
    out = handle_train(instruction(cfg), context, cfg)
    assert out.content[protocol.METRICS][protocol.STEPS] == 1


def test_a_deployed_site_reads_the_run_config_flower_gives_it(tiny_cfg: Config) -> None:
    cfg = tiny_cfg.replace(**{"privacy.enabled": False, "train.local-steps": 2})
    context = site_context()
    context.run_config.update(cfg.to_flat())
    out = handle_train(instruction(cfg), context, None)
    assert out.content[protocol.METRICS][protocol.STEPS] == 2


@pytest.mark.parametrize(("sent", "used"), [(0.25, 0.25), (None, 0.0)])
def test_the_site_trains_with_the_proximal_mu_fedprox_sends(
    tiny_cfg: Config, sent: float | None, used: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedhaven.client import app as client_app

    seen: list[float] = []

    def spy(*args: Any, proximal_mu: float = 0.0, **kwargs: Any) -> Any:
        seen.append(proximal_mu)
        return train_round(*args, proximal_mu=proximal_mu, **kwargs)

    train_round = client_app.train_round
    monkeypatch.setattr(client_app, "train_round", spy)
    cfg = tiny_cfg.replace(**{"privacy.enabled": False, "train.local-steps": 1})
    msg = instruction(cfg)
    if sent is not None:
        msg.content[protocol.CONFIG][protocol.PROXIMAL_MU] = sent
    assert not handle_train(msg, site_context(), cfg).has_error()
    assert seen == [used]
