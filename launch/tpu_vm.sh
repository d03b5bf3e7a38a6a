#!/bin/bash
# Runs main.py on every host of a Cloud TPU VM slice; JAX finds the other hosts itself.
#
#   launch/tpu_vm.sh TPU_NAME ZONE --config=configs/simclr_imagenet.py --workdir=/mnt/runs/r1
#
# The project must be checked out at the same path on every host (REPO_DIR, default
# ~/bigssl_med; a leading ~/ is the remote home, and the path may hold spaces) and
# installed there (pip install -e .). The workdir must be one folder that every host
# sees at the same path: a bucket mounted with gcsfuse on every host (gcsfuse
# --implicit-dirs BUCKET /mnt/runs) or a shared disk. Every host writes its
# data-iterator state there, and runs resume from it. A gs:// URL is refused.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE MAIN_PY_FLAGS..." >&2
  exit 2
fi
tpu=$1; zone=$2; shift 2
repo=${REPO_DIR:-'~/bigssl_med'}
# Quoted for the remote shell; a leading ~/ stays unquoted so that it names the remote home.
case $repo in
  '~') ;;
  '~/'*) repo="~/$(printf %q "${repo#'~/'}")" ;;
  *) repo=$(printf %q "$repo") ;;
esac
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all \
  --command="cd $repo && python main.py$args"
