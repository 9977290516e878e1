"""A seconds-long AGW run for tests: width 8, one bottleneck per stage, 64 x 32 images.

Same code path as ``agw_market1501.py`` (non-local blocks, GeM, BNNeck, all three losses,
warmup and steps), only small: set ``data.root`` to a tiny Market-shaped folder.
"""

import ml_collections

from configs import agw_market1501


def get_config() -> ml_collections.ConfigDict:
    config = agw_market1501.get_config()
    config.data.tfds_config = "synthetic"  # used with --config.data.source=tfds
    config.data.height = 64
    config.data.width = 32
    config.data.pad = 4
    config.data.p = 4
    config.data.k = 2
    config.data.num_workers = 0
    config.data.backend = "thread"
    config.data.eval_batch_size = 16

    config.model.width = 8
    config.model.blocks = (1, 1, 1, 1)
    config.model.non_local = (0, 1, 1, 0)

    config.optim.learning_rate = 1e-3
    config.optim.warmup_epochs = 1
    config.optim.milestones = (2,)

    config.num_epochs = 3
    config.log_every_steps = 2
    config.eval_every_epochs = 0
    config.checkpoint_every_steps = 2
    config.keep_checkpoints = 10
    return config
