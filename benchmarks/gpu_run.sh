#!/usr/bin/env bash
# The GPU measurement of issue 17 (item 5) as ONE script, for a lent GPU machine that has python3 +
# torch + CUDA + transformers/peft/accelerate/huggingface_hub/safetensors but no diffusers and no
# network. Run from the repository root:
#
#   bash benchmarks/gpu_wheels.sh                        # here, once: wheels -> .device_wheels/
#   DRY_RUN=1 PYTHON=.venv/bin/python bash benchmarks/gpu_run.sh   # here: tiny model, 64 px, cpu
#   bash benchmarks/gpu_run.sh                           # on the GPU machine (carry .device_wheels
#                                                        # and benchmarks/.release/src)
#
# Steps, in priority order (a step starts only while BUDGET_S seconds have not passed; each is
# cut at the remaining time; a failed step is recorded and the next one runs):
#   1. facts (GPU, driver, torch, Python) and the carried wheels installed into a --target folder
#   2. benchmarks/latency.py eager fp16 at 512 1024 2048, then compiled fp16 at 512 (the goals:
#      2048² within 8 GiB, 512² ≤ 12 ms compiled fp16)
#   3. eager bf16 at 512 1024 2048, compiled bf16 at 512
#   4. the release's forward (its fp16 mode) beside codsr's pipe() (fp16, bf16) on the same random
#      weights: benchmarks/release_compare.py --device cuda --size 512
#   5. compiled fp16 / bf16 at 1024 2048; the tiny preview decoder (fp16, eager) at 512 2048
# All latency runs: --channels-last (weights), SDPA attention (diffusers' default), CUDA events.
#
# Output under $OUT (at most 8 files come back from the device): gpu_run.log, steps.tsv
# (step, rc, seconds), latency_cuda.json (every latency run merged), release_compare.json.
#
# Environment: OUT, PYTHON (python3), DRY_RUN (0), BUDGET_S (520), SIZES, DTYPES ("fp16 bf16"),
#   REPEATS (5), WARMUP (2), RELEASE (1: run step 4), RELEASE_FROM_WHEELS (DRY_RUN: 0 = use the
#   local benchmarks/.release venv), WHEELS (.device_wheels), SITE, RELEASE_SITE.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
root="$PWD"
OUT="${OUT:-$root/gpu_out}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_run.log") 2>&1
PY="$(realpath -s "$(command -v "${PYTHON:-python3}")")"  # absolute: the release runs elsewhere
DRY="${DRY_RUN:-0}"
BUDGET_S="${BUDGET_S:-520}"
WHEELS="${WHEELS:-$root/.device_wheels}"
SITE="${SITE:-/tmp/codsr_gpu_site}"
RELEASE_SITE="${RELEASE_SITE:-/tmp/codsr_gpu_release_site}"
PARTS="$(mktemp -d /tmp/codsr_gpu_parts.XXXX)"
export OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The release's transformers 4.36 imports jax when it finds it; the device's jax fails to initialise.
export USE_FLAX=0 USE_TF=0
t_start=$(date +%s)

if [ "$DRY" = 1 ]; then
    DEVICE=cpu; TINY=(--tiny); SIZES="${SIZES:-64}"; REPEATS="${REPEATS:-1}"; WARMUP="${WARMUP:-1}"
    THREADS="${THREADS:-2}"; REL_SIZE=64; REL_DTYPES=(fp32); OUR_DTYPES=(fp32 bf16)
else
    DEVICE=cuda; TINY=(); SIZES="${SIZES:-512 1024 2048}"; REPEATS="${REPEATS:-5}"; WARMUP="${WARMUP:-2}"
    THREADS="${THREADS:-$(nproc)}"; REL_SIZE=512; REL_DTYPES=(fp16); OUR_DTYPES=(fp16 bf16)
fi
DTYPES="${DTYPES:-fp16 bf16}"
read -r -a size_list <<< "$SIZES"
first_size="${size_list[0]}"
rest_sizes=("${size_list[@]:1}")
echo "gpu_run.sh: DRY_RUN=$DRY device=$DEVICE sizes=$SIZES dtypes=$DTYPES repeats=$REPEATS warmup=$WARMUP budget=${BUDGET_S}s"
printf 'step\trc\tseconds\n' > "$OUT/steps.tsv"

elapsed() { echo $(( $(date +%s) - t_start )); }
merge() {  # every latency JSON so far -> $OUT/latency_cuda.json (partial results survive a kill)
    "$PY" - "$PARTS" "$OUT/latency_cuda.json" <<'EOF'
import json, pathlib, sys
parts, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
runs = {}
for p in sorted(parts.glob("*.json")):
    try:
        runs[p.stem] = json.loads(p.read_text())
    except ValueError:
        pass
tmp = out.with_suffix(".tmp")
tmp.write_text(json.dumps({"schema_version": 1, "runs": runs}, indent=1))
tmp.replace(out)
EOF
}
step() {  # step NAME CMD...: run under the remaining budget; record rc and seconds
    local name="$1"; shift
    local left=$(( BUDGET_S - $(elapsed) ))
    if [ "$left" -lt 20 ]; then
        echo "== $name: SKIPPED (budget spent)"; printf '%s\tskipped\t0\n' "$name" >> "$OUT/steps.tsv"; return
    fi
    echo "== $name ($(elapsed) s in, ${left} s left): $*"
    local t0; t0=$(date +%s)
    timeout --signal=INT --kill-after=15 "$left" "$@"
    local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$OUT/steps.tsv"
    [ "$rc" = 0 ] || echo "== $name: FAILED rc=$rc"
    merge
}

# ------------------------------------------------------------------ 1. facts and wheels
"$PY" - <<'EOF'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, cuda {torch.version.cuda}, "
      f"available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
if ! "$PY" -c "import diffusers" 2>/dev/null || [ "$DRY" = 1 ]; then
    ls "$WHEELS"/main/*.whl >/dev/null 2>&1 || { echo "no wheels in $WHEELS/main: run benchmarks/gpu_wheels.sh"; exit 2; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/main/*.whl || exit 2
fi
export PYTHONPATH="$root/src:$SITE"
"$PY" -c "import diffusers, transformers, peft, codsr; from codsr import CODSRPipeline; \
print('codsr side: diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" || exit 3

# ------------------------------------------------------------------ 2./3. latency.py, eager + compiled
lat=("$PY" "$root/benchmarks/latency.py" --device "$DEVICE" --repeats "$REPEATS" --warmup "$WARMUP"
     --channels-last "${TINY[@]}")
for dt in $DTYPES; do
    step "eager_$dt" "${lat[@]}" --dtypes "$dt" --sizes "${size_list[@]}" --out "$PARTS/eager_$dt.json"
    step "compiled_${dt}_$first_size" "${lat[@]}" --compile --no-flops --dtypes "$dt" --sizes "$first_size" \
        --out "$PARTS/compiled_${dt}_$first_size.json"
done

# ------------------------------------------------------------------ 4. the release beside pipe()
if [ "${RELEASE:-1}" = 1 ]; then
    rdir="$root/benchmarks/.release"
    if [ "$DRY" != 1 ] || [ "${RELEASE_FROM_WHEELS:-0}" = 1 ] || [ ! -x "$rdir/venv/bin/python" ]; then
        # a "venv" whose python is this python with the release's pins first on sys.path
        rdir="$(mktemp -d /tmp/codsr_gpu_release.XXXX)"
        if [ -f "$root/benchmarks/.release/src/codsr.py" ] && ls "$WHEELS"/release/*.whl >/dev/null 2>&1; then
            ln -s "$root/benchmarks/.release/src" "$rdir/src"
            cp "$root/benchmarks/.release/COMMIT" "$rdir/COMMIT" 2>/dev/null
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target "$RELEASE_SITE" "$WHEELS"/release/*.whl
            mkdir -p "$rdir/venv/bin"
            printf '#!/bin/sh\nPYTHONPATH="%s" exec "%s" "$@"\n' "$RELEASE_SITE" "$PY" > "$rdir/venv/bin/python"
            chmod +x "$rdir/venv/bin/python"
        else
            echo "== release: benchmarks/.release/src or $WHEELS/release missing (release_env.sh, gpu_wheels.sh)"
        fi
    fi
    if [ -x "$rdir/venv/bin/python" ] && env -u PYTHONPATH "$rdir/venv/bin/python" -c "import diffusers, transformers, peft, torch; \
print('release side: diffusers', diffusers.__version__, 'transformers', transformers.__version__, \
'peft', peft.__version__, 'torch', torch.__version__)"; then
        step release_compare "$PY" "$root/benchmarks/release_compare.py" --device "$DEVICE" --size "$REL_SIZE" \
            --repeats "$REPEATS" --warmup 1 --threads "$THREADS" --dtypes "${OUR_DTYPES[@]}" \
            --release-dtypes "${REL_DTYPES[@]}" --release-dir "$rdir" --weights-dir /tmp/codsr_gpu_weights \
            --out "$OUT/release_compare.json" "${TINY[@]}"
    else
        printf 'release_compare\tunavailable\t0\n' >> "$OUT/steps.tsv"
    fi
fi

# ------------------------------------------------------------------ 5. the rest
if [ "${#rest_sizes[@]}" -gt 0 ]; then
    for dt in $DTYPES; do
        step "compiled_${dt}_rest" "${lat[@]}" --compile --no-flops --dtypes "$dt" --sizes "${rest_sizes[@]}" \
            --out "$PARTS/compiled_${dt}_rest.json"
    done
fi
first_dt="${DTYPES%% *}"
tiny_sizes=("$first_size"); [ "${#rest_sizes[@]}" -gt 0 ] && tiny_sizes+=("${size_list[-1]}")
step "tiny_decoder_$first_dt" "${lat[@]}" --decoder tiny --no-flops --dtypes "$first_dt" --sizes "${tiny_sizes[@]}" \
    --out "$PARTS/tiny_decoder_$first_dt.json"

merge
echo "== done in $(elapsed) s"
cat "$OUT/steps.tsv"
