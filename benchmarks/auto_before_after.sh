#!/usr/bin/env bash
# classify --auto before and after a change, side by side in one run, each with a fresh cache:
#   bash benchmarks/auto_before_after.sh BASE_COMMIT
# Data: the hymenoptera photos (train 245 / val 153) and scikit-learn's digits drawn as 224 px PNGs
# (10 classes, 600 train / 200 test, written by benchmarks/bench_heads.py's digit drawing).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
base=${1:?give the commit to compare against}
work=$(mktemp -d)
trap 'git -C "$repo" worktree remove --force "$work/before" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git -C "$repo" worktree add -f "$work/before" "$base" >/dev/null 2>&1
py="$repo/.venv/bin/python"
"$py" - "$work/digits" <<'PY'
import sys
import numpy as np
from pathlib import Path
from PIL import Image
from sklearn.datasets import load_digits
d = load_digits(); rng = np.random.default_rng(0); root = Path(sys.argv[1])
for c in range(10):
    for k, i in enumerate(rng.choice(np.flatnonzero(d.target == c), 80, replace=False)):
        out = root / ("train" if k < 60 else "test") / str(c); out.mkdir(parents=True, exist_ok=True)
        img = np.repeat(np.repeat((d.images[i] / 16 * 255).astype(np.uint8), 28, 0), 28, 1)
        Image.fromarray(255 - img).convert("RGB").save(out / f"{i}.png")
PY
photos="$repo/../shared/data/hymenoptera_data"
cd "$work"  # python -m puts the working directory first on sys.path: not the repository's deepfeat
for data in "$photos/train $photos/val" "$work/digits/train $work/digits/test"; do
  set -- $data
  for side in before after; do
    rm -rf "$work/cache"
    if [ "$side" = before ]; then export PYTHONPATH="$work/before"; else unset PYTHONPATH; fi
    echo "== $side: $1"
    "$py" -m deepfeat classify "$1" --test "$2" --auto --cache-dir "$work/cache" -o "$work/m.joblib" \
      --no-progress 2>&1 | grep -E "^--auto|best head|^test:|^time:"
  done
done
