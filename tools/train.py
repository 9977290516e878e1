r"""Trains AGW: flags -> ``reid_jax.train.loop.train_and_evaluate(config, workdir)``.

  python tools/train.py --config=configs/agw_market1501.py --workdir=/tmp/agw \
      --config.data.root=/data/Market-1501-v15.09.15 --config.init_from=/ckpt/resnet50

Any config field can be overridden (``--config.num_epochs=5``, ``--config.data.p=8``). Running
the same command again resumes from the latest checkpoint in ``workdir/checkpoints``. Ctrl-C or
SIGTERM (preemption) finishes the current step, saves it and stops with one line saying where;
a second Ctrl-C stops at once. Multi-host:
add ``--jax_distributed`` on every host (see ``reid_jax/train/loop.py`` and docs/scaling.md).
"""

from __future__ import annotations

import json
import sys

import jax
import orbax.checkpoint as ocp
from absl import app, flags, logging
from ml_collections import config_flags

from reid_jax import cli
from reid_jax.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (checkpoints, TensorBoard, metrics).")
_JAX_DISTRIBUTED = flags.DEFINE_bool(
    "jax_distributed", False, "Call jax.distributed.initialize() first (multi-host runs).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS "
    "or auto-detected on SLURM / Open MPI / Cloud TPU / Kubernetes).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0-based.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _JAX_DISTRIBUTED.value:
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                   num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
        # Barriers through the coordination service, which waits for late processes (orbax's
        # default is a device collective, which on CPU gives up after 30 s); and every process
        # starts together (docs/scaling.md, "Multi-host training").
        if not flags.FLAGS["experimental_orbax_use_distributed_barrier"].present:
            flags.FLAGS.experimental_orbax_use_distributed_barrier = True
        ocp.multihost.sync_global_processes("tools/train.py: every process started")
    loop.quiet_orbax_logging()
    logging.info("config:\n%s", _CONFIG.value)
    try:
        result = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except loop.TrainingInterrupted as e:
        # Saved and stopped cleanly (preemption, Ctrl-C): one line, the signal's exit status.
        print(f"tools/train.py: stopped by {e}", file=sys.stderr, flush=True)
        raise SystemExit(130 if e.signal_name == "SIGINT" else 143) from None
    if jax.process_index() == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "cmc"}, indent=1))


if __name__ == "__main__":
    cli.run(main)
