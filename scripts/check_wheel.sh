#!/usr/bin/env bash
# A user's first steps from a wheel, outside the repository: build the wheel, install it
# with the `testing` and `hf` extras into a fresh virtual environment, then run
# `mamba-ir --version`, `mamba-ir ops`, the provider and passes guides' examples and
# `mamba-ir demo --model DIR` on a saved tiny random Bamba, from a folder holding no source.
#
# The dependencies (torch, hypothesis, transformers, ...) are not downloaded again: the
# fresh environment sees the packages of the development environment (.venv) through a
# .pth file naming a folder of links to them, mamba-ir itself left out, and pip installs
# with --no-index, so every requirement of the wheel and its extras must already be met
# by a package that is installed, not by the source tree. The extras' contents are
# checked against the modules' imports in tests/test_packaging.py.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export TORCHINDUCTOR_CACHE_DIR=$WORK/inductor  # a first compile, as a new user's is

echo "== wheel"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" "$ROOT"
WHEEL=$(ls "$WORK"/dist/mamba_ir-*.whl)
echo "$WHEEL"

echo "== fresh venv sharing the development environment's dependencies"
"$PY" -m venv --without-pip "$WORK/venv"  # pip and setuptools come shared, as the rest
SITE_DEV=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
SITE_NEW=$("$WORK/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
mkdir "$WORK/shared"
for entry in "$SITE_DEV"/*; do
    case "$(basename "$entry")" in
        mamba_ir*|__editable__*mamba_ir*|*.pth) ;;  # the package under test, startup hooks
        *) ln -s "$entry" "$WORK/shared/" ;;
    esac
done
echo "$WORK/shared" > "$SITE_NEW/_shared_dependencies.pth"
# and the folders the development environment's .pth files put on its path (a virtual
# environment whose packages live in another folder), unless mamba_ir is found there
"$PY" - "$SITE_DEV" >> "$SITE_NEW/_shared_dependencies.pth" <<'PYEOF'
import os
import subprocess
import sys
bare = subprocess.run([sys.executable, "-S", "-c", "import sys; print(*sys.path, sep=chr(10))"],
                      capture_output=True, text=True, check=True).stdout.splitlines()
for entry in sys.path[1:]:
    if (entry not in bare and entry != sys.argv[1] and os.path.isdir(entry)
            and not os.path.exists(os.path.join(entry, "mamba_ir"))):
        print(entry)
PYEOF
"$WORK/venv/bin/python" -m pip install -q --no-index --find-links "$WORK/dist" \
    "mamba-ir[testing,hf]"

mkdir "$WORK/user" && cd "$WORK/user"
VPY=$WORK/venv/bin/python
BIN=$WORK/venv/bin
"$VPY" - "$WORK/venv" <<'PYEOF'
import sys
import mamba_ir
assert mamba_ir.__file__.startswith(sys.argv[1]), f"imported from {mamba_ir.__file__}"
print("mamba_ir", mamba_ir.__version__, "from", mamba_ir.__file__)
PYEOF

echo "== mamba-ir --version"
"$BIN/mamba-ir" --version | tee version.txt
grep -q "^mamba-ir $("$VPY" -c 'import mamba_ir; print(mamba_ir.__version__)')$" version.txt

echo "== mamba-ir ops"
"$BIN/mamba-ir" ops --device cpu > ops.txt
grep -c "chosen   :" ops.txt

# the provider guide (registration, decisions, check_impl from the testing extra) and
# the passes guide (a compile through the installed passes), as a reader pastes them
for doc in providers passes; do
    echo "== docs/$doc.md, as written"
    "$VPY" - "$ROOT" "docs/$doc.md" <<'PYEOF'
import sys
sys.path.insert(0, f"{sys.argv[1]}/tests")
from test_docs import blocks  # the doc tests' reading of a page (markers included)
run = [b for b in blocks(sys.argv[2]) if b.lang == "python" and not b.marker]
assert run, "no python blocks"
namespace = {"__name__": "__main__"}
for block in run:
    exec(compile(block.code, block.where, "exec"), namespace)
print(f"{len(run)} blocks ran")
PYEOF
done

echo "== mamba-ir demo --model DIR (a saved tiny random Bamba)"
"$VPY" - "$WORK/bamba" <<'PYEOF'
import sys
import torch
import transformers
config = transformers.BambaConfig(
    vocab_size=128, hidden_size=64, num_hidden_layers=2, attn_layer_indices=[1],
    mamba_n_heads=4, mamba_d_state=16, mamba_n_groups=1, mamba_d_conv=4,
    intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
)
torch.manual_seed(0)
transformers.BambaForCausalLM(config).save_pretrained(sys.argv[1])
PYEOF
# eager dispatch: compiling from the installed package is what the passes guide did above,
# and a compile of the demo's two steps would add a minute or two of CI time
"$BIN/mamba-ir" demo --model "$WORK/bamba" --no-compile --conversations 2 --turns 2 \
    --new-tokens 4 --system-tokens 12 --block-size 8 | tee demo.txt
grep -q "agreement with the eager native model" demo.txt

echo "== mamba-ir bench outside a clone says what it needs"
if "$BIN/mamba-ir" bench --plot-only --out e2e.json 2> bench.txt; then
    echo "bench ran outside a clone?" && exit 1
fi
cat bench.txt
grep -q "needs the benchmarks/ folder of a clone" bench.txt
echo "wheel check passed"
