"""Orbax checkpoint helpers shared by training, conversion and the tools.

A *checkpoint directory* is an orbax ``CheckpointManager`` directory: one subfolder per step
(``DIR/<step>/``), each written atomically by orbax. Only *committed* steps count: a step folder
whose commit record (orbax's ``_CHECKPOINT_METADATA``) is missing — a save that was killed, a
folder made by hand — is never taken as a step (:func:`committed_steps`), and a committed step
whose files are damaged is reported as :class:`DamagedCheckpointError` naming the step and the
previous one to use instead.
Every step holds these items (``ocp.args.Composite``):

- ``"model"`` (``MODEL_ITEM``): the ``nnx.State`` of the AGW model, i.e. ``nnx.state(model)``:
  params, BatchNorm statistics and the frozen BNNeck bias (standard orbax pytree);
- ``"attribute_head"`` (``ATTRIBUTE_HEAD_ITEM``, optional): ``nnx.state(attribute_head)``;
- ``"meta"`` (``META_ITEM``): JSON with at least ``num_classes`` (int) and ``config`` (the config
  dict the model was built from); conversion adds ``converted_from``; ``save_checkpoint`` adds
  ``attribute_head: {embedding_dim, num_attributes}`` when a head is saved (and its
  ``calibration: {slope, intercept}`` when one was fitted).

Training adds its own items (optimizer state, ...) to the same steps; it can open the manager with
``open_manager`` (which knows the handlers of the items above) and name more items.

Typical use::

    save_checkpoint(d, 0, model_state=nnx.state(model), meta={"num_classes": 751,
                                                              "config": config.to_dict()})
    model, meta = restore_model(d, config)        # latest step, eval() not yet applied
    head = restore_attribute_head(d)              # NoAttributeHeadError without a head

``restore_model`` also serves ``config.init_from``: restore the converted ImageNet checkpoint and
copy its backbone with ``nnx.update(new_model.backbone, nnx.state(restored.backbone))``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from reid_jax.models.agw import AGW, model_kwargs
from reid_jax.models.attribute_head import AttributeHead, Calibration, check_accuracy

MODEL_ITEM = "model"
ATTRIBUTE_HEAD_ITEM = "attribute_head"
META_ITEM = "meta"
# Training's optimizer items (Adam moments, centers, step), written by ``reid_jax.train.loop`` and
# read back only when a run resumes; readers know its handler so orbax does not warn about it.
TRAIN_STATE_ITEM = "train_state"
# What to do about a step without an attribute head (said once, in the error and the tools' logs).
NO_HEAD_HINT = ("Run tools/train_attributes.py on this checkpoint first. A tools/train.py run "
                "writes its steps without the attribute head (training changes the embedding): "
                "train the head again after training (tools/train_attributes.py).")


# Orbax writes this file into a step folder when the save is complete.
COMMIT_FILE = "_CHECKPOINT_METADATA"


class DamagedCheckpointError(ValueError):
    """A committed step cannot be read (truncated or corrupted files); the message names it and
    the previous committed step."""


class NoAttributeHeadError(ValueError):
    """A checkpoint step has no attribute head; the message names the step and says what to do
    (:data:`NO_HEAD_HINT`). A ``ValueError``, so tools report it as a user error."""


def item_handlers() -> dict[str, ocp.CheckpointHandler]:
    """Orbax handlers of the items this module writes (extend the dict with your own items)."""
    return {
        MODEL_ITEM: ocp.StandardCheckpointHandler(),
        ATTRIBUTE_HEAD_ITEM: ocp.StandardCheckpointHandler(),
        META_ITEM: ocp.JsonCheckpointHandler(),
        TRAIN_STATE_ITEM: ocp.StandardCheckpointHandler(),
    }


def open_manager(
    directory: str | os.PathLike,
    *,
    read_only: bool = False,
    max_to_keep: int | None = None,
    extra_item_handlers: dict[str, ocp.CheckpointHandler] | None = None,
) -> ocp.CheckpointManager:
    """A ``CheckpointManager`` on ``directory`` with this layout's item handlers.

    ``read_only=True`` never creates or deletes anything (the directory must exist).
    """
    directory = os.path.abspath(os.fspath(directory))
    if read_only:
        _check_directory(directory)
    handlers = {**item_handlers(), **(extra_item_handlers or {})}
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
        save_interval_steps=0 if read_only else 1)
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def _check_directory(directory: str) -> None:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")


def _json_safe(meta: dict[str, Any]) -> dict[str, Any]:
    """A JSON round-trip copy of ``meta``; ConfigDicts become plain dicts."""
    if not isinstance(meta, dict):
        raise ValueError(f"meta must be a dict, got {type(meta).__name__}")
    converted = {}
    for key, value in meta.items():
        if isinstance(value, ml_collections.ConfigDict):
            value = json.loads(value.to_json_best_effort())
        try:
            converted[key] = json.loads(json.dumps(value))
        except TypeError as e:
            raise ValueError(f"meta field {key!r} is not JSON-serialisable: {e}") from None
    return converted


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    *,
    model_state: nnx.State | nnx.Module,
    attribute_head_state: nnx.State | nnx.Module | None = None,
    meta: dict[str, Any],
) -> str:
    """Writes ``model`` (+ ``attribute_head``) and ``meta`` as step ``step`` of ``directory``.

    Args:
      directory: checkpoint directory (created if missing).
      step: step number; it must not exist yet.
      model_state: ``nnx.state(model)`` of an ``AGW`` (a module is accepted and its state taken).
      attribute_head_state: optional ``nnx.state(head)`` of an ``AttributeHead``.
      meta: JSON-serialisable dict with ``num_classes`` (int) and ``config`` (dict/ConfigDict).

    Returns:
      The step folder's path. Blocks until the write is complete.
    """
    directory = os.path.abspath(os.fspath(directory))
    meta = _json_safe(meta)
    if not isinstance(meta.get("num_classes"), int) or meta["num_classes"] < 1:
        raise ValueError(
            f"meta['num_classes'] must be a positive int, got {meta.get('num_classes')!r} "
            f"(saving to {directory})"
        )
    if isinstance(model_state, nnx.Module):
        model_state = nnx.state(model_state)
    if isinstance(attribute_head_state, nnx.Module):
        attribute_head_state = nnx.state(attribute_head_state)
    items = {MODEL_ITEM: ocp.args.StandardSave(model_state)}
    if attribute_head_state is not None:
        if "kernel" not in attribute_head_state:
            raise ValueError("attribute_head_state has no 'kernel': not an AttributeHead state")
        n, a = attribute_head_state["kernel"][...].shape
        meta["attribute_head"] = {"embedding_dim": int(n), "num_attributes": int(a)}
        items[ATTRIBUTE_HEAD_ITEM] = ocp.args.StandardSave(attribute_head_state)
    items[META_ITEM] = ocp.args.JsonSave(meta)
    manager = open_manager(directory)
    try:
        if step in manager.all_steps():
            raise ValueError(f"step {step} already exists in checkpoint directory {directory}")
        manager.save(step, args=ocp.args.Composite(**items), force=True)
        manager.wait_until_finished()
    finally:
        manager.close()
    return os.path.join(directory, str(step))


def _step_folders(directory: str) -> list[int]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(int(n) for n in names
                  if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def committed_steps(directory: str | os.PathLike) -> list[int]:
    """The steps of ``directory`` whose save completed (commit record present), ascending."""
    directory = os.path.abspath(os.fspath(directory))
    return [s for s in _step_folders(directory)
            if os.path.isfile(os.path.join(directory, str(s), COMMIT_FILE))]


def uncommitted_steps(directory: str | os.PathLike) -> list[int]:
    """Step folders of ``directory`` without a commit record (interrupted saves), ascending."""
    directory = os.path.abspath(os.fspath(directory))
    return [s for s in _step_folders(directory)
            if not os.path.isfile(os.path.join(directory, str(s), COMMIT_FILE))]


def latest_step(directory: str | os.PathLike) -> int | None:
    """The newest committed step in ``directory``; None if it is missing or has none."""
    steps = committed_steps(directory)
    return steps[-1] if steps else None


def _resolve_step(manager: ocp.CheckpointManager | None, directory: str, step: int | None) -> int:
    steps = committed_steps(directory)
    partial = uncommitted_steps(directory)
    if not steps:
        extra = (f" (step folders {partial} have no commit record {COMMIT_FILE}: interrupted "
                 "saves)" if partial else "")
        raise FileNotFoundError(f"checkpoint directory {directory} holds no checkpoint{extra}")
    if step is None:
        return steps[-1]
    if step not in steps:
        what = ("is an incomplete save (no commit record)" if step in partial
                else "does not exist")
        raise FileNotFoundError(
            f"checkpoint directory {directory}: step {step} {what} (steps: {steps})")
    return step


def _previous(directory: str, step: int) -> str:
    earlier = [s for s in committed_steps(directory) if s < step]
    return (f"use --step={earlier[-1]} (the previous committed step)" if earlier
            else "no earlier committed step exists")


@contextlib.contextmanager
def _reading(directory: str, step: int, what: str) -> Iterator[None]:
    """Turns a failure to read ``what`` of a committed step into :class:`DamagedCheckpointError`."""
    try:
        yield
    except (NoAttributeHeadError, DamagedCheckpointError):
        raise
    except Exception as e:  # noqa: BLE001 (tensorstore and orbax raise many kinds)
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise DamagedCheckpointError(
            f"checkpoint {directory} step {step}: its {what} cannot be read "
            f"({type(e).__name__}: {first}); if the step is damaged, "
            f"{_previous(directory, step)}") from e


def resolve_step(directory: str | os.PathLike, step: int | None = None) -> int:
    """``step`` when ``directory`` holds it; None: the latest step of ``directory``.

    Raises:
      FileNotFoundError: ``directory`` does not exist, holds no checkpoint or not ``step``.
    """
    directory = os.path.abspath(os.fspath(directory))
    manager = open_manager(directory, read_only=True)
    try:
        return _resolve_step(manager, directory, None if step is None else int(step))
    finally:
        manager.close()


def _items_at(manager: ocp.CheckpointManager, step: int) -> set[str]:
    return {k for k, v in manager.item_metadata(step).items() if v is not None}


def _path_name(path: tuple[Any, ...]) -> str:
    """``backbone.bn1.bias`` for a pytree key path (orbax's metadata or an ``nnx.State``; the
    variable's own ``value`` at the end is dropped)."""
    parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    return ".".join(parts[:-1] if parts[-1:] == ["value"] else parts)


def shape_mismatches(stored: Any, built: Any, limit: int = 5) -> list[str]:
    """The arrays whose stored shape differs from the one built, as ``"name: stored [16, 3] ->
    built [32, 3]"`` (at most ``limit``, then a count), from ``manager.item_metadata(step)[item]``
    and the abstract state a restore would fill. Arrays of one side only are left to the
    restore, which names the missing keys itself; checking shapes first spares the user orbax's
    failing asynchronous reads."""
    def shapes(tree: Any) -> dict[str, tuple[int, ...]]:
        return {_path_name(path): tuple(leaf.shape)
                for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
                if hasattr(leaf, "shape")}

    before, now = shapes(stored), shapes(built)
    differ = [f"{name}: stored {list(before[name])} -> built {list(now[name])}"
              for name in sorted(before.keys() & now.keys()) if before[name] != now[name]]
    if len(differ) > limit:
        differ = differ[:limit] + [f"... {len(differ) - limit} more"]
    return differ


def stored_shape_mismatches(manager: ocp.CheckpointManager, step: int,
                            built_items: dict[str, Any]) -> list[str]:
    """:func:`shape_mismatches` of step ``step``'s metadata against ``built_items`` (item name ->
    the state a restore would fill), for the first item that has any; ``[]`` where the metadata
    cannot be read (the restore then names the fault)."""
    try:
        stored = manager.item_metadata(step)
    except Exception:  # noqa: BLE001 (unreadable metadata: the restore names the fault)
        return []
    for name, built in built_items.items():
        differ = shape_mismatches(stored.get(name), built)
        if differ:
            return differ
    return []


def restore_meta(directory: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """The ``meta`` JSON of ``step`` (default: latest) of ``directory``."""
    directory = os.path.abspath(os.fspath(directory))
    manager = open_manager(directory, read_only=True)
    try:
        step = _resolve_step(manager, directory, step)
        with _reading(directory, step, "meta"):
            restored = manager.restore(step, args=ocp.args.Composite(
                **{META_ITEM: ocp.args.JsonRestore()}))
        return dict(restored[META_ITEM])
    finally:
        manager.close()


def has_attribute_head(directory: str | os.PathLike, step: int | None = None) -> bool:
    """Whether ``step`` (default: latest) of ``directory`` holds an attribute head."""
    directory = os.path.abspath(os.fspath(directory))
    manager = open_manager(directory, read_only=True)
    try:
        step = _resolve_step(manager, directory, step)
        return ATTRIBUTE_HEAD_ITEM in _items_at(manager, step)
    finally:
        manager.close()


def _same_model(config: Any, saved_config: dict[str, Any]) -> bool:
    """Whether ``config`` builds the model that ``saved_config`` built (``config.model``)."""
    try:
        ours = json.loads(json.dumps(model_kwargs(config)))
        theirs = json.loads(json.dumps(model_kwargs(ml_collections.ConfigDict(saved_config))))
    except Exception:  # noqa: BLE001 (an unreadable stored config: not the same)
        return False
    return ours == theirs


def restore_model(
    directory: str | os.PathLike,
    config: ml_collections.ConfigDict | None,
    step: int | None = None,
) -> tuple[AGW, dict[str, Any]]:
    """Restores the AGW model of ``step`` (default: latest) of ``directory``.

    The model is built abstractly from ``config.model`` (``config=None``: the config stored in
    ``meta``) and ``meta['num_classes']``, then filled from the checkpoint. It is returned in train
    mode, as constructed: call ``model.eval()`` for inference.

    Returns:
      ``(model, meta)``.
    """
    directory = os.path.abspath(os.fspath(directory))
    manager = open_manager(directory, read_only=True)
    try:
        step = _resolve_step(manager, directory, step)
        with _reading(directory, step, "meta"):
            meta = dict(manager.restore(step, args=ocp.args.Composite(
                **{META_ITEM: ocp.args.JsonRestore()}))[META_ITEM])
        if config is None:
            if "config" not in meta:
                raise ValueError(f"{directory} step {step}: meta has no 'config'; pass config")
            config = ml_collections.ConfigDict(meta["config"])
        num_classes = meta.get("num_classes")
        if not isinstance(num_classes, int):
            raise ValueError(f"{directory} step {step}: meta has no int 'num_classes'")
        abstract = nnx.eval_shape(lambda: AGW.from_config(config, num_classes, nnx.Rngs(0)))
        graphdef, abstract_state = nnx.split(abstract)
        saved_config = meta.get("config") if isinstance(meta.get("config"), dict) else None
        same_model = saved_config is not None and _same_model(config, saved_config)

        def refuse(cause: str) -> ValueError:
            saved = saved_config.get("model") if saved_config else None
            return ValueError(
                f"cannot restore the model of {directory} step {step} into the model built from "
                f"config.model={model_kwargs(config)} (checkpoint's config.model: {saved}): "
                f"{cause}")

        # Shapes first: a clear list, and no failing asynchronous reads.
        if not same_model and (differ := stored_shape_mismatches(
                manager, step, {MODEL_ITEM: abstract_state})):
            raise refuse("arrays of another shape: " + "; ".join(differ))
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                **{MODEL_ITEM: ocp.args.StandardRestore(abstract_state)}))
        except Exception as e:  # noqa: BLE001 (sorted below)
            if same_model or not isinstance(e, (ValueError, KeyError, TypeError)):
                # The model it was saved from is the one built: the files are at fault.
                with _reading(directory, step, "model weights"):
                    raise
            raise refuse(str(e)) from e
        model = nnx.merge(graphdef, restored[MODEL_ITEM])
        return model, meta
    finally:
        manager.close()


def restore_calibration(directory: str | os.PathLike,
                        step: int | None = None) -> Calibration | None:
    """The attribute head's :class:`Calibration` stored with ``step`` (default: latest), or
    None where the head was saved without one (``tools/train_attributes.py`` fits one unless
    ``--calibration_folds=0``)."""
    directory = os.path.abspath(os.fspath(directory))
    meta = restore_meta(directory, step)
    head = meta.get("attribute_head")
    if not isinstance(head, dict) or head.get("calibration") is None:
        return None
    return Calibration.from_json(head["calibration"],
                                 f"{directory}: meta 'attribute_head.calibration'")


def restore_head_accuracy(directory: str | os.PathLike,
                          step: int | None = None) -> dict[str, float | None] | None:
    """The attribute head's balanced accuracy per attribute on the labelled test images,
    stored with ``step`` (default: latest) by ``tools/train_attributes.py`` (None for a value:
    those images show one class only), or None where the head was saved without it (earlier
    versions). ``reid_jax.explain.learned`` says what the report and the explorer make of it.

    Raises:
      ValueError: the stored value is not a mapping of attribute names to numbers in [0, 1]
        or None (naming the checkpoint and the field).
    """
    directory = os.path.abspath(os.fspath(directory))
    meta = restore_meta(directory, step)
    head = meta.get("attribute_head")
    if not isinstance(head, dict) or head.get("test_accuracy") is None:
        return None
    return check_accuracy(head["test_accuracy"],
                          f"{directory}: meta 'attribute_head.test_accuracy'")


def restore_attribute_head(
    directory: str | os.PathLike, step: int | None = None
) -> AttributeHead:
    """Restores the ``AttributeHead`` of ``step`` (default: latest) of ``directory``.

    Raises:
      NoAttributeHeadError: the step has no attribute head (train one with
        tools/train_attributes.py).
    """
    directory = os.path.abspath(os.fspath(directory))
    manager = open_manager(directory, read_only=True)
    try:
        step = _resolve_step(manager, directory, step)
        if ATTRIBUTE_HEAD_ITEM not in _items_at(manager, step):
            raise NoAttributeHeadError(
                f"checkpoint {directory} step {step} has no attribute head "
                f"(items: {sorted(_items_at(manager, step))}). {NO_HEAD_HINT}"
            )
        with _reading(directory, step, "meta"):
            meta = dict(manager.restore(step, args=ocp.args.Composite(
                **{META_ITEM: ocp.args.JsonRestore()}))[META_ITEM])
        dims = meta.get("attribute_head")
        if not isinstance(dims, dict):
            raise ValueError(f"{directory} step {step}: meta has no 'attribute_head' dims")
        abstract = nnx.eval_shape(lambda: AttributeHead(
            dims["embedding_dim"], dims["num_attributes"], rngs=nnx.Rngs(0)))
        graphdef, abstract_state = nnx.split(abstract)
        with _reading(directory, step, "attribute head"):
            restored = manager.restore(step, args=ocp.args.Composite(
                **{ATTRIBUTE_HEAD_ITEM: ocp.args.StandardRestore(abstract_state)}))
        return nnx.merge(graphdef, restored[ATTRIBUTE_HEAD_ITEM])
    finally:
        manager.close()

