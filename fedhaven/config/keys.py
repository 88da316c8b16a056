"""Flat run-config keys (``<section>.<field>``, ``-`` for ``_``) that code names more than
once: the CLI's flags, the presets, the tuner's search space, the harness, the config's own
checks. One definition each, here; every key of :class:`fedhaven.config.Config` is valid in
a flat config whether or not it is named here (:func:`fedhaven.config.valid_keys`). A site's
own settings are node-config keys, not these: see :mod:`fedhaven.config`.
"""

MODEL_PATH = "model.path"
MODEL_TASK = "model.task"
MODEL_MAX_LENGTH = "model.max-length"
MODEL_IMAGE_SIZE = "model.image-size"
MODEL_MAX_NEW_TOKENS = "model.max-new-tokens"
MODEL_HEAD_INIT = "model.head-init"
MODEL_LABEL_PROMPT = "model.label-prompt"

LORA_R = "lora.r"
LORA_ALPHA = "lora.alpha"

TRAIN_LEARNING_RATE = "train.learning-rate"
TRAIN_LORA_LEARNING_RATE = "train.lora-learning-rate"
TRAIN_SCHEDULE = "train.schedule"
TRAIN_LOGIT_ADJUSTMENT = "train.logit-adjustment"
TRAIN_LOCAL_EPOCHS = "train.local-epochs"
TRAIN_LOCAL_STEPS = "train.local-steps"
TRAIN_PROBE_ROUNDS = "train.probe-rounds"
TRAIN_BATCH_SIZE = "train.batch-size"
TRAIN_EVAL_BATCH_SIZE = "train.eval-batch-size"
TRAIN_SEED = "train.seed"

PRIVACY_ENABLED = "privacy.enabled"
PRIVACY_EPSILON = "privacy.epsilon"
PRIVACY_MAX_GRAD_NORM = "privacy.max-grad-norm"
PRIVACY_CENTRAL = "privacy.central"

DATA_PATH = "data.path"
DATA_TEST_PATH = "data.test-path"
DATA_TEXT_COLUMN = "data.text-column"
DATA_LABEL_COLUMN = "data.label-column"
DATA_LABELS = "data.labels"
DATA_PARTITION = "data.partition"

FEDERATION_ROUNDS = "federation.rounds"
FEDERATION_SITES = "federation.sites"
FEDERATION_SITE_CPUS = "federation.site-cpus"
FEDERATION_OUT_DIR = "federation.out-dir"
FEDERATION_RESUME = "federation.resume"
FEDERATION_ROUND_TIMEOUT = "federation.round-timeout"
FEDERATION_REJOIN_WAIT = "federation.rejoin-wait"
FEDERATION_MIN_SITES = "federation.min-sites"
FEDERATION_STRATEGY = "federation.strategy"
FEDERATION_SERVER_MOMENTUM = "federation.server-momentum"
FEDERATION_UPDATE_NORM_BOUND = "federation.update-norm-bound"
FEDERATION_MAX_UPDATE_NORM = "federation.max-update-norm"
