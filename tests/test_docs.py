"""Every code block of README.md and docs/*.md runs as written, and prints what it shows.

The blocks of one page run in order in one namespace, as a reader would paste them:

- ```` ```python ````: executed; with ``>>>`` prompts, run as a doctest (the output shown is
  checked, ``...`` matching anything);
- ```` ```console ````: ``$ mamba-ir ...`` lines run the CLI; the lines below are its output;
- ```` ```toml ````: parsed;
- untagged and ```` ```text ```` blocks are not code (signatures, diagrams, output).

An HTML comment on the line before a block changes that:

- ``<!-- doc-test: output -->``: the block is what the block before it printed (checked);
- ``<!-- doc-test: gpu -->``: needs CUDA; runs in the ``gpu`` test, with the page's other
  blocks before it;
- ``<!-- doc-test: skip (why) -->``: not run; the reason is required (e.g. ``make`` targets
  that build a virtual environment).

Anything else (a ```` ```bash ```` block without a marker, an unknown language, an output
block with nothing before it) fails, so a new block is either run or says why it is not.
"""

from __future__ import annotations

import contextlib
import doctest
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import mamba_ir

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
MARKER = re.compile(r"<!--\s*doc-test:\s*(\w+)\s*(.*?)\s*-->")
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
TEXT = ("", "text")
SHELL = ("bash", "sh", "shell")


@dataclass
class Block:
    doc: str
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str = ""  # "", "output", "gpu" or "skip"
    reason: str = ""

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def blocks(doc: str) -> list[Block]:
    """The fenced blocks of ``doc`` with the marker on the line before each."""
    lines = (ROOT / doc).read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, lang = opening.groups()
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        code = "\n".join(line.removeprefix(indent) for line in lines[i + 1:end]) + "\n"
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.search(before)
        block = Block(doc, i + 1, lang, code)
        if marker:
            block.marker, block.reason = marker.group(1), marker.group(2).strip("() ")
        found.append(block)
        i = end + 1
    return found


def _check_output(block: Block, want: str, got: str) -> None:
    if not doctest.OutputChecker().check_output(want, got, FLAGS):
        pytest.fail(f"{block.where}: the block shows\n{want}\nbut the code printed\n{got}")


def _run_python(block: Block, namespace: dict) -> str:
    if ">>>" in block.code:
        test = doctest.DocTestParser().get_doctest(block.code, namespace, block.where,
                                                   block.doc, block.line)
        report = io.StringIO()
        runner = doctest.DocTestRunner(optionflags=FLAGS, verbose=False)
        runner.run(test, out=report.write, clear_globs=False)
        if runner.failures:
            pytest.fail(f"{block.where}: the transcript does not match\n{report.getvalue()}")
        return ""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(block.code, block.where, "exec"), namespace)
    return printed.getvalue()


def _run_console(block: Block) -> None:
    commands = [i for i, line in enumerate(block.code.splitlines()) if line.startswith("$ ")]
    lines = block.code.splitlines()
    for k, i in enumerate(commands):
        argv = shlex.split(lines[i][2:])
        assert argv[0] == "mamba-ir", f"{block.where}: only mamba-ir commands are run"
        done = subprocess.run([sys.executable, "-m", "mamba_ir", *argv[1:]], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{block.where}: {lines[i]}\n{done.stderr}"
        stop = commands[k + 1] if k + 1 < len(commands) else len(lines)
        want = "\n".join(lines[i + 1:stop]).strip()
        if want:
            _check_output(block, want + "\n", done.stdout)


def run_doc(doc: str, *, gpu: bool) -> int:
    """Run every block of ``doc`` (GPU blocks only when ``gpu``); how many ran."""
    namespace: dict = {"__name__": "__doc_example__"}
    printed: str | None = None
    ran = 0
    for block in blocks(doc):
        if block.marker == "skip":
            assert block.reason, f"{block.where}: a skipped block says why"
            continue
        if block.marker == "output":
            assert printed is not None, f"{block.where}: output of which block?"
            _check_output(block, block.code, printed)
            printed = None
            continue
        assert block.marker in ("", "gpu"), f"{block.where}: unknown marker {block.marker!r}"
        if block.marker == "gpu" and not gpu:
            printed = None
            continue
        printed = None
        if block.lang == "python":
            printed = _run_python(block, namespace)
        elif block.lang == "console":
            _run_console(block)
        elif block.lang == "toml":
            if tomllib is not None:
                tomllib.loads(block.code)
        elif block.lang in SHELL:
            pytest.fail(f"{block.where}: a {block.lang} block runs nothing in the tests: write "
                        "it as a console block of mamba-ir commands or mark it skip (why)")
        elif block.lang not in TEXT:
            pytest.fail(f"{block.where}: unknown block language {block.lang!r}")
        else:
            continue
        ran += 1
    return ran


@pytest.fixture
def clean_state(monkeypatch: pytest.MonkeyPatch):
    """Examples register providers and compile: leave the registry and Dynamo as they were.
    They run as a user's process would, without the test suite's Triton interpreter."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    before = {name: dict(op.impls) for name, op in mamba_ir.REGISTRY.items()}
    cwd = os.getcwd()
    yield
    os.chdir(cwd)
    torch._dynamo.reset()
    for name, op in mamba_ir.REGISTRY.items():
        op.impls.clear()
        op.impls.update(before.get(name, {}))


@pytest.mark.parametrize("doc", DOCS)
def test_examples_run(doc: str, clean_state: None) -> None:
    run_doc(doc, gpu=False)


GPU_DOCS = [doc for doc in DOCS if any(b.marker == "gpu" for b in blocks(doc))]


@pytest.mark.gpu
@pytest.mark.parametrize("doc", GPU_DOCS)
def test_gpu_examples_run(doc: str, clean_state: None) -> None:
    run_doc(doc, gpu=True)


def test_a_broken_block_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness itself: an edited example that no longer runs or prints is caught."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    cases = {
        "raises.md": "```python\nimport mamba_ir\nmamba_ir.no_such_function()\n```\n",
        "prints.md": "```python\nprint(1 + 1)\n```\n<!-- doc-test: output -->\n```\n3\n```\n",
        "transcript.md": "```python\n>>> 1 + 1\n3\n```\n",
        "shell.md": "```bash\nmake demo\n```\n",
        "reasonless.md": "<!-- doc-test: skip -->\n```bash\nmake demo\n```\n",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises((pytest.fail.Exception, AssertionError, AttributeError)):
            run_doc(name, gpu=False)
    (tmp_path / "good.md").write_text(
        "<!-- doc-test: skip (builds .venv) -->\n```bash\nmake demo\n```\n"
        "```python\nx = 2\nprint(x * 21)\n```\n<!-- doc-test: output -->\n```\n42\n```\n"
        "```python\n>>> x + 1\n3\n```\n<!-- doc-test: gpu -->\n```python\nboom\n```\n"
    )
    assert run_doc("good.md", gpu=False) == 2


def test_every_doc_is_covered() -> None:
    """A new page under docs/ is picked up, and each page's code blocks are seen."""
    assert {"README.md", "docs/providers.md", "docs/passes.md"} <= set(DOCS)
    assert sum(b.lang == "python" for b in blocks("README.md")) >= 5
