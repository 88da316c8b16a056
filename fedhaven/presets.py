"""Named demo presets: flat run-config overrides for `fedhaven simulate --preset NAME`.

A preset sets what differs from the defaults (the seq-cls drug-review demo); a config file,
``--set`` and the flags still override it. Each is sized to finish in under 10 minutes on a
2-core CPU box with DP on (BENCHMARKS.md has the measured times).
"""

from __future__ import annotations

from fedhaven.config import Scalar, keys
from fedhaven.errors import FedhavenError

PRESETS: dict[str, dict[str, Scalar]] = {
    # SmolLM2-135M-Instruct answers "Which condition is this review about?" with the
    # review's condition. The instruction set has no label column to split by, hence iid;
    # two sites so each holds enough rows for DP-SGD to take several sampled steps a round.
    "instruct": {
        keys.MODEL_TASK: "causal-lm",
        keys.MODEL_MAX_LENGTH: 96,
        keys.MODEL_MAX_NEW_TOKENS: 8,  # the answers are a few tokens
        keys.LORA_R: 4,
        keys.LORA_ALPHA: 8,
        keys.TRAIN_BATCH_SIZE: 16,
        keys.TRAIN_LOCAL_STEPS: 4,
        # With DP and without: 0.01 left the DP answers unformed, 0.05 overshot without DP.
        keys.TRAIN_LORA_LEARNING_RATE: 0.02,
        keys.TRAIN_EVAL_BATCH_SIZE: 32,
        keys.DATA_PARTITION: "iid",
        keys.FEDERATION_SITES: 2,
        keys.FEDERATION_ROUNDS: 3,
    },
    # The bundled digits-resnet (pre-trained on digits 0-4 of a split no site holds) learns
    # all ten digits: LoRA on its convolutions and a fresh head, sites split by label. It
    # trains with the text tasks' recipe (batch, steps, rates): its own rates (4 steps of 64
    # at 0.03 / 0.02) left the federation 28 points under pooled training at ε=8 and
    # diverged without DP at twice the rate (BENCHMARKS.md).
    "digits": {
        keys.MODEL_TASK: "image-cls",
        keys.MODEL_IMAGE_SIZE: 32,
        keys.DATA_LABELS: "0,1,2,3,4,5,6,7,8,9",
        keys.FEDERATION_ROUNDS: 8,
    },
}


def preset(name: str) -> dict[str, Scalar]:
    """The overrides of preset ``name``."""
    if name not in PRESETS:
        raise FedhavenError(
            f"unknown preset {name!r}: use one of {', '.join(sorted(PRESETS)) or '(none)'}"
        )
    return dict(PRESETS[name])
