#!/usr/bin/env bash
# The GPU measurements of the README's Speed section, each part in one call of a few minutes.
#
# On a workstation with the project checked out (and ../shared beside it):
#   bash benchmarks/gpu_session.sh prepare [IMAGES]
#       wheels a bare GPU box lacks (grain, TFDS, ml_collections, clu, ...) into .whl/, and the
#       first IMAGES (default 2500) HAM10000 images of ../shared/data/ham10000, whole lesions,
#       with their masks and metadata rows, into .bench/ham10000_subset/ (both git-ignored).
# On the GPU machine, from the project root (.whl and .bench travel with the tree):
#   bash benchmarks/gpu_session.sh step [OUT [ARGS...]]
#       benchmarks/pretrain_step.py, ResNet-50 at 224, 2 x 256 views, bf16: the default step,
#       then with config.model.fused_bn and config.optimizer.lars_batched_norms both, then
#       each alone; all within 570 s (a variant with under a minute left is skipped).
#   bash benchmarks/gpu_session.sh flags [OUT [ARGS...]]
#       the default step and the step with both switches, each under XLA's cuDNN convolution
#       fusions (--xla_gpu_experimental_enable_conv_fusion: a convolution with its element-wise
#       users and one reduction in one cuDNN graph); each JSON line counts the cuDNN fusions.
#   bash benchmarks/gpu_session.sh checks [OUT [ARGS...]]
#       the numerics tests (augmentation, loss, BatchNorm, models, optimiser) on the GPU: its
#       own lowerings (the fused colour jitter, cuDNN convolutions, GPU arithmetic) against the
#       float64 NumPy references, matmuls at full float32 precision; the 8-device sharding
#       tests are left out (one GPU). About a minute; ARGS go to pytest.
#   bash benchmarks/gpu_session.sh loop [OUT [ARGS...]]
#       benchmarks/input_pipeline.py on the HAM10000 subset: the whole loop (grain decode +
#       crop, device augmentation, step) against the same step on synthetic batches.
# OUT defaults to $OUT, else /tmp/bigssl_med_bench; each part appends JSON lines there and
# prints a summary last. ARGS go to the benchmark script (e.g. a small model for a CPU check:
# step /tmp/b --depth 18 --width 0.25 --image_size 32 --batch 16 --steps 3). PYTHON picks the
# interpreter (default python3).
set -euo pipefail
part=${1:?usage: gpu_session.sh prepare [IMAGES] | step|flags|checks|loop [OUT [ARGS...]]}
subset=.bench/ham10000_subset
py=${PYTHON:-python3}

install_wheels() {  # only where the stack is missing (a bare GPU machine)
  if ! "$py" -c 'import grain, ml_collections, tensorflow_datasets' 2> /dev/null \
      && compgen -G '.whl/*.whl' > /dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
  fi
  export PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2> /dev/null || true
  "$py" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__,
"optax", optax.__version__, jax.devices())'
  "$py" -c 'import google.protobuf as p; print("protobuf", p.__version__)' 2> /dev/null || true
}

# XLA's convolution autotuning results, shared by the step variants (one process each),
# where this jaxlib knows the flag (an unknown XLA flag aborts the process).
autotune_cache() {
  local flag=--xla_gpu_per_fusion_autotune_cache_dir=/tmp/bigssl_med_autotune
  mkdir -p /tmp/bigssl_med_autotune
  if XLA_FLAGS="${XLA_FLAGS:-} $flag" "$py" -c 'import jax; jax.devices()' > /dev/null 2>&1; then
    export XLA_FLAGS="${XLA_FLAGS:-} $flag"
  fi
}

# Runs the step benchmark once per set of switches, all within `budget` seconds; a variant
# that would start with less than a minute left is skipped and says so.
step_variants() {
  local budget=$1 out=$2 deadline left
  shift 2
  deadline=$((SECONDS + budget))
  for flags in "${variants[@]}"; do
    left=$((deadline - SECONDS))
    if [ "$left" -lt 60 ]; then echo "pretrain_step $flags: skipped, ${left}s left"; continue; fi
    # shellcheck disable=SC2086
    timeout "$left" "$py" benchmarks/pretrain_step.py --steps 50 $flags "$@" \
      --out "$out/pretrain_step.jsonl" | tail -1 || echo "pretrain_step $flags: failed"
  done
}

case "$part" in
  prepare)
    images=${2:-2500}
    [ -d ../shared/data/ham10000 ] || { echo "../shared/data/ham10000 not found"; exit 1; }
    compgen -G '.whl/*.whl' > /dev/null || bash ../shared/tools/device-wheels.sh .whl
    compgen -G '.whl/pygments-*.whl' > /dev/null || "$py" -m pip download -q --no-deps \
      --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux2014_x86_64 -d .whl pytest pluggy iniconfig packaging pygments
    rm -rf "$subset" && mkdir -p "$subset/images" "$subset/masks"
    "$py" - "$images" "$subset" <<'EOF'
import csv, os, shutil, sys
limit, out = int(sys.argv[1]), sys.argv[2]
src = '../shared/data/ham10000'
with open(os.path.join(src, 'HAM10000_metadata.csv'), newline='') as f:
  reader = csv.DictReader(f)
  fields, rows = reader.fieldnames, list(reader)
lesions = {}
for row in rows:
  lesions.setdefault(row['lesion_id'], []).append(row)
kept = []
for group in lesions.values():  # whole lesions, so MICLe still sees cases with several images
  if len(kept) + len(group) > limit:
    break
  kept += group
with open(os.path.join(out, 'HAM10000_metadata.csv'), 'w', newline='') as f:
  writer = csv.DictWriter(f, fieldnames=fields)
  writer.writeheader()
  writer.writerows(kept)
for row in kept:
  shutil.copy(os.path.join(src, 'images', row['image_id'] + '.jpg'), os.path.join(out, 'images'))
  shutil.copy(os.path.join(src, 'masks', row['image_id'] + '_segmentation.png'),
              os.path.join(out, 'masks'))
print(f'{len(kept)} images of {len(set(r["lesion_id"] for r in kept))} lesions in {out}')
EOF
    du -sh .whl "$subset"
    ;;
  step)
    out=${2:-${OUT:-/tmp/bigssl_med_bench}}
    shift $(( $# > 1 ? 2 : 1 ))
    mkdir -p "$out"
    install_wheels
    autotune_cache
    variants=('' '--fused_bn --lars_batched_norms' '--fused_bn' '--lars_batched_norms')
    step_variants 570 "$out" "$@"
    ;;
  flags)
    out=${2:-${OUT:-/tmp/bigssl_med_bench}}
    shift $(( $# > 1 ? 2 : 1 ))
    mkdir -p "$out"
    install_wheels
    autotune_cache
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_experimental_enable_conv_fusion=true"
    variants=('' '--fused_bn --lars_batched_norms')
    step_variants 570 "$out" "$@"
    ;;
  checks)
    out=${2:-${OUT:-/tmp/bigssl_med_bench}}
    shift $(( $# > 1 ? 2 : 1 ))
    mkdir -p "$out"
    install_wheels
    "$py" -c 'import jax; print("tests on", jax.default_backend(), jax.devices())'
    JAX_DEFAULT_MATMUL_PRECISION=highest timeout 540 "$py" -m pytest -q -p no:cacheprovider \
      tests/test_augment.py tests/test_losses.py tests/test_batch_norm.py tests/test_models.py \
      tests/test_optim.py -k 'not sharded and not sharding' --junitxml "$out/gpu_checks.xml" \
      "$@" 2>&1 | tail -60 || true
    ;;
  loop)
    out=${2:-${OUT:-/tmp/bigssl_med_bench}}
    shift $(( $# > 1 ? 2 : 1 ))
    mkdir -p "$out"
    [ -d "$subset" ] || { echo "$subset missing: run 'gpu_session.sh prepare' first"; exit 1; }
    install_wheels
    timeout 540 "$py" benchmarks/input_pipeline.py --manual_dir "$subset" \
      --data_dir /tmp/bigssl_med_tfds --workers 12 --steps 30 "$@" \
      --out "$out/input_pipeline.jsonl"
    ;;
  *)
    echo "unknown part '$part': prepare, step, flags, checks or loop"; exit 2 ;;
esac
