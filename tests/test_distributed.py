"""Multi-process data-parallel training: 2 processes on localhost against 1 process.

``tools/train.py --jax_distributed`` is started twice on this machine, as on two hosts: one CPU
device per process, collectives over gloo (jax's CPU default), a coordinator on localhost and a
shared workdir. Process ``i`` loads only its half of every global batch. The run trains 2 steps
(orbax saves step 2 from both processes), then a second launch restores step 2 and trains to
step 4. A one-process run with 2 CPU devices (the same mesh shape and global batch) runs
alongside; losses and weights must agree at every checkpoint.
"""

from __future__ import annotations

import os
import pathlib
import socket
import struct
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from tensorboardX.proto import event_pb2

from reid_jax import checkpoints
from reid_jax.train import loop

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def train_command(workdir: pathlib.Path, data: str, steps: int, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "tools" / "train.py"),
            f"--config={REPO / 'configs' / 'agw_tiny.py'}", f"--workdir={workdir}",
            f"--config.data.root={data}", f"--config.num_train_steps={steps}",
            "--config.log_every_steps=1", "--config.checkpoint_every_steps=2", *extra]


def env(num_devices: int) -> dict[str, str]:
    out = dict(os.environ)
    out["PYTHONPATH"] = str(REPO) + os.pathsep + out.get("PYTHONPATH", "")
    out.pop("XLA_FLAGS", None)
    out.update({"JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(num_devices)})
    return out


def start_two_processes(workdir: pathlib.Path, data: str, steps: int
                        ) -> list[subprocess.Popen]:
    address = f"localhost:{free_port()}"
    return [subprocess.Popen(
        train_command(workdir, data, steps, "--jax_distributed",
                      f"--coordinator_address={address}", "--num_processes=2",
                      f"--process_id={i}"),
        cwd=REPO, env=env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]


def wait_all(procs: list[subprocess.Popen], timeout: float = 1200) -> list[str]:
    logs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            logs.append(err)
            assert proc.returncode == 0, f"{proc.args}\n{out[-2000:]}\n{err[-4000:]}"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return logs


def read_scalars(workdir: pathlib.Path, tag: str) -> dict[int, float]:
    """``{step: value}`` of a TensorBoard scalar from every event file of ``workdir``."""
    values = {}
    for path in sorted(workdir.glob("events.out.tfevents.*")):
        blob = path.read_bytes()
        at = 0
        while at < len(blob):
            (length,) = struct.unpack("<Q", blob[at:at + 8])
            event = event_pb2.Event.FromString(blob[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = value.simple_value
    return values


def restore_items(workdir: pathlib.Path, step: int) -> dict[str, np.ndarray]:
    """Model and optimizer arrays of checkpoint ``step``, keyed by path."""
    manager = loop.open_checkpoint_manager(str(workdir), None)
    try:
        # Saved on 2 devices of 2 processes: restore onto this process's first device.
        meta = manager.item_metadata(step)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

        def target(item: str):
            return ocp.args.StandardRestore(jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta[item]))

        restored = manager.restore(step, args=ocp.args.Composite(**{
            checkpoints.MODEL_ITEM: target(checkpoints.MODEL_ITEM),
            loop.TRAIN_STATE_ITEM: target(loop.TRAIN_STATE_ITEM)}))
    finally:
        manager.close()
    tree = {"model": restored[checkpoints.MODEL_ITEM], "train": restored[loop.TRAIN_STATE_ITEM]}
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_two_processes_train_as_one(tiny_dataset, tmp_path):
    multi, single = tmp_path / "two_processes", tmp_path / "one_process"
    # Steps 0-2 on 2 processes and the whole 1-process reference, side by side.
    reference = subprocess.Popen(train_command(single, tiny_dataset, STEPS), cwd=REPO,
                                 env=env(2),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = start_two_processes(multi, tiny_dataset, 2)
    logs = wait_all(first + [reference])
    assert "devices: 2 x cpu on 2 process(es); global batch 8" in logs[0]
    assert "devices: 2 x cpu on 1 process(es); global batch 8" in logs[2]
    # Resume: both processes restore step 2 from the shared workdir and train on to step 4.
    logs = wait_all(start_two_processes(multi, tiny_dataset, STEPS))
    assert "resumed from" in logs[0] and "step 2" in logs[0]

    ckpts = multi / loop.CHECKPOINT_SUBDIR
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [2, 4]
    loss_multi = read_scalars(multi, "train/loss")
    loss_single = read_scalars(single, "train/loss")
    assert sorted(loss_multi) == sorted(loss_single) == [1, 2, 3, 4]
    np.testing.assert_allclose([loss_multi[s] for s in range(1, 5)],
                               [loss_single[s] for s in range(1, 5)], rtol=1e-5)
    for step in (2, STEPS):
        got, want = restore_items(multi, step), restore_items(single, step)
        assert got.keys() == want.keys() and len(got) > 50
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5,
                                       err_msg=f"step {step} {key}")
