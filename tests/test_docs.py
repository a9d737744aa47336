"""The Python examples in README.md and docs/providers.md run as written (CPU)."""

import re
from pathlib import Path

import pytest

import mamba_ir

ROOT = Path(__file__).resolve().parent.parent


def _examples(path: Path) -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    # interactive transcripts show output, and CUDA examples need a GPU
    return [b for b in blocks if ">>>" not in b and '"cuda"' not in b]


@pytest.mark.parametrize("doc", ["README.md", "docs/providers.md"])
def test_examples_run(doc):
    before = {name: dict(op.impls) for name, op in mamba_ir.REGISTRY.items()}
    namespace: dict = {}
    try:
        for block in _examples(ROOT / doc):
            exec(compile(block, doc, "exec"), namespace)
    finally:  # examples register providers: leave the registry as it was
        for name, op in mamba_ir.REGISTRY.items():
            op.impls.clear()
            op.impls.update(before[name])
