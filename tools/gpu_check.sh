#!/usr/bin/env bash
# GPU readiness check: installs what a GPU run needs, then measures, in one command,
#
#   1. training throughput of the full AGW (configs/agw_market1501.py, 256x128) at batch 64 and
#      256, float32 and bfloat16: images/s, step time, peak device memory (tools/bench_train.py);
#   2. test-set embedding extraction, end to end (JPEG decode, resize, forward), of a
#      Market-sized synthetic split (19,732 gallery + 3,368 query images, tools/make_synthetic.py)
#      (tools/bench_extract.py);
#   3. the explain kernels and rank_metrics at Market size (3,368 x 19,732 x 2,048 x 30) with the
#      default and the HIGHEST matmul precision: time and max error on near-duplicate pairs
#      (tools/bench_explain.py);
#
# and writes OUT/gpu_check.json (every measurement) and OUT/gpu_check.md (a table with the goals
# of one H200-class GPU: >= 2,500 train images/s in bfloat16, extraction >= 10,000 images/s,
# explain at Market size under 1 s). What each part measures: docs/scaling.md, "GPU check".
#
#   bash tools/gpu_check.sh                     # on the GPU machine, from the repository root
#   bash tools/gpu_check.sh --wheels=DIR        # offline: install from carried wheels
#   bash tools/gpu_check.sh --smoke             # every part at toy size, CPU is fine (a test)
#
# Options: --out=DIR (default gpu_check_out), --python=PY (default: .venv/bin/python, created
# with python3 -m venv when missing), --wheels=DIR, --no_install, --smoke.
#
# Installing: with internet, `pip install -e . "jax[cuda12]==<the installed jax version>"`.
# Without (the GPU machine may have none), carry the wheels: on a machine with internet, the same
# OS / CPU architecture and Python version as the GPU machine,
#   python -m pip download -d wheels . "jax[cuda12]==0.10.2" pytest
# copy wheels/ next to the repository, and run `bash tools/gpu_check.sh --wheels=wheels`, which
# installs with `pip install --no-index --find-links=wheels` (nothing is fetched).
set -euo pipefail

OUT=gpu_check_out
PY=""
WHEELS=""
SMOKE=0
INSTALL=1
for arg in "$@"; do
  case "$arg" in
    --out=*) OUT="${arg#*=}" ;;
    --python=*) PY="${arg#*=}" ;;
    --wheels=*) WHEELS="${arg#*=}" ;;
    --smoke) SMOKE=1 ;;
    --no_install) INSTALL=0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (see the header of $0)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
start=$(date +%s)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
log() { echo "[gpu_check $(( $(date +%s) - start ))s] $*" >&2; }

# ----------------------------------------------------------------------------- install
if [[ -z "$PY" ]]; then
  if [[ ! -x .venv/bin/python ]]; then
    log "creating .venv"
    python3 -m venv .venv
  fi
  PY=.venv/bin/python
fi
if [[ $INSTALL == 1 && $SMOKE == 0 ]]; then
  if "$PY" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
    log "jax already sees a GPU; nothing to install"
  else
    version=$("$PY" -c "import jax; print(jax.__version__)" 2>/dev/null || echo "0.10.2")
    if [[ -n "$WHEELS" ]]; then
      log "installing from $WHEELS (offline)"
      "$PY" -m pip install --no-index --find-links="$WHEELS" -e . "jax[cuda12]==$version"
    else
      log "installing jax[cuda12]==$version and the project"
      "$PY" -m pip install -e . "jax[cuda12]==$version"
    fi
  fi
fi
"$PY" -c "import jax; print('devices:', jax.devices())" >&2

# ----------------------------------------------------------------------------- sizes
if [[ $SMOKE == 1 ]]; then
  TRAIN_CONFIG=configs/agw_tiny.py; TRAIN_BATCHES="8"; TRAIN_STEPS=1; TRAIN_WARMUP=0
  EVAL_BATCH=8
  SYNTH=(--num_train_ids=2 --num_test_ids=3 --images_per_id=5 --num_distractors=2 --num_junk=1)
  EXTRACT=(--config=configs/agw_tiny.py --batch_size=8 --num_workers=1)
  EXPLAIN=(--num_query=16 --num_gallery=64 --dim=32 --num_attributes=4 --k=3 --pairs_queries=4
           --repeats=1 --maps_config=configs/agw_tiny.py --noisolate)
else
  TRAIN_CONFIG=configs/agw_market1501.py; TRAIN_BATCHES="64 256"; TRAIN_STEPS=10; TRAIN_WARMUP=2
  EVAL_BATCH=256
  # 750 test ids x 19 images (queries included) + distractors + junk: Market's 19,732 gallery and
  # 3,368 query images; 2 train ids (the split is not used).
  SYNTH=(--num_train_ids=2 --num_test_ids=750 --images_per_id=19 --num_distractors=2793
         --num_junk=3819)
  WORKERS=$(nproc)
  EXTRACT=(--config=configs/agw_market1501.py --batch_size=512 --num_workers="$WORKERS"
           --backend=grain --dtype=bfloat16)
  EXPLAIN=()
fi

# ----------------------------------------------------------------------------- 1. training
for dtype in float32 bfloat16; do
  for batch in $TRAIN_BATCHES; do
    log "train: $TRAIN_CONFIG batch $batch $dtype"
    # The model-only extraction forward once per dtype (bench_extract.py times it end to end).
    extraction=$([[ $batch == 64 && $SMOKE == 0 ]] && echo true || echo false)
    "$PY" tools/bench_train.py --configs="$TRAIN_CONFIG" --batch_size="$batch" --dtype="$dtype" \
      --steps="$TRAIN_STEPS" --warmup="$TRAIN_WARMUP" --extraction="$extraction" \
      --eval_batch_size="$EVAL_BATCH" --json="$OUT/train_${dtype}_${batch}.json" > "$OUT/train_${dtype}_${batch}.log"
  done
done

# ----------------------------------------------------------------------------- 2. extraction
if [[ ! -f "$OUT/synthetic/done" ]]; then
  log "writing the synthetic split"
  rm -rf "$OUT/synthetic"
  "$PY" tools/make_synthetic.py --output_dir="$OUT/synthetic" "${SYNTH[@]}" \
    --num_workers="$(nproc)" > "$OUT/synthetic.log"
  touch "$OUT/synthetic/done"
fi
log "extraction"
"$PY" tools/bench_extract.py --data_root="$OUT/synthetic" "${EXTRACT[@]}" \
  --json="$OUT/extract.json" > "$OUT/extract.log"

# ----------------------------------------------------------------------------- 3. explain
for precision in default highest; do
  log "explain: precision $precision"
  # The attribute maps once, at full precision.
  maps=$([[ $precision == highest ]] && echo --maps || echo --nomaps)
  "$PY" tools/bench_explain.py "${EXPLAIN[@]}" --precision="$precision" "$maps" \
    --json="$OUT/explain_${precision}.json" > "$OUT/explain_${precision}.log"
done

# ----------------------------------------------------------------------------- report
"$PY" - "$OUT" "$SMOKE" "$(( $(date +%s) - start ))" <<'EOF'
import glob, json, os, sys

out, smoke, seconds = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
train = []
for path in sorted(glob.glob(os.path.join(out, "train_*.json"))):
    train.extend(json.load(open(path)))
extract = json.load(open(os.path.join(out, "extract.json")))
explain = {}
for p in ("default", "highest"):
    measured = json.load(open(os.path.join(out, f"explain_{p}.json")))
    explain[p] = {**measured["kernels"], "precision": measured["precision"],
                  "rank_metrics": measured.get("rank_metrics", {}),
                  "maps": measured.get("maps")}
import jax
report = {"device": jax.devices()[0].device_kind, "smoke": smoke, "seconds": seconds,
          "train": train, "extract": extract, "explain": explain}
json.dump(report, open(os.path.join(out, "gpu_check.json"), "w"), indent=1)

bf16 = [r["images_per_s"] for r in train if r["dtype"] == "bfloat16"]
explain_s = explain["highest"]["seconds"]["explain"]
lines = [f"# GPU check on {report['device']}{' (smoke: toy sizes)' if smoke else ''}, "
         f"{seconds} s", "",
         "| train | batch | dtype | images/s | step s | peak GiB | compile s |",
         "|---|---|---|---|---|---|---|"]
for r in train:
    lines.append(f"| {r['config']} {r['image']} | {r['batch']} | {r['dtype']} | "
                 f"{r['images_per_s']} | {r['step_s']} | {r['peak_memory_gib']} | "
                 f"{r['compile_s']} |")
lines += ["", "| extraction | images | seconds | images/s |", "|---|---|---|---|"]
for r in extract["rows"]:
    lines.append(f"| {r['split']} ({r['source']}, {r['backend']} x{r['workers']}, "
                 f"{r['dtype']}, batch {r['batch']}) | {r['images']} | {r['seconds']} | "
                 f"{r['images_per_s']} |")
for r in train:
    if "extract_images_per_s" in r:
        lines.append(f"| forward only, random images ({r['dtype']}, batch "
                     f"{r['extract_batch']}) | - | {r['extract_batch_s']} per batch | "
                     f"{r['extract_images_per_s']} |")
lines += ["", "| explain (Q x G) | precision | explain_rankings s | distance GEMM s | "
          "attribute_errors auto s | max rel. error near-duplicates (auto) | rank_metrics s |",
          "|---|---|---|---|---|---|---|"]
for p, e in explain.items():
    s, size = e["seconds"], e["sizes"]
    rm = e.get("rank_metrics", {}).get("vectorised_s")
    rm = "-" if rm is None else f"{rm:.3f}"
    lines.append(f"| {size['Q']} x {size['G']} | {p} | {s['explain']:.4f} | "
                 f"{s['distance_gemm']:.4f} | {s['errors_auto']:.4f} | "
                 f"{e['max_relative_error']['auto']['near_pairs']:.1e} | {rm} |")
maps = explain["highest"].get("maps")
if maps:
    lines += ["", "| attribute maps (top-k of one query, both images) | image | A | seconds | "
              "ratio to one forward |", "|---|---|---|---|---|"]
    sec = maps["seconds"]
    lines.append(f"| evidence + contribution maps, top-{maps['k']} | {maps['height']}x"
                 f"{maps['width']} | {maps['A']} | {sec['evidence'] + sec['contributions']:.4f} | "
                 f"{maps['ratio_to_forward']:.1f}x |")
goals = [("train bf16 >= 2,500 images/s", max(bf16) if bf16 else 0, max(bf16 or [0]) >= 2500),
         ("extraction >= 10,000 images/s", extract["images_per_s"],
          extract["images_per_s"] >= 10000),
         ("explain at Market size < 1 s (HIGHEST)", explain_s, explain_s < 1.0)]
lines += ["", "| goal | measured | met |", "|---|---|---|"]
lines += [f"| {g} | {v:.4g} | {'yes' if ok else 'NO'} |" for g, v, ok in goals]
open(os.path.join(out, "gpu_check.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
log "done: $OUT/gpu_check.json, $OUT/gpu_check.md"
