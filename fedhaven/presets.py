"""Named demo presets: flat run-config overrides for `fedhaven simulate --preset NAME`.

A preset sets what differs from the defaults (the seq-cls drug-review demo); a config file,
``--set`` and the flags still override it. Each is sized to finish in under 10 minutes on a
2-core CPU box with DP on (BENCHMARKS.md has the measured times).
"""

from __future__ import annotations

from fedhaven.config import Scalar
from fedhaven.errors import FedhavenError

PRESETS: dict[str, dict[str, Scalar]] = {
    # SmolLM2-135M-Instruct answers "Which condition is this review about?" with the
    # review's condition. The instruction set has no label column to split by, hence iid;
    # two sites so each holds enough rows for DP-SGD to take several sampled steps a round.
    "instruct": {
        "model.task": "causal-lm",
        "model.max-length": 96,
        "model.max-new-tokens": 8,  # the answers are a few tokens
        "lora.r": 4,
        "lora.alpha": 8,
        "train.batch-size": 16,
        "train.local-steps": 4,
        "train.lora-learning-rate": 0.01,
        "train.eval-batch-size": 32,
        "data.partition": "iid",
        "federation.sites": 2,
        "federation.rounds": 3,
    },
    # The bundled digits-resnet (pre-trained on digits 0-4 of a split no site holds) learns
    # all ten digits: LoRA on its convolutions and a fresh head, sites split by label.
    "digits": {
        "model.task": "image-cls",
        "model.image-size": 32,
        "data.labels": "0,1,2,3,4,5,6,7,8,9",
        "train.batch-size": 64,
        "train.local-steps": 4,
        "train.learning-rate": 0.03,
        "train.lora-learning-rate": 0.02,
        "federation.rounds": 8,
    },
}


def preset(name: str) -> dict[str, Scalar]:
    """The overrides of preset ``name``."""
    if name not in PRESETS:
        raise FedhavenError(
            f"unknown preset {name!r}: use one of {', '.join(sorted(PRESETS)) or '(none)'}"
        )
    return dict(PRESETS[name])
