"""Argument validation shared by the ops: every failure names the argument and what was expected.

Metadata (shape, dtype, device, layout) is checked on every call, traced ones included.
Index *values* are checked only where they can be read without tracing, that is in eager
calls; all checks run before anything is written. The ``assert_*`` helpers check the same
value rules on the device without a host sync (``torch._assert_async``): the checked mode
of compiled graphs runs them (``IrOp.register_device_check``).

Per-sequence index tensors may hold more entries than the call has sequences (vLLM pads
them to a CUDA-graph batch size); the entries past the sequences are ignored, never read.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import types
import typing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def fail(name: str, expected: str, got: object) -> None:
    raise ValueError(f"{name}: expected {expected}, got {got}")


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')} on {t.device}"


def tensor(
    call: dict[str, Any],
    name: str,
    *,
    shape: Sequence[int] | None = None,
    ndim: int | Iterable[int] | None = None,
    dtypes: Sequence[torch.dtype] | None = FLOAT_DTYPES,
    device: torch.device | None = None,
    optional: bool = False,
) -> torch.Tensor | None:
    """Check one tensor argument and return it (``None`` when optional and absent)."""
    t = call[name]
    if t is None:
        if not optional:
            fail(name, "a tensor", "None")
        return None
    if not isinstance(t, torch.Tensor):
        fail(name, "a tensor", type(t).__name__)
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            fail(name, f"{' or '.join(map(str, allowed))} dimensions", _describe(t))
    if shape is not None and tuple(t.shape) != tuple(shape):
        fail(name, f"shape {tuple(shape)}", _describe(t))
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        fail(name, f"dtype in ({names})", _describe(t))
    if device is not None and t.device != device:
        fail(name, f"a tensor on {device}", _describe(t))
    return t


def index(
    call: dict[str, Any],
    name: str,
    *,
    ndim: int | Iterable[int] = 1,
    rows: int | None = None,
    padded: bool = False,
    min_cols: int = 0,
    device: torch.device | None = None,
    optional: bool = True,
    dtypes: Sequence[torch.dtype] = INDEX_DTYPES,
) -> torch.Tensor | None:
    """Check an integer index tensor (int32 or int64) with ``rows`` entries along dim 0
    (at least ``rows`` when ``padded``: one per sequence, then ignored padding) and, when
    2-D, at least ``min_cols`` columns."""
    t = tensor(call, name, ndim=ndim, dtypes=dtypes, device=device, optional=optional)
    if t is None:
        return None
    if rows is not None and (t.shape[0] < rows if padded else t.shape[0] != rows):
        want = f"at least {rows}" if padded else f"{rows}"
        fail(name, f"{want} rows (one per sequence)", _describe(t))
    if t.dim() == 2 and t.shape[1] < min_cols:
        fail(name, f"at least {min_cols} column{'s' if min_cols > 1 else ''}", _describe(t))
    return t


def sequences(t: torch.Tensor | None, count: int) -> torch.Tensor | None:
    """The entries of a per-sequence tensor that belong to the call's ``count`` sequences."""
    return None if t is None else t[:count]


def enough_rows(call: dict[str, Any], state: str, indices: str, count: int) -> None:
    """Without ``indices``, entry ``i`` uses row ``i`` of ``state``: it needs ``count`` rows."""
    if call[indices] is None and count > call[state].shape[0]:
        fail(state, f"at least {count} rows (one per entry: no {indices} given)",
             tuple(call[state].shape))


def same_device(call: dict[str, Any], anchor: str) -> None:
    """Every tensor argument lies on the device of ``anchor``."""
    device = call[anchor].device
    for name, value in call.items():
        if isinstance(value, torch.Tensor) and value.device != device:
            fail(name, f"a tensor on the device of {anchor} ({device})", _describe(value))


def row_members(call: dict[str, Any], members: Sequence[str]) -> None:
    """The tensors of one state row (``RowSpec.state``): each a writable tensor with as
    many rows as the first, on its device, so that row ``i`` of each is one row."""
    first = call[members[0]]
    for name in members[1:]:
        t = call[name]
        if not isinstance(t, torch.Tensor):
            fail(name, f"a tensor (a row of {members[0]} is a row of it too)", type(t).__name__)
        if t.dim() == 0 or t.shape[0] != first.shape[0]:
            fail(name, f"{first.shape[0]} rows, one per row of {members[0]}", _describe(t))
        if t.device != first.device:
            fail(name, f"a tensor on {first.device}, the device of {members[0]}", _describe(t))
        writable(call, name)


def same_dtype(call: dict[str, Any], name: str, like: str) -> None:
    """An output tensor (when given) has the dtype of the input it is computed from: a
    provider would otherwise round to one dtype or the other, each its own way."""
    t = call[name]
    if t is not None and t.dtype != call[like].dtype:
        fail(name, f"dtype {str(call[like].dtype).removeprefix('torch.')} (that of {like})",
             _describe(t))


def writable(call: dict[str, Any], name: str) -> None:
    """A tensor written in place must not have overlapping (e.g. stride-0) elements."""
    t = call[name]
    if t.numel() and any(s == 0 and n > 1 for s, n in zip(t.stride(), t.shape, strict=True)):
        fail(name, "no stride-0 dimension (it is written in place)", f"strides {t.stride()}")


def values_readable(*tensors: torch.Tensor | None) -> bool:
    """True when index values can be read: an eager call on real tensors, not being captured
    into a CUDA graph (reading values would synchronise, which capture forbids)."""
    if torch.compiler.is_compiling():
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    for t in tensors:
        if t is None:
            continue
        if isinstance(t, torch._subclasses.FakeTensor) or t.device.type == "meta":
            return False
    return True


def real_rows(rows: torch.Tensor, nslots: int, pad: int) -> torch.Tensor:
    """Which entries name a row of the state: not the pad id and in ``[0, nslots)``.

    Compiled calls skip the value checks; the native op reads and writes only these rows,
    so a bad index can neither wrap around (``-2`` is not row ``nslots - 2``) nor reach
    past the state."""
    return (rows != pad) & (rows >= 0) & (rows < nslots)


def rows_in_range(name: str, values: torch.Tensor, nslots: int, pad: int) -> None:
    """Every entry is a row of the state (``0 <= i < nslots``) or the pad id."""
    bad = (values != pad) & ((values < 0) | (values >= nslots))
    if bool(bad.any()):
        first = values[bad].flatten()[0].item()
        fail(name, f"rows in [0, {nslots}) or pad_slot_id={pad}", f"index {first}")


def indices_in_range(
    call: dict[str, Any], names: Iterable[str], count: int, nslots: int, *, on_device: bool = False
) -> None:
    """The entries of each named index tensor (those given) that belong to the call's
    ``count`` sequences are rows of the state or the pad: read eagerly, or asserted on the
    device without a host sync (``on_device``)."""
    check = assert_rows_in_range if on_device else rows_in_range
    for name in names:
        idx = sequences(call[name], count)
        if idx is not None:
            check(name, idx, nslots, call["pad_slot_id"])


def disjoint_rows(
    src_name: str,
    sources: Sequence[int],
    dst_name: str,
    destinations: Sequence[Sequence[int]],
    pad: int,
) -> None:
    """Destination rows are distinct, and no entry reads a row another entry writes.

    ``sources[i]`` is the row entry ``i`` reads, ``destinations[i]`` the rows it writes.
    An entry may read one of its own destination rows (in-place update).
    """
    owner: dict[int, int] = {}
    for i, rows in enumerate(destinations):
        for r in rows:
            if r == pad:
                continue
            if r in owner:
                fail(dst_name, "distinct destination rows", f"row {r} written twice")
            owner[r] = i
    for i, r in enumerate(sources):
        if r != pad and owner.get(r, i) != i:
            fail(
                src_name,
                f"no source row that another entry writes (entry {owner[r]} writes it)",
                f"row {r} read by entry {i}",
            )


def cumulative(name: str, offsets: torch.Tensor, ntokens: int) -> None:
    """Sequence start offsets: begin at 0, never decrease, end at the ``ntokens`` tokens."""
    v = offsets.tolist()
    if not v or v[0] != 0 or any(b < a for a, b in zip(v, v[1:], strict=False)) or v[-1] != ntokens:
        fail(name, f"non-decreasing offsets from 0 to {ntokens} (the number of tokens)", v)


def decay_rates(name: str, values: torch.Tensor) -> None:
    """Decay rates ``A`` (``-exp(A_log)`` in every Mamba checkpoint): no value above 0."""
    above = values[values > 0]
    if above.numel():
        fail(name, "decay rates <= 0 (A = -exp(A_log))", f"{above.max().item():g}")


# strings (``activation``) are checked by their ops against the values they take
_SCALARS = {int: "an int", bool: "a bool (True or False)", float: "a number"}


def scalar_kinds(signature: inspect.Signature) -> dict[str, tuple[type, bool]]:
    """The op's scalar arguments (annotated ``int``, ``bool`` or ``float``, or one of those
    ``| None``): name -> (type, whether None is allowed)."""
    kinds = {}
    for name, param in signature.parameters.items():
        ann = param.annotation
        args = typing.get_args(ann) if isinstance(ann, types.UnionType) else (ann,)
        optional = type(None) in args
        scalar = [a for a in args if a in _SCALARS]
        if scalar and len(scalar) + optional == len(args):
            kinds[name] = (scalar[0], optional)
    return kinds


def scalars(call: dict[str, Any], kinds: dict[str, tuple[type, bool]]) -> None:
    """Each scalar argument has its declared Python type: a bool is not an int (nor the
    reverse), a float is not an int. torch's schema would refuse most of these with a
    RuntimeError naming its own types, and take True for 1 or 1 for True silently."""
    for name, (kind, optional) in kinds.items():
        value = call[name]
        if value is None and optional:
            continue
        if kind is bool:
            ok = isinstance(value, (bool, torch.SymBool))
        elif kind is int:
            ok = isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, (int, float, torch.SymInt, torch.SymFloat)) \
                and not isinstance(value, bool)
        if not ok:
            fail(name, _SCALARS[kind] + (" or None" if optional else ""),
                 f"{type(value).__name__} {value!r}")


def activation(call: dict[str, Any], name: str = "activation") -> None:
    if call[name] not in (None, "silu", "swish"):
        fail(name, "None, 'silu' or 'swish'", repr(call[name]))


def dt_limit(call: dict[str, Any], name: str = "dt_limit") -> None:
    """``None``, or ``(lo, hi)`` numbers with ``lo <= hi``: the clamp applied to the step size."""
    limit = call[name]
    if limit is None:
        return
    if (
        not isinstance(limit, (list, tuple))
        or len(limit) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in limit)
    ):
        fail(name, "None or two floats (lo, hi)", repr(limit))
    if not limit[0] <= limit[1]:  # NaN fails too
        fail(name, "lo <= hi", repr(limit))


# -- the same rules on the device (checked mode of compiled graphs) ---------------------

# torch's CUDA assertion kernel takes messages of at most 254 characters (and refuses a
# longer one even when the check passes)
MAX_MESSAGE = 254


class Naming(NamedTuple):
    """How the device checks' messages name a call's arguments, and which call it is."""

    names: Mapping[str, str]  # argument -> what the message calls it
    where: str  # the call site, appended to every message


_naming: contextvars.ContextVar[Naming | None] = contextvars.ContextVar(
    "mamba_ir_check_naming", default=None
)


@contextlib.contextmanager
def naming(names: Mapping[str, str], where: str = "") -> Iterator[None]:
    """Within the block, a failed device check calls argument ``a`` ``names.get(a, a)`` and
    ends with ``(where)``. The checked mode of compiled graphs names this way what the
    user passed, where a pass rewrote the call (align fusion feeds an op indices it built
    from the copy's ``src`` and ``dst``), and the site that made the call."""
    token = _naming.set(Naming(dict(names), where))
    try:
        yield
    finally:
        _naming.reset(token)


def _assert(ok: torch.Tensor, name: str, expected: str) -> None:
    """``torch._assert_async`` with the message ``<name>: expected <expected>``, each
    argument of ``name`` (``a / b`` names two) as the current :func:`naming` says."""
    current = _naming.get() or Naming({}, "")
    text = " / ".join(current.names.get(n, n) for n in name.split(" / "))
    message = f"{text}: expected {expected}" + (f" ({current.where})" if current.where else "")
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 3] + "..."
    torch._assert_async(ok, message)


def assert_rows_in_range(name: str, values: torch.Tensor, nslots: int, pad: int) -> None:
    ok = (values == pad) | ((values >= 0) & (values < nslots))
    _assert(ok.all(), name, f"rows in [0, {nslots}) or pad_slot_id={pad}")


def assert_within(name: str, values: torch.Tensor, lo: int, hi: int, what: str) -> None:
    """Every entry in ``[lo, hi]``."""
    _assert(((values >= lo) & (values <= hi)).all(), name, what)


def assert_decay_rates(name: str, values: torch.Tensor) -> None:
    _assert(~(values > 0).any(), name, "decay rates <= 0 (A = -exp(A_log))")


def assert_cumulative(name: str, offsets: torch.Tensor, ntokens: int) -> None:
    ok = (offsets[0] == 0) & (offsets[-1] == ntokens) & (offsets[1:] >= offsets[:-1]).all()
    _assert(ok, name, f"non-decreasing offsets from 0 to {ntokens} (the number of tokens)")


def assert_row_rules(
    src_name: str,
    sources: torch.Tensor,
    dst_name: str,
    destinations: torch.Tensor,
    written: torch.Tensor,
    nslots: int,
    pad: int,
) -> None:
    """:func:`disjoint_rows` on the device: ``sources`` (n,), ``destinations`` (n, k) with
    ``written`` (n, k) marking the rows each entry writes. Out-of-range rows are left to
    :func:`assert_rows_in_range`."""
    n = sources.shape[0]
    if n == 0:
        return
    device = sources.device
    dst = destinations.long()
    real = written & real_rows(dst, nslots, pad)
    spare = torch.where(real, dst, nslots).flatten()  # row nslots collects what is not written
    count = torch.zeros(nslots + 1, dtype=torch.int32, device=device)
    count.index_add_(0, spare, torch.ones_like(spare, dtype=torch.int32))
    distinct = (count[:nslots] <= 1).all()
    _assert(distinct, dst_name, "distinct destination rows")
    entry = torch.arange(n, device=device)[:, None].expand_as(dst).flatten()
    owner = torch.full((nslots + 1,), -1, dtype=torch.long, device=device)
    owner.scatter_(0, spare, entry)
    owner.narrow(0, nslots, 1).fill_(-1)  # a scalar fill, not a host copy: capture-safe
    src = sources.long()
    reads = real_rows(src, nslots, pad)
    by = owner[torch.where(reads, src, nslots)]
    ok = ~reads | (by == -1) | (by == torch.arange(n, device=device))
    _assert(ok.all(), src_name, "no source row that another entry writes")
