"""``replay_state_update``: a checkpoint and a ring of recent inputs per row, against a
float64 oracle over token streams, against ``selective_state_update`` on the same stream,
and its checks."""

from __future__ import annotations

import dataclasses
import math
import random
import re
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from oracles import ORACLES

from mamba_ir import get_op, ops
from mamba_ir.ops.replay_state_update import row_value
from mamba_ir.testing import check_impl, tolerance

REPLAY = get_op("replay_state_update")
NHEADS, NGROUPS, DIM, DSTATE = 4, 2, 8, 16


# -- a stream of decode steps on a pool of slots -------------------------------------------


@dataclass
class Model:
    """One layer's parameters, Mamba2's ranges: decay A in [-16, -1], step sizes around
    0.001..0.1 after dt_bias and softplus."""

    A: torch.Tensor
    D: torch.Tensor
    dt_bias: torch.Tensor

    @staticmethod
    def draw(gen: torch.Generator) -> Model:
        A = -torch.exp(torch.rand(NHEADS, generator=gen) * math.log(16))
        dt0 = torch.exp(torch.rand(NHEADS, generator=gen) * math.log(100)) * 1e-3
        return Model(
            A[:, None, None].expand(NHEADS, DIM, DSTATE),
            torch.randn(NHEADS, generator=gen)[:, None].expand(NHEADS, DIM),
            torch.log(torch.expm1(dt0))[:, None].expand(NHEADS, DIM),
        )


@dataclass
class Step:
    """One call: per entry its source and destination row, and the request it advances
    (``None``: a padded batch entry)."""

    src: list[int]
    dst: list[int]
    requests: list[int | None]
    x: torch.Tensor
    dt: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    z: torch.Tensor


@dataclass
class Schedule:
    """Requests that start (fresh, or from another request's row: a shared prefix), step in
    place or move to another slot, and finish, freeing slots that later requests reuse."""

    nslots: int
    steps: list[Step] = field(default_factory=list)
    parent: dict[int, int | None] = field(default_factory=dict)  # request -> forked from

    @staticmethod
    def draw(seed: int, nsteps: int, dtype: torch.dtype, nslots: int = 10,
             batch: int = 4) -> Schedule:
        rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
        sched = Schedule(nslots)
        slot: dict[int, int] = {}  # running request -> its row
        free = list(range(nslots))
        rng.shuffle(free)
        next_id = 0
        for _ in range(nsteps):
            src, dst, reqs = [], [], []
            released: list[int] = []
            running = list(slot)
            rng.shuffle(running)
            stepping = running[: rng.randint(max(0, min(len(running), batch - 2)),
                                             min(len(running), batch))]
            # a request that does not step this call may be forked from (its row is read only)
            idle = [r for r in running if r not in stepping]
            for r in stepping:
                if free and rng.random() < 0.15:  # moves: reads its row, writes a fresh one
                    new = free.pop()
                    src.append(slot[r])
                    dst.append(new)
                    released.append(slot[r])  # free for a later call only
                    slot[r] = new
                else:
                    src.append(slot[r])
                    dst.append(slot[r])
                reqs.append(r)
            while len(reqs) < batch and free and rng.random() < 0.6:
                row = free.pop()
                parent = rng.choice(idle) if idle and rng.random() < 0.4 else None
                src.append(-1 if parent is None else slot[parent])
                dst.append(row)
                reqs.append(next_id)
                sched.parent[next_id] = parent
                slot[next_id] = row
                next_id += 1
            while len(reqs) < batch:  # padded entries
                src.append(-1)
                dst.append(-1)
                reqs.append(None)
            for r in list(slot):  # finishing frees the row for a later request
                if r not in reqs and rng.random() < 0.1:
                    released.append(slot.pop(r))
            free[:0] = released
            n = len(reqs)

            def randn(*shape: int) -> torch.Tensor:
                return torch.randn(*shape, generator=gen).to(dtype)

            sched.steps.append(Step(
                src, dst, reqs, randn(n, NHEADS, DIM),
                (torch.randn(n, NHEADS, 1, generator=gen) * 0.1).to(dtype).expand(
                    n, NHEADS, DIM),
                randn(n, NGROUPS, DSTATE), randn(n, NGROUPS, DSTATE), randn(n, NHEADS, DIM)))
        return sched


def _replay_call(rows: dict, step: Step, model: Model) -> dict:
    return REPLAY.bind(
        **rows, x=step.x, dt=step.dt, A=model.A, B=step.B, C=step.C, D=model.D, z=step.z,
        dt_bias=model.dt_bias, dt_softplus=True,
        state_batch_indices=torch.tensor(step.src, dtype=torch.int32),
        dst_state_batch_indices=torch.tensor(step.dst, dtype=torch.int32),
    )


def _empty_rings(state: torch.Tensor, ring: int, in_dtype: torch.dtype) -> dict:
    nslots = state.shape[0]
    return {
        "state": state,
        "ring_x": torch.full((nslots, ring, NHEADS, DIM), float("nan"), dtype=in_dtype),
        "ring_dt": torch.full((nslots, ring, NHEADS), float("nan")),
        "ring_B": torch.full((nslots, ring, NGROUPS, DSTATE), float("nan"), dtype=in_dtype),
        "ring_len": torch.zeros(nslots, dtype=torch.int32),
    }


class Truth:
    """Each request's state in float64, advanced by the recurrence straight from the
    inputs (independent of both ops): h = h exp(A dt) + dt B x, y = C h + D x, gated."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.h: dict[int, torch.Tensor] = {}

    def step(self, sched: Schedule, step: Step) -> torch.Tensor:
        m = self.model
        new: dict[int, torch.Tensor] = {}
        y = torch.zeros(len(step.requests), NHEADS, DIM, dtype=torch.float64)
        for b, r in enumerate(step.requests):
            if r is None or r not in self.h:  # a padded entry or a new request
                parent = None if r is None else sched.parent[r]
                h = (torch.zeros(NHEADS, DIM, DSTATE, dtype=torch.float64) if parent is None
                     else self.h[parent].clone())
            else:
                h = self.h[r]
            d = F.softplus(step.dt[b, :, 0].double() + m.dt_bias[:, 0].double())
            per_group = NHEADS // NGROUPS
            Bh = step.B[b].double().repeat_interleave(per_group, 0)[:, None, :]
            Ch = step.C[b].double().repeat_interleave(per_group, 0)[:, None, :]
            d4 = d[:, None, None]
            h = h * torch.exp(m.A.double() * d4) + d4 * Bh * step.x[b].double()[..., None]
            zz = step.z[b].double()
            y[b] = ((h * Ch).sum(-1) + m.D.double() * step.x[b].double()) * zz * torch.sigmoid(zz)
            if r is not None:
                new[r] = h
        self.h.update(new)
        return y


def _materialized(rows: dict, row: int, model: Model) -> torch.Tensor:
    """A replay row's state in float64: its checkpoint, then its ring's tokens."""
    h = rows["state"][row].double()
    for i in range(int(rows["ring_len"][row])):
        d = rows["ring_dt"][row, i].double()[:, None, None]
        Bh = rows["ring_B"][row, i].double().repeat_interleave(NHEADS // NGROUPS, 0)[:, None]
        h = h * torch.exp(model.A.double() * d) + d * Bh * rows["ring_x"][row, i].double()[
            ..., None]
    return h


# -- the native op against the float64 oracle, call by call over streams -------------------


@pytest.mark.parametrize(("ring", "state_dtype", "in_dtype"), [
    (1, torch.float32, torch.float32),
    (3, torch.float32, torch.bfloat16),
    (4, torch.bfloat16, torch.float16),
])
def test_streams_match_the_float64_oracle_call_by_call(ring, state_dtype, in_dtype):
    """Every call of a stream (flushes, new requests on recycled slots with stale rings,
    shared prefixes, moves, padded entries) against the oracle on the rows as they are;
    and, with float32 state, each output against each request's float64 history."""
    gen = torch.Generator().manual_seed(ring)
    model = Model.draw(gen)
    sched = Schedule.draw(seed=ring, nsteps=24, dtype=in_dtype)
    initial = torch.randn(sched.nslots, NHEADS, DIM, DSTATE, generator=gen)
    rows = _empty_rings(initial.to(state_dtype), ring, in_dtype)
    truth = Truth(model)
    atol, rtol = tolerance(state_dtype, in_dtype)
    flushes = 0
    for step in sched.steps:
        call = _replay_call(rows, step, model)
        want_rows, want_out = ORACLES["replay_state_update"](call)
        before = {k: rows[k].clone() for k in rows}
        written = {d for d in step.dst if d != -1}
        flushes += sum(d != -1 and s != -1 and int(rows["ring_len"][s]) == ring
                       for s, d in zip(step.src, step.dst, strict=True))
        out = ops.replay_state_update(**call)
        torch.testing.assert_close(out.double(), want_out, atol=atol, rtol=rtol)
        got_rows, _ = row_value(rows)
        for r in range(sched.nslots):
            if r in written:
                want = want_rows[r].to(state_dtype).double()  # as the checkpoint stores it
                torch.testing.assert_close(got_rows[r].double(), want, atol=atol, rtol=rtol)
            else:
                for k in rows:
                    torch.testing.assert_close(rows[k][r], before[k][r], rtol=0, atol=0,
                                               equal_nan=True, msg=f"{k}: row {r} changed")
        truth_y = truth.step(sched, step)
        if state_dtype == torch.float32:  # else the checkpoints' rounding adds up
            torch.testing.assert_close(out.double(), truth_y, atol=atol, rtol=rtol)
    assert flushes >= 3, "the stream should flush rings"


def test_check_impl_native_against_native():
    """``check_impl``'s machinery on the op: every member of unaddressed rows poisoned, rows
    compared as values, outputs from NaN."""
    assert check_impl("replay_state_update", "native", max_examples=25) == 25


# -- the same stream through selective_state_update ---------------------------------------


def _both(seed: int, nsteps: int, ring: int, state_dtype: torch.dtype, in_dtype: torch.dtype,
          schedule: Schedule | None = None):
    """Run a stream through both ops; returns per step (replay out, standard out, float64
    out), and the final rows of both with the truth. Outputs are float32 whatever the
    inputs' values, so that they show the state's rounding rather than their own."""
    gen = torch.Generator().manual_seed(seed)
    model = Model.draw(gen)
    sched = schedule or Schedule.draw(seed=seed, nsteps=nsteps, dtype=in_dtype)
    initial = torch.randn(sched.nslots, NHEADS, DIM, DSTATE, generator=gen) * 0.1
    rows = _empty_rings(initial.to(state_dtype), ring, in_dtype)
    standard = initial.to(state_dtype, copy=True)  # not the replay rows' tensor
    truth = Truth(model)
    outs = []
    for step in sched.steps:
        call = _replay_call(rows, step, model)
        call["out"] = torch.empty_like(step.x)
        got = ops.replay_state_update(**call)
        want = ops.selective_state_update(
            standard, step.x, step.dt, model.A, step.B, step.C, D=model.D, z=step.z,
            dt_bias=model.dt_bias, dt_softplus=True,
            state_batch_indices=call["state_batch_indices"],
            dst_state_batch_indices=call["dst_state_batch_indices"],
            out=torch.empty_like(step.x))
        outs.append((got, want, truth.step(sched, step)))
    return outs, rows, standard, truth, model


def test_float32_state_replay_equals_the_standard_op():
    outs, rows, standard, _, model = _both(seed=5, nsteps=40, ring=4,
                                           state_dtype=torch.float32, in_dtype=torch.float32)
    for got, want, _ in outs:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for r in range(standard.shape[0]):  # a row's value is the standard op's state
        torch.testing.assert_close(_materialized(rows, r, model), standard[r].double(),
                                   atol=1e-5, rtol=1e-5)


def _relative_rms(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt())


def _steady_schedule(nsteps: int, dtype: torch.dtype, batch: int = 4) -> Schedule:
    """``batch`` requests decoding in place for ``nsteps`` steps from zero state."""
    gen = torch.Generator().manual_seed(11)
    sched = Schedule(batch, parent=dict.fromkeys(range(batch)))
    for t in range(nsteps):
        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen).to(dtype)

        rows = list(range(batch))
        sched.steps.append(Step(
            [-1] * batch if t == 0 else rows, rows, rows, randn(batch, NHEADS, DIM),
            (torch.randn(batch, NHEADS, 1, generator=gen) * 0.1).to(dtype).expand(
                batch, NHEADS, DIM),
            randn(batch, NGROUPS, DSTATE), randn(batch, NGROUPS, DSTATE),
            randn(batch, NHEADS, DIM)))
    return sched


def accuracy(ring: int, nsteps: int = 300) -> dict[str, float]:
    """bf16 state and inputs: each op's relative RMS error against the float64 recurrence,
    over every output of the stream and over the final states."""
    sched = _steady_schedule(nsteps, torch.bfloat16)
    # the bf16 inputs' values held in float32, so that the outputs can be float32 (an out
    # must have x's dtype) and show the state's rounding rather than their own
    sched.steps = [dataclasses.replace(s, x=s.x.float(), dt=s.dt.float(), B=s.B.float(),
                                       C=s.C.float(), z=s.z.float()) for s in sched.steps]
    outs, rows, standard, truth, model = _both(0, nsteps, ring, torch.bfloat16,
                                               torch.float32, schedule=sched)
    want = torch.stack([w for _, _, w in outs])
    states = torch.stack([truth.h[r] for r in range(standard.shape[0])])
    return {
        "replay_out": _relative_rms(torch.stack([g for g, _, _ in outs]), want),
        "standard_out": _relative_rms(torch.stack([s for _, s, _ in outs]), want),
        "replay_state": _relative_rms(torch.stack(
            [_materialized(rows, r, model) for r in range(standard.shape[0])]), states),
        "standard_state": _relative_rms(standard, states),
    }


def test_bf16_state_replay_is_no_less_accurate_than_the_standard_op():
    """The standard op rounds the state to bf16 every step, replay once per ring."""
    err = accuracy(ring=8)
    assert err["replay_out"] <= err["standard_out"], err
    assert err["replay_state"] <= err["standard_state"], err
    assert err["standard_out"] < 0.05, err  # the stream is a fair one: bf16 stays usable


# -- semantics the oracle shares with the op, stated once more in small cases -------------


def _small(ring: int = 2, nslots: int = 5, batch: int = 2) -> dict:
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    model = Model.draw(gen)
    rows = {
        "state": randn(nslots, NHEADS, DIM, DSTATE),
        "ring_x": randn(nslots, ring, NHEADS, DIM),
        "ring_dt": randn(nslots, ring, NHEADS).abs(),
        "ring_B": randn(nslots, ring, NGROUPS, DSTATE),
        "ring_len": torch.zeros(nslots, dtype=torch.int32),
    }
    return REPLAY.bind(
        **rows, x=randn(batch, NHEADS, DIM),
        dt=randn(batch, NHEADS, 1).expand(batch, NHEADS, DIM), A=model.A,
        B=randn(batch, NGROUPS, DSTATE), C=randn(batch, NGROUPS, DSTATE),
        dt_bias=model.dt_bias, dt_softplus=True)


def _clone(call: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in call.items()}


def test_a_flush_writes_the_checkpoint_and_length_only():
    call = _small()
    call["ring_len"][:] = torch.tensor([2, 1, 0, 2, 0], dtype=torch.int32)
    call["state_batch_indices"] = torch.tensor([0, 1])
    call["dst_state_batch_indices"] = torch.tensor([3, 1])
    before = _clone(call)
    ops.replay_state_update(**call)
    assert call["ring_len"].tolist() == [2, 2, 0, 0, 0]  # 0 flushed into 3; 1 appended
    for k in ("ring_x", "ring_dt", "ring_B"):
        assert torch.equal(call[k][3], before[k][3]), f"{k}: a flush wrote ring entries"
        assert torch.equal(call[k][0], before[k][0]), f"{k}: the source row changed"
    assert not torch.equal(call["state"][3], before["state"][3])
    assert torch.equal(call["state"][0], before["state"][0])
    assert torch.equal(call["ring_x"][1, 1], call["x"][1])  # appended after the first entry
    assert torch.equal(call["ring_x"][1, 0], before["ring_x"][1, 0])


def test_a_pad_source_is_a_zero_checkpoint_and_an_empty_ring_and_a_pad_destination_no_write():
    call = _small()
    call["ring_len"][:] = 2  # stale: a recycled slot
    call["state_batch_indices"] = torch.tensor([-1, 2])
    call["dst_state_batch_indices"] = torch.tensor([4, -1])
    before = _clone(call)
    out = ops.replay_state_update(**call)
    assert call["ring_len"].tolist() == [2, 2, 2, 2, 1]
    assert not call["state"][4].any()
    assert torch.equal(call["ring_x"][4, 0], call["x"][0])
    for k in ("state", "ring_x", "ring_dt", "ring_B", "ring_len"):
        assert torch.equal(call[k][:4], before[k][:4]), k
    # the first entry's output is the standard op's from zero state; the second's is
    # computed although nothing is written
    want = ops.selective_state_update(torch.zeros(1, NHEADS, DIM, DSTATE), call["x"][:1],
                                      call["dt"][:1], call["A"], call["B"][:1], call["C"][:1],
                                      dt_bias=call["dt_bias"], dt_softplus=True)
    torch.testing.assert_close(out[:1], want)
    assert out[1].isfinite().all() and out[1].abs().sum() > 0


# -- checks -------------------------------------------------------------------------------


def _mismatched_ring_len(call: dict) -> None:
    call["ring_len"] = torch.zeros(call["state"].shape[0] + 1, dtype=torch.int32)


def _shorter_ring_B(call: dict) -> None:
    call["ring_B"] = call["ring_B"][:, :1]


def _ring_x_of_another_dtype(call: dict) -> None:
    call["ring_x"] = call["ring_x"].half()


def _int64_ring_len(call: dict) -> None:
    call["ring_len"] = call["ring_len"].long()


def _quantized_state(call: dict) -> None:
    call["state"] = call["state"].to(torch.int8)


def _mamba1_state(call: dict) -> None:
    call["state"] = call["state"][:, 0]


def _ring_dt_in_bf16(call: dict) -> None:
    call["ring_dt"] = call["ring_dt"].bfloat16()


def _ring_len_over_the_ring(call: dict) -> None:
    call["ring_len"][call["state_batch_indices"][1]] = 3


def _negative_ring_len(call: dict) -> None:
    call["ring_len"][call["state_batch_indices"][0]] = -1


def _per_channel_dt(call: dict) -> None:
    call["dt"] = torch.rand(call["dt"].shape)


def _per_channel_dt_bias(call: dict) -> None:
    call["dt_bias"] = torch.rand(call["dt_bias"].shape)


BAD = {
    "ring_len: expected shape (5,): one length per row of state": _mismatched_ring_len,
    "ring_B: expected shape (5, 2, 2, 16): 2 entries per row of state, as ring_x":
        _shorter_ring_B,
    "ring_x: expected the dtype of x (float32)": _ring_x_of_another_dtype,
    "ring_len: expected dtype in (int32)": _int64_ring_len,
    "state: expected a float32, float16 or bfloat16 checkpoint: quantized": _quantized_state,
    "state: expected 4 dimensions (slots, nheads, headdim, dstate)": _mamba1_state,
    "ring_dt: expected dtype in (float32)": _ring_dt_in_bf16,
    "ring_len: expected values in [0, 2] (the ring's entries) in the source rows":
        _ring_len_over_the_ring,
    "ring_len: expected values in [0, 2]": _negative_ring_len,
    "dt: expected one value per head (equal over headdim)": _per_channel_dt,
    "dt_bias: expected one value per head": _per_channel_dt_bias,
}


def _refused_before_writing(call: dict, words: str) -> None:
    """The call raises ValueError starting with ``words`` and leaves every row as it was."""
    before = _clone(call)
    with pytest.raises(ValueError, match="^" + re.escape(words)):
        ops.replay_state_update(**call)
    for k in REPLAY.mutates_args:
        if isinstance(call[k], torch.Tensor):
            assert torch.equal(call[k], before[k]), f"{k} changed"


@pytest.mark.parametrize("words", sorted(BAD))
def test_bad_calls_are_refused_naming_the_argument_before_anything_is_written(words):
    call = _small()
    call["state_batch_indices"] = torch.tensor([0, 1])
    BAD[words](call)
    _refused_before_writing(call, words)


def test_tied_parameters_pass_whatever_their_layout():
    """dt and dt_bias hold one value per head: stride 0 over headdim, or equal values
    (a tied tensor copied by the caller)."""
    call = _small()
    want = ops.replay_state_update(**_clone(call))
    copied = {**_clone(call), "dt": call["dt"].contiguous(), "dt_bias": call["dt_bias"].clone()}
    assert copied["dt"].stride(-1) == 1
    torch.testing.assert_close(ops.replay_state_update(**copied), want, rtol=0, atol=0)


@pytest.mark.parametrize(("bad", "words"), [
    (_ring_len_over_the_ring, "ring_len: expected values in"),
    (_per_channel_dt, "dt: expected one value per head"),
])
def test_the_device_check_asserts_what_the_value_check_reads(bad, words):
    call = _small()
    call["state_batch_indices"] = torch.tensor([0, 1])
    REPLAY.device_check(call)
    bad(call)
    with pytest.raises(RuntimeError, match=re.escape(words)):
        REPLAY.device_check(call)


def _decode(state, ring_x, ring_dt, ring_B, ring_len, x, dt, A, B, C, src, dst):
    ops.replay_state_update(state, ring_x, ring_dt, ring_B, ring_len, x, dt, A, B, C,
                            dt_softplus=True, state_batch_indices=src,
                            dst_state_batch_indices=dst)
    return state + 0, ring_len + 0


def test_compiled_steps_match_eager():
    """Traced and functionalized (six mutated arguments, five of them one row), the op
    advances the rows as it does eagerly, call after call."""
    call = _small(ring=2, nslots=6, batch=3)
    call["ring_len"][:] = torch.tensor([2, 1, 0, 2, 0, 0], dtype=torch.int32)
    args = [call[k] for k in ("state", "ring_x", "ring_dt", "ring_B", "ring_len", "x", "dt",
                              "A", "B", "C")]
    src, dst = torch.tensor([0, 1, -1]), torch.tensor([0, 4, 5])
    eager = [a.clone() for a in args]
    compiled = [a.clone() for a in args]
    torch._dynamo.reset()
    step = torch.compile(_decode, backend="aot_eager", fullgraph=True, dynamic=False)
    for _ in range(3):  # flush, append, append: the rows carry over between calls
        want = _decode(*eager, src, dst)
        got = step(*compiled, src, dst)
        src = dst.clone()  # not dst itself: aliased arguments would compile a second graph
        for w, g in zip(want, got, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
    torch._dynamo.reset()
    for e, c in zip(eager[:5], compiled[:5], strict=True):
        torch.testing.assert_close(c, e, rtol=0, atol=0, equal_nan=True)


def test_a_rate_of_minus_inf_and_steps_of_zero_replay_as_the_standard_op():
    """A = -inf with a step of exactly 0 keeps the state (A * dt is 0 when dt is 0), in the
    ring's entries and in the new token, as ``selective_state_update`` decays: finite, and
    equal to the standard op stepping the same tokens."""
    ring, nslots, batch, ntok = 3, 2, 2, 4  # three appends, then a flush
    call = _small(ring=ring, nslots=nslots, batch=batch)
    rates = call["A"][:, 0, 0].clone()
    rates[0] = -math.inf
    call["A"] = rates[:, None, None].expand_as(call["A"])
    call["dt_bias"] = torch.zeros_like(call["dt_bias"])
    call["dt_softplus"], call["dt_limit"] = False, (0.0, math.inf)
    call["state_batch_indices"] = call["dst_state_batch_indices"] = torch.arange(batch)
    standard = call["state"].clone()
    gen = torch.Generator().manual_seed(1)
    for t in range(ntok):
        steps = torch.rand(batch, NHEADS, 1, generator=gen) + 0.05
        if t % 2 == 0:
            steps[:, 0] = -1.0  # clamped to a step of 0 on the -inf head
        call["dt"] = steps.expand(batch, NHEADS, DIM)
        call["x"], call["B"], call["C"] = (torch.randn(t.shape, generator=gen) for t in
                                           (call["x"], call["B"], call["C"]))
        got = ops.replay_state_update(**call)
        want = ops.selective_state_update(
            standard, call["x"], call["dt"], call["A"], call["B"], call["C"],
            dt_bias=call["dt_bias"], dt_softplus=False, dt_limit=call["dt_limit"],
            state_batch_indices=call["state_batch_indices"])
        assert bool(got.isfinite().all()), f"token {t}: not finite"
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert call["ring_len"].tolist() == [0, 0]  # flushed: the checkpoint is the state
    torch.testing.assert_close(call["state"], standard, rtol=1e-5, atol=1e-5)


# -- replay_materialize: the state a row stands for, as a checkpoint with an empty ring ----


MATERIALIZE = get_op("replay_materialize")


def _materialize_call(call: dict, src: list[int], dst: list[int]) -> dict:
    rows = {k: call[k] for k in ("state", "ring_x", "ring_dt", "ring_B", "ring_len")}
    return MATERIALIZE.bind(**rows, A=call["A"], src=torch.tensor(src), dst=torch.tensor(dst))


def test_materialize_writes_the_standard_ops_state_with_an_empty_ring():
    """Rows stepped by replay, each left at another ring fill, materialised into fresh rows:
    the state the standard op reached on the same tokens (float32); the source rows as they
    were."""
    ring, batch = 3, 4
    call = _small(ring=ring, nslots=2 * batch, batch=batch)
    call["state_batch_indices"] = torch.arange(batch)
    standard = call["state"].clone()
    gen = torch.Generator().manual_seed(2)
    steps = [6, 5, 4, 3]  # per row, with a flush after every 4: rings of 2, 1, 0 and 3
    for t in range(max(steps)):
        live = torch.tensor([b for b in range(batch) if t < steps[b]])
        step = {**call, "state_batch_indices": live}
        for k in ("x", "B", "C"):
            step[k] = torch.randn(len(live), *call[k].shape[1:], generator=gen)
        step["dt"] = torch.randn(len(live), NHEADS, 1, generator=gen).expand(len(live), NHEADS,
                                                                              DIM)
        ops.replay_state_update(**step)
        ops.selective_state_update(standard, step["x"], step["dt"], call["A"], step["B"],
                                   step["C"], dt_bias=call["dt_bias"], dt_softplus=True,
                                   state_batch_indices=live)
    fills = call["ring_len"][:batch].tolist()
    assert fills == [2, 1, 0, 3]  # partly filled, empty (just flushed) and full rings
    before = _clone(call)
    ops.replay_materialize(**_materialize_call(call, list(range(batch)),
                                               list(range(batch, 2 * batch))))
    torch.testing.assert_close(call["state"][batch:], standard[:batch], rtol=1e-6, atol=1e-6)
    assert call["ring_len"].tolist() == fills + [0] * batch
    for k in ("state", "ring_x", "ring_dt", "ring_B", "ring_len"):
        assert torch.equal(call[k][:batch], before[k][:batch]), k
    # in place: the same state, the ring emptied
    ops.replay_materialize(**_materialize_call(call, [1], [1]))
    torch.testing.assert_close(call["state"][1], standard[1], rtol=1e-6, atol=1e-6)
    assert int(call["ring_len"][1]) == 0


def test_materialize_from_a_pad_writes_zeros_and_to_a_pad_writes_nothing():
    call = _small(ring=2, nslots=5)
    call["ring_len"][:] = 2
    before = _clone(call)
    ops.replay_materialize(**_materialize_call(call, [-1, 2], [4, -1]))
    assert not call["state"][4].any() and int(call["ring_len"][4]) == 0
    for k in ("state", "ring_x", "ring_dt", "ring_B", "ring_len"):
        assert torch.equal(call[k][:4], before[k][:4]), k


MATERIALIZE_BAD = {
    "ring_len: expected values in [0, 2] (the ring's entries) in the source rows":
        lambda c: c["ring_len"].__setitem__(0, 3),
    "dst: expected distinct destination rows": lambda c: c.__setitem__("dst", torch.tensor([3, 3])),
    "src: expected rows in [0, 5) or pad_slot_id=-1": lambda c: c.__setitem__(
        "src", torch.tensor([0, 7])),
    "state: expected a float32, float16 or bfloat16 checkpoint: quantized":
        lambda c: c.__setitem__("state", c["state"].to(torch.int8)),
    "ring_dt: expected dtype in (float32)": lambda c: c.__setitem__(
        "ring_dt", c["ring_dt"].bfloat16()),
}


@pytest.mark.parametrize("words", sorted(MATERIALIZE_BAD))
def test_materialize_refuses_bad_calls_naming_the_argument_before_writing(words):
    call = _materialize_call(_small(ring=2, nslots=5), [0, 1], [3, 4])
    call["ring_len"][:] = 1
    MATERIALIZE_BAD[words](call)
    before = _clone(call)
    with pytest.raises(ValueError, match="^" + re.escape(words)):
        ops.replay_materialize(**call)
    for k in MATERIALIZE.mutates_args:
        assert torch.equal(call[k], before[k]), f"{k} changed"


def test_check_impl_materialize_native_against_native():
    assert check_impl("replay_materialize", "native", max_examples=25) == 25


# -- speculative decoding: T tokens a call, the previous call's rejected ones rolled back ---

SPEC_T = 3


def _spec_tokens(gen: torch.Generator, batch: int, dtype: torch.dtype,
                 tokens: int = SPEC_T) -> dict:
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    return {"x": randn(batch, tokens, NHEADS, DIM),
            "dt": (torch.randn(batch, tokens, NHEADS, 1, generator=gen) * 0.1).to(dtype).expand(
                batch, tokens, NHEADS, DIM),
            "B": randn(batch, tokens, NGROUPS, DSTATE), "C": randn(batch, tokens, NGROUPS, DSTATE),
            "z": randn(batch, tokens, NHEADS, DIM)}


def _truth_tokens(model: Model, h: torch.Tensor, tok: dict, b: int) -> tuple[list, torch.Tensor]:
    """Sequence ``b``'s tokens of ``tok`` from the float64 state ``h``: the state after each
    and the outputs."""
    states, ys = [], []
    per_group = NHEADS // NGROUPS
    for t in range(tok["x"].shape[1]):
        d = F.softplus(tok["dt"][b, t, :, 0].double() + model.dt_bias[:, 0].double())[:, None,
                                                                                       None]
        Bh = tok["B"][b, t].double().repeat_interleave(per_group, 0)[:, None, :]
        Ch = tok["C"][b, t].double().repeat_interleave(per_group, 0)[:, None, :]
        x = tok["x"][b, t].double()
        h = h * torch.exp(model.A.double() * d) + d * Bh * x[..., None]
        zz = tok["z"][b, t].double()
        ys.append(((h * Ch).sum(-1) + model.D.double() * x) * zz * torch.sigmoid(zz))
        states.append(h)
    return states, torch.stack(ys)


@pytest.mark.parametrize(("ring", "state_dtype", "in_dtype"), [
    (3, torch.float32, torch.float32),
    (5, torch.float32, torch.bfloat16),
    (7, torch.bfloat16, torch.float16),
])
def test_speculative_streams_match_the_float64_oracle_call_by_call(ring, state_dtype, in_dtype):
    """Three requests verify ``SPEC_T`` tokens a call and accept a random number of the
    previous call's (0 to all), moving to a fresh row now and then, one padded on some
    calls (its row untouched, its rollback waiting for its next call): every call against
    the oracle on the rows as they are, and, with float32 state, every output against each
    request's float64 history of accepted tokens only."""
    gen = torch.Generator().manual_seed(ring)
    rng = random.Random(ring)
    model = Model.draw(gen)
    batch, nslots = 3, 7
    rows = _empty_rings(torch.randn(nslots, NHEADS, DIM, DSTATE, generator=gen).to(state_dtype),
                        ring, in_dtype)
    where = [0, 1, 2]
    accepted = [SPEC_T] * batch  # fresh rows: nothing to roll back
    truth = [rows["state"][r].double() for r in where]  # the committed state, float64
    pending: list[list] = [[] for _ in range(batch)]  # the last call's states after each token
    atol, rtol = tolerance(state_dtype, in_dtype)
    flushes = rollbacks = 0
    for step in range(16):
        src = list(where)
        free = [r for r in range(nslots) if r not in where]
        dst = [free.pop(rng.randrange(len(free))) if rng.random() < 0.3 else s for s in src]
        padded = step % 5 == 3
        if padded:
            src[1] = dst[1] = -1
        call = REPLAY.bind(**rows, **_spec_tokens(gen, batch, in_dtype), A=model.A, D=model.D,
                           dt_bias=model.dt_bias, dt_softplus=True,
                           state_batch_indices=torch.tensor(src),
                           dst_state_batch_indices=torch.tensor(dst),
                           num_accepted_tokens=torch.tensor(accepted))
        want_rows, want_out = ORACLES["replay_state_update"](call)
        before = {k: rows[k].clone() for k in rows}
        lengths = [int(rows["ring_len"][s]) if s != -1 else 0 for s in src]
        flushes += sum(s != -1 and n - SPEC_T + a + SPEC_T > ring
                       for s, n, a in zip(src, lengths, accepted, strict=True))
        rollbacks += sum(s != -1 and a < SPEC_T for s, a in zip(src, accepted, strict=True))
        out = ops.replay_state_update(**call)
        torch.testing.assert_close(out.double(), want_out, atol=atol, rtol=rtol)
        got_rows, _ = row_value(rows)
        for r in range(nslots):
            if r in dst and r != -1:
                want = want_rows[r].to(state_dtype).double()
                torch.testing.assert_close(got_rows[r].double(), want, atol=atol, rtol=rtol)
            else:
                for k in rows:
                    torch.testing.assert_close(rows[k][r], before[k][r], rtol=0, atol=0,
                                               equal_nan=True, msg=f"{k}: row {r} changed")
        for b in range(batch):
            if src[b] == -1:
                continue
            if pending[b]:  # the accepted tokens of the previous call commit
                truth[b] = pending[b][accepted[b] - 1] if accepted[b] else truth[b]
            pending[b], ys = _truth_tokens(model, truth[b], call, b)
            if state_dtype == torch.float32:
                torch.testing.assert_close(out[b].double(), ys, atol=atol, rtol=rtol)
            accepted[b] = rng.randint(0, SPEC_T)
            where[b] = dst[b]
    assert flushes >= 3 and rollbacks >= 5, (flushes, rollbacks)


def test_speculative_replay_equals_the_standard_ops_speculative_path():
    """The same tokens through both ops, the same counts accepted (vLLM's: 1 to T, the
    first token always): the standard op keeps a state per token in its own slot, replay
    one checkpoint and a ring, yet with a float32 state every output agrees."""
    gen = torch.Generator().manual_seed(11)
    rng = random.Random(11)
    model = Model.draw(gen)
    batch, ring = 2, 5
    initial = torch.randn(batch, NHEADS, DIM, DSTATE, generator=gen) * 0.1
    rows = _empty_rings(initial.clone(), ring, torch.float32)
    slots = torch.arange(batch * SPEC_T).view(batch, SPEC_T)
    standard = torch.zeros(batch * SPEC_T, NHEADS, DIM, DSTATE)
    standard[slots[:, 0]] = initial  # column 0: the state vLLM's first step reads (count 1)
    accepted = [1] * batch
    for step in range(12):
        tok = _spec_tokens(gen, batch, torch.float32)
        common = dict(**tok, A=model.A, D=model.D, dt_bias=model.dt_bias, dt_softplus=True,
                      num_accepted_tokens=torch.tensor(accepted))
        want = ops.selective_state_update(standard, state_batch_indices=slots, **common)
        common["num_accepted_tokens"] = torch.tensor([SPEC_T] * batch if step == 0 else accepted)
        got = ops.replay_state_update(**rows, **common)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        accepted = [rng.randint(1, SPEC_T) for _ in range(batch)]


def test_a_rollback_moves_ring_len_and_a_flush_folds_only_committed_entries():
    """In place: accepting 1 of the previous call's 3 tokens leaves its first entry and
    appends after it (the checkpoint as it was); where the tokens would not fit, the
    committed entries go into the checkpoint and the tokens start the ring."""
    gen = torch.Generator().manual_seed(3)
    call = _small(ring=5, nslots=2, batch=1)
    rows = {k: call[k] for k in ("state", "ring_x", "ring_dt", "ring_B", "ring_len")}
    model = dict(A=call["A"], dt_bias=call["dt_bias"], dt_softplus=True,
                 state_batch_indices=torch.tensor([0]))
    first = _spec_tokens(gen, 1, torch.float32)
    ops.replay_state_update(**rows, **first, **model, num_accepted_tokens=torch.tensor([3]))
    assert rows["ring_len"].tolist() == [3, 0]
    checkpoint = rows["state"][0].clone()
    second = _spec_tokens(gen, 1, torch.float32)
    ops.replay_state_update(**rows, **second, **model, num_accepted_tokens=torch.tensor([1]))
    assert rows["ring_len"].tolist() == [4, 0]  # 1 committed + 3 tokens
    assert torch.equal(rows["state"][0], checkpoint)
    assert torch.equal(rows["ring_x"][0, 0], first["x"][0, 0])
    assert torch.equal(rows["ring_x"][0, 1:4], second["x"][0])
    # 4 - 3 + 3 = 4 committed, + 3 tokens > 5: a flush of the 4 committed entries
    h = _materialized({k: v.clone() for k, v in rows.items()}, 0, Model(call["A"], call["A"][
        :, :, 0], call["dt_bias"]))
    third = _spec_tokens(gen, 1, torch.float32)
    ops.replay_state_update(**rows, **third, **model, num_accepted_tokens=torch.tensor([3]))
    assert rows["ring_len"].tolist() == [3, 0]
    torch.testing.assert_close(rows["state"][0].double(), h, atol=1e-5, rtol=1e-5)
    assert torch.equal(rows["ring_x"][0, :3], third["x"][0])


def _spec_small() -> dict:
    call = _small(ring=4)
    gen = torch.Generator().manual_seed(1)
    call.update(_spec_tokens(gen, 2, torch.float32))
    call["ring_len"][:2] = torch.tensor([3, 1], dtype=torch.int32)
    call["state_batch_indices"] = torch.tensor([0, 1])
    call["num_accepted_tokens"] = torch.tensor([2, 3])
    return call


def _too_many_rolled_back(call: dict) -> None:
    call["num_accepted_tokens"] = torch.tensor([2, 1])  # row 1 holds 1 entry, 2 dropped


def _accepted_over_the_tokens(call: dict) -> None:
    call["num_accepted_tokens"] = torch.tensor([4, 3])


def _tokens_over_the_ring(call: dict) -> None:
    gen = torch.Generator().manual_seed(2)
    call.update(_spec_tokens(gen, 2, torch.float32, tokens=5))


def _tokens_without_a_count(call: dict) -> None:
    call["num_accepted_tokens"] = None


def _count_with_one_token(call: dict) -> None:
    for k in ("x", "dt", "B", "C", "z"):
        call[k] = call[k][:, 0]


SPEC_BAD = {
    "num_accepted_tokens: expected values in [0, 3] (the previous call's tokens that stand) "
    "with ring_len - 3 + num_accepted_tokens >= 0": _too_many_rolled_back,
    "num_accepted_tokens: expected values in [0, 3]": _accepted_over_the_tokens,
    "x: expected 1 to 4 tokens per sequence": _tokens_over_the_ring,
    "x: expected (batch, nheads, dim) without num_accepted_tokens": _tokens_without_a_count,
    "x: expected (batch, T, nheads, dim) with num_accepted_tokens": _count_with_one_token,
}


@pytest.mark.parametrize("words", sorted(SPEC_BAD))
def test_bad_speculative_calls_are_refused_naming_the_argument_before_writing(words):
    call = _spec_small()
    ops.replay_state_update(**_clone(call))  # the call as built is good
    SPEC_BAD[words](call)
    _refused_before_writing(call, words)


def test_the_device_check_asserts_the_rollback():
    call = _spec_small()
    REPLAY.device_check(REPLAY.bind(**call))
    _too_many_rolled_back(call)
    with pytest.raises(RuntimeError, match=re.escape("num_accepted_tokens: expected values")):
        REPLAY.device_check(REPLAY.bind(**call))


# -- what the strategies draw ----------------------------------------------------------------


def _forms(name: str, call: dict) -> set[str]:
    """The forms one drawn call of a replay op has, as check_impl needs them covered: pads,
    redirected, in-place and shared rows, index tensors strided, padded and stride 0, row
    members that are views of larger caches, rings empty, partly filled and full."""
    spec = get_op(name).rows
    count = call["x"].shape[0] if "x" in call else call[spec.read].shape[0]
    read = call[spec.read]
    src = list(range(count)) if read is None else read[:count].tolist()
    write = call[spec.write]
    dst = src if write is None else write[:count].tolist()
    pad, nslots, ring = call["pad_slot_id"], call["state"].shape[0], call["ring_x"].shape[1]
    forms = set()
    for s, d in zip(src, dst, strict=True):
        forms |= {"pad source"} if s == pad else {"in place" if s == d else "redirect"}
        forms |= {"pad destination"} if d == pad else set()
        if s != pad:
            n = int(call["ring_len"][s])
            forms.add("empty" if n == 0 else "flush" if n == ring else "partly filled")
    if len({s for s in src if s != pad}) < len([s for s in src if s != pad]):
        forms.add("shared source")
    for t in (read, write):
        if t is not None and t.shape[0] > 1:
            forms |= {"stride-0 index"} if t.stride(0) == 0 else set()
            forms |= {"strided index"} if t.stride(0) > 1 else set()
            forms |= {"padded index"} if t.shape[0] > count else set()
    for member in spec.states:
        if call[member].storage_offset() or not call[member].is_contiguous():
            forms.add(f"{member} in a larger cache")
    if nslots and count == 0:
        forms.add("no sequence")
    return forms


@pytest.mark.parametrize("name", ["replay_state_update", "replay_materialize"])
def test_the_strategies_draw_every_form(name: str) -> None:
    from hypothesis import HealthCheck, Phase, given, settings

    from mamba_ir.testing import calls

    seen: set[str] = set()

    @settings(max_examples=150, derandomize=True, deadline=None, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(calls(name))
    def draw(call: dict) -> None:
        seen.update(_forms(name, call))

    draw()
    want = {"pad source", "pad destination", "in place", "redirect", "shared source",
            "stride-0 index", "strided index", "empty", "partly filled", "flush",
            "no sequence", *(f"{m} in a larger cache" for m in get_op(name).rows.states)}
    if name == "replay_state_update":  # replay_materialize: every entry is a copy
        want.add("padded index")
    assert want <= seen, sorted(want - seen)
