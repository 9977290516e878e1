"""How the ``tools/*.py`` entry points run: absl flags, and every user error as one line.

``cli.run(main)`` replaces ``absl.app.run(main)``. It parses the flags (and the configs of
``ml_collections`` config flags) and runs ``main``; what goes wrong because of the user's input
ends the program with one line on stderr, ``tools/NAME.py: error: ...``, and exit status 1
(2 for bad flags), instead of a traceback:

* a config override that names no field (``--config.optim.lr=0.1``): the field and the nearest
  valid names; a config file that does not exist or does not load: the file;
* ``ValueError`` (bad values, shapes, a checkpoint without head), ``FloatingPointError``
  (training diverged), ``FileNotFoundError``,
  ``FileExistsError``, ``PermissionError``, a folder where a file is expected or the reverse,
  and the project's image errors: their message;
* a full disk (``ENOSPC`` anywhere in the exception's chain, whatever library raised it): "no
  space left on device" and where; the process ends at once, so background writer threads do
  not bury the message in shutdown noise (committed checkpoints are complete; see
  ``docs/design.md``, "Outputs");
* Ctrl-C: one line, exit status 130 (a tool that saves work on interruption, such as
  ``tools/train.py``, says where it saved before), also when it lands in a finaliser or a
  garbage-collection callback, which Python would report with a traceback of its own.

Anything else is a bug and keeps its traceback. ``REID_JAX_TRACEBACK=1`` shows the traceback of
user errors too.

Libraries' routine chatter is left out of the tools' logs: orbax-checkpoint's INFO lines (a
dozen per checkpoint read or written, two thirds of a demo's log), its warning that a manager
opened read-only is read-only, and JAX's note that no TPU is present. Their other warnings
and errors still show, and ``--verbosity=1`` (``-v 1``) shows everything.
"""

from __future__ import annotations

import errno
import importlib.util
import logging as std_logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import app, flags, logging
from ml_collections import config_flags

from reid_jax import config_sections
from reid_jax.data.augment import ImageLoadError

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError,
               IsADirectoryError, NotADirectoryError, ImageLoadError, FloatingPointError)
DISK_FULL_TEXT = "No space left on device"


def define_checkpoint_flags(checkpoint_help: str) -> tuple[Any, Any, Any]:
    """``--checkpoint`` (required; ``checkpoint_help`` says what it must hold), ``--config`` and
    ``--data_root`` with one meaning in every tool that reads a trained model: the config and the
    data root default to the ones stored in the checkpoint. Returns the three flag holders."""
    checkpoint = flags.DEFINE_string("checkpoint", None, checkpoint_help, required=True)
    config = config_flags.DEFINE_config_file(
        "config", None, "The model's config file (default: the config stored in the checkpoint).")
    data_root = flags.DEFINE_string(
        "data_root", None, "Market-1501-layout folder (default: the config's data.root).")
    return checkpoint, config, data_root


def define_map_path_flags() -> tuple[Any, Any, Any]:
    """``--map_method``, ``--map_layer`` and ``--map_reference_images`` (how the attribute maps
    are computed, where they are taken and what they start from), shared by the tools that compute
    maps; returns the three flag holders."""
    method = flags.DEFINE_enum(
        "map_method", None, ["integrated_gradients", "deeplift"],
        "How the maps are computed: deeplift (one backward pass, exact) or integrated_gradients "
        "(--map_steps nodes) (config.explain.map_method, deeplift).")
    layer = flags.DEFINE_integer(
        "map_layer", None, "Stage whose output the maps are taken at, 1..4 (4: the last feature "
        "map; config.explain.map_layer, 2).")
    reference = flags.DEFINE_integer(
        "map_reference_images", None, "The maps' baseline is the mean feature map of this "
        "many gallery images, 0: zeros (config.explain.map_reference_images).")
    return method, layer, reference


def _program() -> str:
    path = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else "reid_jax"
    parent = os.path.basename(os.path.dirname(path))
    return f"{parent}/{os.path.basename(path)}" if parent == "tools" else os.path.basename(path)


def fail(message: str, status: int = 1) -> NoReturn:
    """Ends the program with ``tools/NAME.py: error: message`` on stderr."""
    sys.stdout.flush()
    print(f"{_program()}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def disk_full(error: BaseException) -> BaseException | None:
    """The exception of ``error``'s chain that says the disk is full, or None."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return e
        if DISK_FULL_TEXT.lower() in str(e).lower():
            return e
    return None


def _disk_full_line(e: BaseException) -> str:
    where = getattr(e, "filename", None)
    return (f"no space left on device{f' while writing {where}' if where else ''}; free space "
            "and run the same command again (finished files and committed checkpoints are "
            "intact)")


# ---------------------------------------------------------------------------------------------
# Config flags: name the field or the file at fault.


def _config_flags() -> list[Any]:
    return [flag for flag in flags.FLAGS._flags().values()
            if isinstance(flag, config_flags.config_flags._ConfigFlag)]


def _config_path(flag: Any, argv: Sequence[str]) -> str | None:
    """The file a config flag names on the command line (``--config=path[:arg]``)."""
    for arg in argv:
        for prefix in (f"--{flag.name}=", f"-{flag.name}="):
            if arg.startswith(prefix):
                return arg[len(prefix):].split(":", 1)[0]
    return None


def _load_config(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("_config_for_message", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def unknown_config_field(config: Any, dotted: str) -> str | None:
    """For an override ``dotted`` (``optim.lr``) of ``config``: a message naming the first
    missing field and the nearest valid names, or None when the path exists."""
    node, walked = config, []
    for part in dotted.split("."):
        keys = [str(k) for k in node.keys()] if hasattr(node, "keys") else []
        if part not in keys:
            where = "config" + "".join(f".{p}" for p in walked)
            return config_sections.unknown_field_message(where, part, keys)
        node, walked = node[part], [*walked, part]
    return None


def _explain_config_error(argv: Sequence[str], error: BaseException) -> str | None:
    for flag in _config_flags():
        path = _config_path(flag, argv)
        if path is None:
            continue
        if not os.path.isfile(path):
            return f"--{flag.name}: config file {os.path.abspath(path)} does not exist"
        try:
            config = _load_config(path)
        except Exception as e:  # noqa: BLE001 (any failure of the user's file)
            return f"--{flag.name}: config file {path} does not load: {type(e).__name__}: {e}"
        for arg in argv:
            prefix = f"--{flag.name}."
            if arg.startswith(prefix):
                dotted = arg[len(prefix):].split("=", 1)[0]
                message = unknown_config_field(config, dotted)
                if message:
                    return f"{arg.split('=', 1)[0]}: {message}"
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """``absl.flags.FLAGS(argv)``, with config-flag errors named in one line."""
    try:
        remaining = flags.FLAGS(argv)
    except flags.Error as e:
        fail(f"{e}. Pass --helpshort for the flags.", status=2)
    except (AttributeError, KeyError, OSError, TypeError) as e:
        fail(_explain_config_error(argv, e) or f"{type(e).__name__}: {e}", status=2)
    for flag in _config_flags():
        path = _config_path(flag, argv)
        if path is not None and not os.path.isfile(path):
            fail(f"--{flag.name}: config file {os.path.abspath(path)} does not exist", status=2)
    return remaining


# ---------------------------------------------------------------------------------------------
# Running main.


# One report at a time on stderr: a Python thread's traceback (orbax's writers fail in their
# own threads when the disk fills) waits for the one-line error, which holds the lock to the end.
# Reentrant: a thread's hook may itself end the program with the line.
_STDERR_LOCK = threading.RLock()


def _last_words(line: str) -> NoReturn:
    """Writes ``line`` as the program's last output on stderr and ends it with status 1, at
    once: the storage library's own threads print tracebacks straight to the stderr file
    descriptor while they shut down, so that descriptor goes to /dev/null first and the line
    goes to a copy of it."""
    with _STDERR_LOCK:
        sys.stdout.flush()
        sys.stderr.flush()
        stderr = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        time.sleep(0.05)  # writes already under way land before the line
        os.write(stderr, (line + "\n").encode())
        os._exit(1)


def _report(error: BaseException) -> NoReturn:
    if os.environ.get("REID_JAX_TRACEBACK"):
        traceback.print_exception(error)
    full = disk_full(error)
    if full is not None:  # background writers must not bury the line under shutdown noise
        _last_words(f"{_program()}: error: {_disk_full_line(full)}")
    if isinstance(error, KeyboardInterrupt):
        fail("interrupted", status=130)
    if isinstance(error, USER_ERRORS):
        message = str(error)
        if isinstance(error, OSError) and error.filename and str(error.filename) not in message:
            message = f"{error.strerror or message}: {error.filename}"
        fail(message or type(error).__name__)
    raise error


def wrap(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
    """``main`` with user errors reported as one line (see the module docstring)."""
    def wrapped(argv: list[str]) -> Any:
        try:
            return main(argv)
        except SystemExit:
            raise
        except app.UsageError as e:
            fail(str(e), status=2)
        except BaseException as e:  # noqa: BLE001 (sorted into user errors and bugs)
            _report(e)

    return wrapped


def _unraisable_hook(unraisable: Any) -> None:
    """Ctrl-C that lands in a finaliser or a garbage-collection callback (JAX runs one at
    every collection) is not raised but printed as "Exception ignored in ..." with a
    traceback; the interruption is reported as its one line anyway, so drop that print.
    Everything else keeps Python's report."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        return
    sys.__unraisablehook__(unraisable)


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    """A full disk in a background writer (orbax saves asynchronously) ends the program with
    the one line at once; other thread errors keep Python's report."""
    if args.exc_value is not None and disk_full(args.exc_value) is not None:
        _report(args.exc_value)
    with _STDERR_LOCK:
        threading.__excepthook__(args)


class _LibraryChatter(std_logging.Filter):
    """Drops records logged from inside orbax below WARNING, and its warning that a manager we
    opened read-only on purpose is read-only, unless ``--verbosity`` >= 1."""

    _PACKAGE = f"{os.sep}orbax{os.sep}"
    _EXPECTED = ("Given directory is read only",)

    def filter(self, record: std_logging.LogRecord) -> bool:
        if logging.get_verbosity() >= 1 or self._PACKAGE not in record.pathname:
            return True
        if record.levelno < std_logging.WARNING:
            return False
        return not str(record.msg).startswith(self._EXPECTED)


def quiet_library_logs() -> None:
    """Leaves the libraries' routine INFO lines out of the log (see the module docstring)."""
    absl_logger = logging.get_absl_logger()
    if not any(isinstance(f, _LibraryChatter) for f in absl_logger.filters):
        absl_logger.addFilter(_LibraryChatter())
    if logging.get_verbosity() < 1:
        std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.WARNING)


def run(main: Callable[[list[str]], Any]) -> None:
    """``absl.app.run(main)`` with one-line user errors (flags, configs, inputs, disk) and
    without the libraries' routine INFO lines."""
    threading.excepthook = _thread_excepthook
    sys.unraisablehook = _unraisable_hook

    def main_quietly(argv: list[str]) -> Any:
        quiet_library_logs()  # after flag parsing: --verbosity is known
        return main(argv)

    app.run(wrap(main_quietly), flags_parser=parse_flags)


__all__ = ["DISK_FULL_TEXT", "USER_ERRORS", "define_checkpoint_flags", "define_map_path_flags",
           "disk_full", "fail", "parse_flags", "quiet_library_logs", "run",
           "unknown_config_field", "wrap"]
