#!/usr/bin/env bash
# Download the peers' pure-Python wheels, and the pure-Python packages they import that the GPU
# machine's image lacks, into .whl/ (git-ignored), for the GPU session's `carry`:
#
#   bash benchmarks/fetch_peer_wheels.sh [DEST]     # ~3 MB; DEST defaults to .whl
#
# The GPU machine has no network; its image has torch, triton, transformers, accelerate, pandas,
# pyarrow, ... (benchmarks/gpu_image_packages.txt) but not these. `gpu_session.py` installs them
# there with `pip install --no-deps --target` and its dry run checks, with every package the
# image lacks hidden, that each peer imports from these wheels alone:
#   cut-cross-entropy, liger-kernel  need only torch and triton;
#   trl                              its fused head (trl/kernels/chunked_logprob.py) imports
#                                    torch, packaging, transformers, but its backward imports
#                                    trl.trainer.utils: accelerate, pandas, huggingface_hub
#                                    (on the image) and datasets (not);
#   datasets                         needs dill and multiprocess (not on the image); pyarrow,
#                                    xxhash, fsspec, pandas are.
# Two downloads: CPython 3.12 on x86-64 Linux (the GPU machine) and this interpreter (the dry
# run); only multiprocess ships one wheel per Python version. Pinned: what the dry run checked.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
peers=(cut-cross-entropy==25.1.1 liger-kernel==0.8.5 trl==1.16.0
       datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
mkdir -p "$dest"
rm -f "$dest"/*.whl  # one version of each: a stale pin would make two
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
  -d "$dest" "${peers[@]}"
"$python" -m pip download --quiet --no-deps --only-binary=:all: -d "$dest" "${peers[@]}"
ls -1 "$dest"
du -sh "$dest"
