#!/usr/bin/env bash
# Download, here (where PyPI is reachable), the wheels the offline GPU machine needs to run the
# peer library, into <repo>/.whl (git-ignored; carried to the GPU machine by the `run` tool).
#
# The GPU image has python 3.12, torch (CUDA), numpy, sympy (a torch dependency), einops,
# jaxtyping (+ wadler-lindig), beartype, torchdiffeq, tqdm, scipy, packaging,
# typing-extensions, pillow, safetensors, accelerate, absl-py, and NO internet.  What the peer
# (transfusion-pytorch==0.20.0) needs beyond that is listed below, pinned to the versions
# setup_peer.sh resolved on the CPU side, with the Requires-Dist of each checked by hand:
#   transfusion-pytorch -> axial-positional-embedding, einx, ema-pytorch, loguru,
#                          rotary-embedding-torch, torch-einops-utils (+ image packages)
#   einx                -> numpy, sympy, frozendict        (frozendict is not in the image)
#   torch-einops-utils  -> einops>=0.8.1                   (einops pinned here in case the image's is older)
#   loguru, ema-pytorch, axial-positional-embedding, rotary-embedding-torch -> image packages only
# beartype is included in case the image lacks it (our library needs it too).
# gpu.sh installs these with `pip install --no-index --no-deps --target ...`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/.whl}"
mkdir -p "$DEST"

WHEELS=(
    transfusion-pytorch==0.20.0
    axial-positional-embedding==0.3.12
    einx==0.4.3
    frozendict==2.5.1
    ema-pytorch==0.8.3
    loguru==0.7.3
    rotary-embedding-torch==0.9.1
    torch-einops-utils==0.2.0
    einops==0.8.2
    beartype==0.23.1
)

for spec in "${WHEELS[@]}"; do
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        -d "$DEST" "$spec" 2> >(grep -v "is ignored: it is neither" >&2)
done

echo "wheels in $DEST:"
ls -1 "$DEST"
