"""An op carries its facts (rows, redirect, example, strategy), and the custom op
``torch.ops.mamba_ir.<op>`` checks and allocates like ``mamba_ir.ops.<op>``.

No annotations import from __future__ here: the toy op's schema is inferred from real
annotations."""

import random
from collections.abc import Iterator

import pytest
import torch

import mamba_ir
from mamba_ir import checks, get_op, ops
from mamba_ir.op import REGISTRY, Redirect, Rows, RowSpec, register_op

EXAMPLE_OPS = sorted(name for name, op in REGISTRY.items() if op.example is not None)


def _example(name: str) -> dict:
    op = get_op(name)
    return op.bind(**op.example(torch.device("cpu"), torch.float32))


def _clone(call: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in call.items()}


def _destinations(call: dict, op) -> str:
    """The index argument that names the call's destination rows."""
    spec = op.rows
    return spec.write if call[spec.write] is not None else spec.read


# -- 1. torch.ops.mamba_ir.<op> checks like mamba_ir.ops.<op> ---------------------------


def _duplicate_destination(call: dict, op) -> None:
    name = _destinations(call, op)
    call[name] = call[name].clone()
    call[name][1] = call[name][0]


def _row_out_of_range(call: dict, op) -> None:
    name = _destinations(call, op)
    call[name] = call[name].clone()
    call[name][0] = call[op.rows.primary].shape[0] + 5


def _float_indices(call: dict, op) -> None:
    name = _destinations(call, op)
    call[name] = call[name].float()


BAD = {
    "distinct destination rows": _duplicate_destination,
    "rows in [0,": _row_out_of_range,
    "dtype in (int32, int64)": _float_indices,
}


@pytest.mark.parametrize("words", sorted(BAD))
@pytest.mark.parametrize("name", EXAMPLE_OPS)
def test_custom_op_raises_the_same_error_as_the_python_entry_point(name, words):
    op = get_op(name)
    call = _example(name)
    BAD[words](call, op)
    with pytest.raises(ValueError, match=r"\S+: expected ") as by_ops:
        getattr(ops, name)(**_clone(call))
    before = _clone(call)
    with pytest.raises(ValueError) as by_torch:
        getattr(torch.ops.mamba_ir, name)(**call)
    assert str(by_torch.value) == str(by_ops.value)
    assert words in str(by_ops.value)
    for arg in op.mutates_args:  # checked before anything is written
        if call[arg] is not None:
            assert torch.equal(call[arg], before[arg]), f"{arg} changed"


@pytest.mark.parametrize("name", sorted(n for n, op in REGISTRY.items() if op.allocate))
def test_custom_op_without_out_advances_the_state_like_the_python_entry_point(name):
    op = get_op(name)
    call = {**_example(name), **{out: None for out in op.allocate}}
    state = op.rows.primary
    by_ops, by_torch = _clone(call), _clone(call)
    returned = getattr(ops, name)(**by_ops)
    assert isinstance(returned, torch.Tensor)
    assert getattr(torch.ops.mamba_ir, name)(**by_torch) is None  # schema: returns nothing
    rows = torch.tensor(sorted(op.rows_of(call).written_rows(call["pad_slot_id"])))
    assert not torch.equal(by_torch[state][rows], call[state][rows]), "state did not advance"
    assert torch.equal(by_torch[state], by_ops[state])


def test_value_checks_run_once_per_eager_call(monkeypatch):
    op = get_op("selective_state_update")
    seen = []
    check = op._value_check
    monkeypatch.setattr(op, "_value_check", lambda call: (seen.append(1), check(call)))
    ops.selective_state_update(**_example("selective_state_update"))
    assert len(seen) == 1


def _capturing(monkeypatch) -> None:
    """What ``torch.cuda.is_current_stream_capturing()`` says inside ``torch.cuda.graph``."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


def test_no_value_check_under_cuda_graph_capture(monkeypatch):
    state = torch.randn(6, 3)
    src, dup = torch.tensor([0, 1]), torch.tensor([4, 4])
    with pytest.raises(ValueError, match="distinct destination rows"):
        torch.ops.mamba_ir.copy_state_blocks(state, src, dup)
    _capturing(monkeypatch)
    torch.ops.mamba_ir.copy_state_blocks(state, src, dup)  # reading dup would sync: skipped
    ops.copy_state_blocks(state, src, dup)
    with pytest.raises(ValueError, match="dst: expected 2 rows"):  # metadata: still checked
        torch.ops.mamba_ir.copy_state_blocks(state, src, torch.tensor([4]))


def _copy_twice(state, src, dst):
    ops.copy_state_blocks(state, src, dst)
    return state + 0


def test_graphs_compiled_with_the_passes_do_not_check():
    """The passes lower to provider ops, which trust the caller; without the passes the
    graph calls the custom op, whose kernel checks."""
    state, src, good, dup = torch.randn(6, 3), torch.tensor([0, 1]), torch.tensor([2, 3]), \
        torch.tensor([4, 4])
    torch._dynamo.reset()
    lowered = mamba_ir.compile(_copy_twice, dynamic=False)
    lowered(state.clone(), src, good)
    lowered(state.clone(), src, dup)  # not checked
    torch._dynamo.reset()
    plain = torch.compile(_copy_twice, dynamic=False)
    plain(state.clone(), src, good)
    with pytest.raises(ValueError, match="distinct destination rows"):
        plain(state.clone(), src, dup)
    torch._dynamo.reset()


# -- 2. a fifth op: declared here, found everywhere --------------------------------------


def _toy_rows(call: dict) -> Rows:
    n = call["x"].shape[0]
    dst = torch.arange(n) if call["dst"] is None else call["dst"][:n]
    src = dst if call["src"] is None else call["src"][:n]
    every = torch.ones(n, dtype=torch.bool)
    return Rows(src, every, dst[:, None], every[:, None])


def toy_decay(
    state: torch.Tensor,
    x: torch.Tensor,
    src: torch.Tensor | None = None,
    dst: torch.Tensor | None = None,
    pad_slot_id: int = -1,
) -> None:
    """``state[dst[i]] = state[src[i]] / 2 + x[i]`` (zeros for a pad source)."""
    n = x.shape[0]
    dst = torch.arange(n) if dst is None else dst[:n]
    src = dst if src is None else src[:n]
    h = torch.zeros_like(x)
    reads = src != pad_slot_id
    h[reads] = state[src[reads]]
    keep = dst != pad_slot_id
    state[dst[keep]] = (h / 2 + x)[keep]


def _toy_strategy(device: str, sizes) -> object:
    from hypothesis import strategies as st

    from mamba_ir.testing import assign_rows

    @st.composite
    def draw(draw_fn):
        n, pad = draw_fn(st.integers(0, sizes.max_seqs)), draw_fn(st.sampled_from([-1, 0]))
        seed = draw_fn(st.integers(0, 2**31 - 1))
        rows = assign_rows(random.Random(seed), [1] * n, redirect=True, pad=pad)
        gen = torch.Generator().manual_seed(seed)
        return {
            "state": torch.randn(rows.nslots, 3, generator=gen).to(device),
            "x": torch.randn(n, 3, generator=gen).to(device),
            "src": torch.tensor(rows.src, dtype=torch.long, device=device),
            "dst": torch.tensor([r[0] for r in rows.dst], dtype=torch.long, device=device),
            "pad_slot_id": pad,
        }

    return draw()


def _toy_fast(state, x, src=None, dst=None, pad_slot_id=-1):
    n = x.shape[0]
    dst = torch.arange(n) if dst is None else dst[:n]
    src = dst if src is None else src[:n]
    old = torch.where((src != pad_slot_id)[:, None], state[src.clamp(min=0)], 0.0)
    keep = dst != pad_slot_id
    state.index_copy_(0, dst[keep], (old * 0.5 + x)[keep])


def _toy_sloppy(state, x, src=None, dst=None, pad_slot_id=-1):
    """Right in the rows it should write; also zeroes each source row it does not write."""
    _toy_fast(state, x, src, dst, pad_slot_id)
    if src is not None:
        n = x.shape[0]
        state[src[:n][(src[:n] != pad_slot_id) & (src[:n] != dst[:n])]] = 0


@pytest.fixture(scope="module")
def toy() -> Iterator[mamba_ir.IrOp]:
    op = register_op(
        mutates_args=("state",),
        rows=RowSpec("state", "src", "dst", _toy_rows),
        redirect=Redirect(bounds=None),
    )(toy_decay)

    @op.register_check
    def _check(call):
        checks.tensor(call, "state", ndim=2)
        checks.tensor(call, "x", shape=(call["x"].shape[0], call["state"].shape[1]))

    @op.register_value_check
    def _check_values(call):
        for name in ("src", "dst"):
            if call[name] is not None:
                checks.rows_in_range(name, call[name], call["state"].shape[0], call["pad_slot_id"])

    op.register_example(lambda device, dtype: {
        "state": torch.zeros(5, 3, dtype=dtype, device=device),
        "x": torch.ones(2, 3, dtype=dtype, device=device),
        "src": torch.tensor([0, 0], device=device), "dst": torch.tensor([1, 2], device=device),
    })
    op.register_strategy(_toy_strategy)
    op.register_impl("toy_fast", _toy_fast, platforms=("cpu",))
    op.register_impl("toy_sloppy", _toy_sloppy, platforms=())
    yield op
    del REGISTRY[op.name]


def test_a_new_op_checks_its_row_rules_from_its_row_spec(toy):
    state = torch.zeros(5, 3)
    with pytest.raises(ValueError, match="dst: expected distinct destination rows"):
        toy(state, torch.ones(2, 3), dst=torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="src: expected no source row that another entry"):
        torch.ops.mamba_ir.toy_decay(state, torch.ones(2, 3), torch.tensor([2, 0]),
                                     torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match="distinct destination rows"):
        toy.device_check(toy.bind(state, torch.ones(2, 3), dst=torch.tensor([3, 3])))
    toy(state, torch.ones(2, 3), src=torch.tensor([4, -1]), dst=torch.tensor([1, 2]))
    assert state[1:3].eq(1).all() and state[[0, 3, 4]].eq(0).all()


def test_check_impl_reads_a_new_ops_rows_and_strategy(toy):
    from mamba_ir.testing import check_impl

    assert check_impl(toy, "toy_fast", max_examples=25) >= 1
    with pytest.raises(AssertionError, match=r"changed state row \d+, which the call does not "
                       r"write \(a source row the call reads\)"):
        check_impl(toy, "toy_sloppy", max_examples=25)


def test_the_cli_lists_a_new_op(toy, capsys):
    from mamba_ir.cli import main

    assert main(["ops", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "\ntoy_decay\n  priority : toy_fast, native\n  chosen   : toy_fast\n" in out


def _copy_then_toy(state, x, src, dst):
    ops.copy_state_blocks(state, src, dst)
    torch.ops.mamba_ir.toy_decay(state, x, dst=dst)
    return state + 0


def test_align_fusion_folds_a_copy_into_a_new_op(toy):
    state, x = torch.randn(8, 3), torch.randn(3, 3)
    src, dst = torch.tensor([5, -1, 6]), torch.tensor([0, 1, 2])
    want = _copy_then_toy(state.clone(), x, src, dst)
    torch._dynamo.reset()
    compiled = mamba_ir.compile(_copy_then_toy, dynamic=False)
    got = compiled(state.clone(), x, src, dst)
    torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    copy, step = compiled.lowering_report
    assert (copy.op, copy.fused, copy.provider) == ("copy_state_blocks", True, None)
    assert (step.op, step.fused, step.provider) == ("toy_decay", True, "toy_fast")


def test_row_spec_names_must_be_the_ops_arguments():
    def misnamed(state: torch.Tensor, idx: torch.Tensor, pad_slot_id: int = -1) -> None:
        pass

    with pytest.raises(ValueError, match=r"expected argument names of the op .*\['dst'\]"):
        register_op(mutates_args=("state",),
                    rows=RowSpec("state", "idx", "dst", _toy_rows))(misnamed)
    assert "misnamed" not in REGISTRY


def test_declaring_the_ops_imports_no_hypothesis():
    """The ops name their strategies; hypothesis (the testing extra) loads when one is drawn."""
    import subprocess
    import sys

    code = ("import sys, mamba_ir; assert 'hypothesis' not in sys.modules; "
            "mamba_ir.get_op('copy_state_blocks').strategy('cpu', None); "
            "assert 'hypothesis' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_fusion_table_in_passes_md_names_every_redirect_ops_indices():
    """docs/passes.md summarises the ops' declared redirects; a new or changed declaration
    without its row there fails here."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "passes.md").read_text()
    rows = {line.split("|")[1].strip(" `"): line for line in text.splitlines()
            if line.startswith("| `")}
    declared = [op for op in REGISTRY.values()
                if op.redirect is not None and op.native.__module__.startswith("mamba_ir.ops.")]
    assert len(declared) >= 5
    for op in declared:
        assert op.name in rows, f"docs/passes.md: no row for {op.name}"
        cells = [c.strip(" `") for c in rows[op.name].split("|")]
        assert cells[2:4] == [op.rows.read, op.rows.write], op.name


def test_calls_bind_without_the_signature(monkeypatch):
    # inspect's parameters are a mappingproxy: TorchDynamo (torch 2.11) stops tracing at one
    # in any frame that mutated a dict, which split a compiled transformers model into a
    # graph per op and a recompile per layer. Binding reads only plain tuples and dicts.
    op = get_op("copy_state_blocks")

    class Unreadable:
        def __getattr__(self, name: str) -> None:
            raise AssertionError(f"signature.{name} read while binding a call")

    monkeypatch.setattr(op, "signature", Unreadable())

    def step(state: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        op(state, src=src, dst=dst, pad_slot_id=-1)

    state = torch.arange(12.0).view(4, 3)
    step(state, torch.tensor([0]), torch.tensor([1]))
    torch.compile(step, fullgraph=True, backend="eager")(
        state, torch.tensor([0]), torch.tensor([2]))
    assert torch.equal(state[1], state[0]) and torch.equal(state[2], state[0])
    with pytest.raises(TypeError, match="unexpected keyword argument 'rows'"):
        op(state, rows=1)
