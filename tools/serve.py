r"""Serves the interactive explorer of a run: query, steer and explain a gallery in the browser.

  python tools/serve.py --run_dir=demo_run            # then open http://127.0.0.1:8000
  python tools/serve.py --checkpoint=WORKDIR/checkpoints --data_root=DATA \
      [--cache_dir=OUT/embeddings] [--host=127.0.0.1] [--port=8000]

--run_dir is a folder laid out as tools/demo.py makes it: RUN/train/checkpoints (with an
attribute head), RUN/data (the Market-1501-layout data root) and RUN/explain/embeddings (the
embedding cache of tools/explain.py, reused as it is). --checkpoint, --data_root and --cache_dir
replace single parts of it, or give them all without --run_dir.

The embeddings are loaded onto the device once; every kernel a first request needs is compiled
before the server starts listening. The server binds to 127.0.0.1 and answers only requests
whose Host is a loopback name (see docs/explorer.md, "Security", before using --host).
The API is in README.md ("Explorer") and reid_jax/explorer/app.py.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from reid_jax import cli
from reid_jax.explorer import uploads

_RUN_DIR = flags.DEFINE_string(
    "run_dir", None, "A run folder as tools/demo.py writes it (train/checkpoints, data, "
    "explain/embeddings).")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Orbax checkpoint directory with an attribute head (default: "
    "RUN_DIR/train/checkpoints).")
_DATA_ROOT = flags.DEFINE_string(
    "data_root", None, "Market-1501-layout folder (default: RUN_DIR/data, else the config's "
    "data.root).")
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", None, "Embedding cache folder (default: RUN_DIR/explain/embeddings, else "
    "CHECKPOINT/embedding_cache); '' disables it.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "The model's config file (default: the config stored in the checkpoint).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind to.")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on.")
_ALLOWED_HOSTS = flags.DEFINE_list(
    "allowed_hosts", None, "Host header values answered (default: 127.0.0.1, localhost, ::1 "
    "and --host).")
_MAX_UPLOAD_BYTES = flags.DEFINE_integer(
    "max_upload_bytes", uploads.DEFAULT_MAX_BYTES, "Largest uploaded image, in bytes.")
_MAX_UPLOAD_PIXELS = flags.DEFINE_integer(
    "max_upload_pixels", uploads.DEFAULT_MAX_PIXELS, "Largest uploaded image, in pixels.")
_MAX_UPLOADS = flags.DEFINE_integer("max_uploads", 64, "Uploads kept in memory.")
_K = flags.DEFINE_integer("k", None, "Default ranks shown (config.explain.k).")
_THRESHOLD = flags.DEFINE_string("threshold", None,
                                 "Default threshold t (config.explain.threshold).")
_MODE = flags.DEFINE_string("mode", None, "Default error mode (config.explain.mode).")
_ACCESS_LOG = flags.DEFINE_bool("access_log", False, "Log every request.")


def _paths() -> tuple[str, str | None, str | None]:
    run = _RUN_DIR.value
    checkpoint = _CHECKPOINT.value or (run and os.path.join(run, "train", "checkpoints"))
    if not checkpoint:
        raise app.UsageError("give --run_dir or --checkpoint")
    data_root = _DATA_ROOT.value or (run and os.path.join(run, "data"))
    cache_dir = _CACHE_DIR.value
    if cache_dir is None and run:
        cache_dir = os.path.join(run, "explain", "embeddings")
    return checkpoint, data_root, cache_dir


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import uvicorn  # imported here: --help stays fast

    from reid_jax import embeddings
    from reid_jax.explain import settings
    from reid_jax.explorer import app as explorer_app
    from reid_jax.explorer.rankings import Explorer

    checkpoint, data_root, cache_dir = _paths()
    try:
        config = embeddings.restore_config(checkpoint, _CONFIG.value)
        data_root = embeddings.resolve_data_root(data_root, config, checkpoint)
        cache = embeddings.cache_dir_option(cache_dir, checkpoint)
        opts = settings.explain_settings(config, k=_K.value, threshold=_THRESHOLD.value,
                                         mode=_MODE.value)
        started = time.monotonic()
        explorer = Explorer.from_checkpoint(
            checkpoint, data_root, cache_dir=cache, config=config, explain_settings=opts,
            max_uploads=_MAX_UPLOADS.value, max_upload_pixels=_MAX_UPLOAD_PIXELS.value)
        loaded = time.monotonic() - started
        warm = explorer.warm()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"tools/serve.py: error: {e}")
    hosts = list(_ALLOWED_HOSTS.value or [*explorer_app.LOOPBACK_HOSTS, _HOST.value])
    if not _is_loopback(_HOST.value):
        logging.warning("binding to %s: the explorer has no authentication; anyone who can "
                        "reach this address can use it and see the images", _HOST.value)
    web = explorer_app.create_app(explorer, max_upload_bytes=_MAX_UPLOAD_BYTES.value,
                                  allowed_hosts=hosts)
    host = f"[{_HOST.value}]" if ":" in _HOST.value else _HOST.value
    print(f"explorer of {checkpoint} on {data_root}: {len(explorer.queries_split)} queries, "
          f"{len(explorer.gallery_split)} gallery images (loaded in {loaded:.1f} s, kernels "
          f"compiled in {warm:.1f} s)", flush=True)
    print(f"open http://{host}:{_PORT.value}/   (Ctrl-C stops it)", flush=True)
    uvicorn.run(web, host=_HOST.value, port=_PORT.value, log_level="warning",
                access_log=_ACCESS_LOG.value)


if __name__ == "__main__":
    cli.run(main)
