#!/usr/bin/env bash
# Convert an existing GGUF model into a ripple-packed GGUF, then print what was stored.
#   scripts/convert_model.sh SRC.gguf DST.gguf [ripple-gguf convert options...]
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 SRC.gguf DST.gguf [ripple-gguf convert options]" >&2
    exit 2
fi
src=$1 dst=$2
shift 2
ripple-gguf convert "$src" "$dst" "$@"
ripple-gguf inspect "$dst"
