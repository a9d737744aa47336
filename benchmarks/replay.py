"""replay_state_update decode benchmark: Triton replay against the Triton selective_state_update.

Mamba2 decode shapes (nheads=128, headdim=64, dstate=128, ngroups=8; bf16 state, inputs
and ring; dt, A, D and dt_bias tied over headdim as Mamba2 passes them), one token per
sequence, in place on a cache of 2 x batch rows, timed as CUDA-graph replays.

A ring of ``L`` entries runs in cycles of ``L + 1`` steps: ``L`` appends (the ring holds
0, 1, ..., L - 1 entries before them) and one flush (it holds L). One graph holds a whole
cycle, so the cursor advances inside it and each replay ends where it began; the time per
step is the cycle's over ``L + 1``. Two phases: every sequence starting the cycle with an
empty ring (``aligned``: they flush on the same step, as sequences that started together
do) and sequence ``b`` starting with ``b mod (L + 1)`` entries (``staggered``: every step
flushes some). Appends take their output from the checkpoint and the ring without
building the state (the provider's default); ``rebuild`` times the other route, the ring
replayed into the state as a flush does, aligned, and ``prefetch`` the default route with
the entries taken in order and the first chunk loaded beside the ring's length. The
baseline is the standard Triton ``selective_state_update`` in place on a bf16 state at the
same batch, ``L + 1`` steps in one graph as well.

``--spec`` times speculative decoding instead: ``T`` tokens a sequence (4), of which the
next step accepts ``--accepted`` (3), against the Triton ``selective_state_update``'s
speculative path at the same batch (2-D slot indices, a state written per token). A
replay row then runs in cycles too: from ``T`` entries (the tokens after a flush) the
committed ones grow by the accepted count each step until the tokens no longer fit and
the step flushes; one graph holds such a cycle (``spec_cycle``).

Bytes per step count the state rows only (checkpoint, ring entries, lengths), as
``benchmarks.ssu`` counts the state: the per-token inputs and the output are the same for
both ops. The roof is a same-run device copy of one step's standard state traffic.

    python -m benchmarks.replay [--rings 8,16,32] [--batches 1,64] [--sweep] [--out DIR]
    python -m benchmarks.replay --spec [--accepted 3] [--rings ...] [--batches ...]
    python -m benchmarks.replay --plot docs/replay_bench.json    # the plot, from the JSON
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    DOCS,
    plot_or_hint,
    plot_series,
    progress,
    roof_rate,
    time_us,
    write_json,
)
from benchmarks.common import (
    table as common_table,
)
from benchmarks.ssu import BATCHES, DSTATE, HEADDIM, NGROUPS, NHEADS, decode_call

RINGS = (8, 16, 32)
PHASES = ("aligned", "staggered")
# (column, phase, the launcher's tuning): appends take their output from the checkpoint and
# the ring (the default), replay the ring into the state as a flush does, or take the
# entries in order with the first chunk loaded beside the ring's length
VARIANTS = (("replay_aligned", "aligned", {}), ("replay_staggered", "staggered", {}),
            ("replay_rebuild_aligned", "aligned", {"direct": False}),
            ("replay_prefetch_aligned", "aligned", {"prefetch": True}))
BF16, F32, I32 = 2, 4, 4  # bytes


def checkpoint_bytes() -> int:
    """One request's checkpoint (bf16): the standard op's whole state."""
    return NHEADS * HEADDIM * DSTATE * BF16


def entry_bytes() -> int:
    """One ring entry of one request: x (bf16), the step size per head (float32), B (bf16)."""
    return NHEADS * HEADDIM * BF16 + NHEADS * F32 + NGROUPS * DSTATE * BF16


def memory_per_request(ring: int) -> int:
    """A replay row's bytes: the checkpoint, ``ring`` entries and the int32 length."""
    return checkpoint_bytes() + ring * entry_bytes() + I32


def cycle_bytes(ring: int) -> int:
    """State bytes one request moves over a cycle of ``ring + 1`` steps: the checkpoint and
    the entries in use read every step, one entry written per append, the checkpoint
    written at the flush, the length read and written every step."""
    ckpt, entry = checkpoint_bytes(), entry_bytes()
    read = sum(ckpt + n * entry + I32 for n in range(ring + 1))
    written = ring * entry + ckpt + (ring + 1) * I32
    return read + written


def replay_rows(batch: int, ring: int, phase: str, *, seed: int = 0,
                device: str = "cuda") -> dict[str, torch.Tensor]:
    """Replay rows for a cache of 2 x batch slots; the batch's rows (the call's
    ``state_batch_indices``, as ``benchmarks.ssu.decode_call`` draws them) start the cycle
    with ``phase``'s lengths, the ring entries drawn like the inputs."""
    call = decode_call(batch, redirect=False, seed=seed, device=device)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    slots = call["state"].shape[0]

    def rand(*shape: int, dtype: torch.dtype = torch.bfloat16, scale: float = 1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    lengths = torch.zeros(slots, dtype=torch.int32, device=device)
    if phase == "staggered":
        lengths[call["state_batch_indices"].long()] = (
            torch.arange(batch, device=device, dtype=torch.int32) % (ring + 1))
    return {
        "state": call["state"],
        "ring_x": rand(slots, ring, NHEADS, HEADDIM),
        "ring_dt": torch.nn.functional.softplus(rand(slots, ring, NHEADS, dtype=torch.float32)),
        "ring_B": rand(slots, ring, NGROUPS, DSTATE),
        "ring_len": lengths,
    }


def replay_call(batch: int, ring: int, phase: str, *, seed: int = 0,
                device: str = "cuda") -> dict[str, Any]:
    """The standard decode call of ``benchmarks.ssu`` on replay rows."""
    call = decode_call(batch, redirect=False, seed=seed, device=device)
    del call["state_scale"]  # a replay row has no quantized state (yet)
    return {**call, **replay_rows(batch, ring, phase, seed=seed, device=device)}


def cycle(fn: Callable[..., Any], call: dict[str, Any], steps: int) -> Callable[[], None]:
    """``steps`` consecutive calls of ``fn`` on ``call``: what one timed graph holds."""

    def run() -> None:
        for _ in range(steps):
            fn(**call)

    return run


# launch forms --sweep times (default phase aligned, the direct route): tile height, warps,
# register cap (the direct route's kernel uses 168 registers uncapped on sm_90)
SWEEP = ((16, 1, None), (16, 1, 128), (32, 1, None), (32, 2, None), (64, 2, None),
         (64, 4, None))


def sweep_key(block_d: int, warps: int, maxnreg: int | None) -> str:
    return f"block_d={block_d},warps={warps},maxnreg={maxnreg or 0}"


def measure(batch: int, ring: int, sweep: bool = False) -> dict[str, Any]:
    from mamba_ir.impls.triton.replay_state_update import replay_state_update as triton_replay
    from mamba_ir.impls.triton.selective_state_update import selective_state_update as triton_ssu

    steps = ring + 1
    row: dict[str, Any] = {"batch": batch, "ring": ring}
    standard_step = 2 * batch * checkpoint_bytes()
    roof = roof_rate(standard_step)
    row |= {"copy_tbs": roof["memcpy"] / 1e12, "kernel_copy_tbs": roof["kernel"] / 1e12,
            "roof_tbs": roof["roof"] / 1e12}
    row["bytes_per_step"] = {"ssu": standard_step, "replay": batch * cycle_bytes(ring) / steps}

    row["ssu_us"] = time_us(cycle(triton_ssu, decode_call(batch, redirect=False), steps)) / steps
    for name, phase, knobs in VARIANTS:
        call = replay_call(batch, ring, phase)
        start = call["ring_len"].clone()
        run = cycle(functools.partial(triton_replay, **knobs), call, steps)
        row[f"{name}_us"] = time_us(run) / steps
        # a whole number of cycles ran: every length is back where it started
        assert torch.equal(call["ring_len"], start), "the cycle did not close"
        del call
    if sweep:
        from mamba_ir.impls.triton.selective_state_update import Config

        call = replay_call(batch, ring, "aligned")
        row["sweep"] = {
            sweep_key(bd, w, reg): time_us(cycle(functools.partial(
                triton_replay, config=Config(bd, w), maxnreg=reg), call, steps)) / steps
            for bd, w, reg in SWEEP
        }
        del call
    for key in [k for k in row if k.endswith("_us")]:
        name = key.removesuffix("_us")
        moved = row["bytes_per_step"]["ssu" if name == "ssu" else "replay"]
        row[f"{name}_tbs"] = moved / (row[key] * 1e-6) / 1e12
        if name != "ssu":
            row[f"{name}_speedup"] = row["ssu_us"] / row[key]
    return row


def agreement(ring: int = 8, batch: int = 64, device: str = "cuda") -> dict[str, float]:
    """Triton against native over one staggered cycle (flushes, appends, the cursor carried
    from step to step): the largest ``|triton - native| / (1 + |native|)`` of the outputs
    (bf16) and of the rows' values (a bf16 checkpoint: one spacing is 2**-8 relative)."""
    from mamba_ir import get_op
    from mamba_ir.impls.triton.replay_state_update import replay_state_update as triton_replay

    op = get_op("replay_state_update")
    base = replay_call(batch, ring, "staggered", seed=1, device=device)
    runs = {"native": op.native, "triton": triton_replay}
    got = {}
    for name, fn in runs.items():
        call = {k: v.clone() if isinstance(v, torch.Tensor) and 0 not in v.stride() else v
                for k, v in base.items()}
        outs = []
        for _ in range(ring + 1):
            fn(**call)
            outs.append(call["out"].float().clone())
        rows = call["state_batch_indices"].long()
        value, _ = op.rows.value({k: call[k][rows] for k in op.rows.states})
        got[name] = (torch.stack(outs), value)
    def error(part: int) -> float:
        have, want = got["triton"][part], got["native"][part]
        return ((have - want).abs() / (1 + want.abs())).max().item()

    return {"out": error(0), "rows": error(1)}


# -- speculative decoding -------------------------------------------------------------------

TOKENS = 4  # tokens a speculative step verifies (1 + 3 drafts)
ACCEPTED = 3  # of which the next step accepts


def spec_cycle(ring: int, tokens: int = TOKENS, accepted: int = ACCEPTED) -> list[int]:
    """A row's ``ring_len`` before each step of a speculative cycle at a fixed accepted
    count: from ``tokens`` (a flush's), the committed entries plus the step's tokens,
    until they would not fit and the step flushes back to ``tokens``."""
    if not 1 <= tokens <= ring or not 0 <= accepted <= tokens:
        raise ValueError(f"tokens: expected 1 <= tokens <= ring ({ring}) and accepted in "
                         f"[0, tokens], got tokens={tokens}, accepted={accepted}")
    lengths = [tokens]
    while True:
        committed = lengths[-1] - tokens + accepted
        after = tokens if committed + tokens > ring else committed + tokens
        if after == tokens:
            return lengths
        lengths.append(after)


def _spec_tokens(batch: int, tokens: int, seed: int, device: str) -> dict[str, Any]:
    """Per-token inputs for ``tokens`` tokens a sequence, drawn as ``decode_call``'s."""
    g = torch.Generator(device=device).manual_seed(seed + 2)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device) * scale).to(torch.bfloat16)

    return {
        "x": rand(batch, tokens, NHEADS, HEADDIM),
        "dt": rand(batch, tokens, NHEADS, 1, scale=0.5).expand(batch, tokens, NHEADS, HEADDIM),
        "B": rand(batch, tokens, NGROUPS, DSTATE), "C": rand(batch, tokens, NGROUPS, DSTATE),
        "z": rand(batch, tokens, NHEADS, HEADDIM),
        "out": torch.empty(batch, tokens, NHEADS, HEADDIM, dtype=torch.bfloat16, device=device),
    }


def spec_replay_call(batch: int, ring: int, tokens: int = TOKENS, accepted: int = ACCEPTED, *,
                     seed: int = 0, device: str = "cuda") -> dict[str, Any]:
    """A speculative replay call in place: every row holds ``tokens`` entries (the cycle's
    start) and the previous step's ``accepted`` tokens stand."""
    spec_cycle(ring, tokens, accepted)  # raises on a cycle that cannot run
    call = replay_call(batch, ring, "aligned", seed=seed, device=device)
    call["ring_len"][call["state_batch_indices"].long()] = tokens
    nacc = torch.full((batch,), accepted, dtype=torch.int32, device=device)
    return {**call, **_spec_tokens(batch, tokens, seed, device), "num_accepted_tokens": nacc}


def spec_ssu_call(batch: int, tokens: int = TOKENS, accepted: int = ACCEPTED, *,
                  seed: int = 0, device: str = "cuda") -> dict[str, Any]:
    """The standard op's speculative step at the same batch, in place: a bf16 state per
    token (2-D slot indices, ``tokens`` columns), the state read from column
    ``accepted - 1`` and written to every column."""
    call = decode_call(batch * tokens, redirect=False, seed=seed, device=device)
    del call["state_scale"]
    rows = call["state_batch_indices"].view(batch, tokens)
    return {**call, **_spec_tokens(batch, tokens, seed, device), "state_batch_indices": rows,
            "num_accepted_tokens": torch.full((batch,), accepted, dtype=torch.int32,
                                              device=device)}


def spec_memory_per_request(ring: int, tokens: int = TOKENS) -> dict[str, int]:
    """State bytes a request holds: the standard op's state per token, replay's row."""
    return {"ssu": tokens * checkpoint_bytes(), "replay": memory_per_request(ring)}


def measure_spec(batch: int, ring: int, accepted: int = ACCEPTED) -> dict[str, Any]:
    from mamba_ir.impls.triton.replay_state_update import replay_state_update as triton_replay
    from mamba_ir.impls.triton.selective_state_update import selective_state_update as triton_ssu

    steps = len(spec_cycle(ring, TOKENS, accepted))
    row: dict[str, Any] = {"batch": batch, "ring": ring, "tokens": TOKENS,
                           "accepted": accepted, "cycle": steps}
    row["ssu_spec_us"] = time_us(cycle(triton_ssu, spec_ssu_call(batch, TOKENS, accepted),
                                       steps)) / steps
    call = spec_replay_call(batch, ring, TOKENS, accepted)
    start = call["ring_len"].clone()
    row["replay_spec_us"] = time_us(cycle(triton_replay, call, steps)) / steps
    assert torch.equal(call["ring_len"], start), "the cycle did not close"
    row["replay_spec_speedup"] = row["ssu_spec_us"] / row["replay_spec_us"]
    return row


SPEC_COLUMNS = [
    ("ring", "L", "{:>3}"),
    ("batch", "batch", "{:>5}"),
    ("cycle", "steps", "{:>5}"),
    ("ssu_spec_us", "ssu spec us", "{:>11.1f}"),
    ("replay_spec_us", "replay spec us", "{:>14.1f}"),
    ("replay_spec_speedup", "x ssu", "{:>5.2f}"),
]


COLUMNS = [
    ("ring", "L", "{:>3}"),
    ("batch", "batch", "{:>5}"),
    ("ssu_us", "ssu us", "{:>8.1f}"),
    ("replay_aligned_us", "aligned us", "{:>10.1f}"),
    ("replay_aligned_speedup", "x ssu", "{:>5.2f}"),
    ("replay_staggered_us", "staggered us", "{:>12.1f}"),
    ("replay_staggered_speedup", "x ssu", "{:>5.2f}"),
    ("replay_rebuild_aligned_us", "rebuild us", "{:>10.1f}"),
    ("replay_rebuild_aligned_speedup", "x ssu", "{:>5.2f}"),
    ("replay_prefetch_aligned_us", "prefetch us", "{:>11.1f}"),
    ("replay_prefetch_aligned_speedup", "x ssu", "{:>5.2f}"),
    ("replay_aligned_tbs", "TB/s", "{:>5.2f}"),
    ("roof_tbs", "roof TB/s", "{:>9.2f}"),
]


def table(rows: list[dict[str, Any]]) -> str:
    return common_table(rows, COLUMNS)


def plot(json_path: Path) -> Path:
    """Speedup over the standard Triton SSU against batch, one line per ring and variant."""
    data = json.loads(json_path.read_text())
    rows = data["rows"]
    batches = sorted({r["batch"] for r in rows})
    by = {(r["ring"], r["batch"]): r for r in rows}
    series = {}
    for ring in sorted({r["ring"] for r in rows}):
        for name, _, _ in VARIANTS:
            label = name.removeprefix("replay_").replace("_", ", ")
            series[f"L = {ring}, {label}"] = [
                by[(ring, b)].get(f"{name}_speedup", float("nan")) for b in batches]
    env = data["environment"]
    return plot_series(
        json_path.with_suffix(".png"), batches, series,
        xlabel="batch (sequences, one token each)",
        ylabel="time per step: selective_state_update / replay",
        title=f"replay_state_update decode, Mamba2 bf16, per step over whole cycles\n"
              f"{env.get('device', '?')}, {env['date']}",
        roof=[1.0] * len(batches), roof_label="selective_state_update (Triton, in place)",
    )


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rings", type=_ints, default=RINGS, help="ring lengths, e.g. 8,16,32")
    parser.add_argument("--batches", type=_ints, default=BATCHES, help="e.g. 1,64,512")
    parser.add_argument("--out", type=Path, default=DOCS, help="directory for the JSON")
    parser.add_argument("--plot", type=Path, help="only draw the PNG from this JSON")
    parser.add_argument("--sweep", action="store_true",
                        help="also time launch forms (tile, warps, register cap), aligned")
    parser.add_argument("--spec", action="store_true",
                        help=f"time speculative decoding ({TOKENS} tokens a step) instead")
    parser.add_argument("--accepted", type=int, default=ACCEPTED,
                        help="with --spec: tokens the next step accepts, of the 4")
    args = parser.parse_args()
    if args.plot:
        print(plot(args.plot))
        return
    if args.spec:
        cases = [(r, b) for r in args.rings for b in args.batches]
        rows = [measure_spec(b, r, args.accepted)
                for r, b in progress(cases, "speculative replay decode")]
        print(common_table(rows, SPEC_COLUMNS))
        memory = {str(r): spec_memory_per_request(r) for r in args.rings}
        print("state memory per request (bytes):", memory)
        payload = {"shapes": dict(nheads=NHEADS, headdim=HEADDIM, dstate=DSTATE,
                                  ngroups=NGROUPS, state="bfloat16", inputs="bfloat16",
                                  tokens=TOKENS, accepted=args.accepted, in_place=True),
                   "memory_per_request": memory, "rows": rows}
        print(write_json("replay_spec_bench.json", payload, args.out))
        return
    cases = [(r, b) for r in args.rings for b in args.batches]
    rows = [measure(b, r, args.sweep) for r, b in progress(cases, "replay decode")]
    print(table(rows))
    if args.sweep:
        for row in rows:
            best = sorted(row["sweep"].items(), key=lambda kv: kv[1])[:3]
            print("sweep", row["ring"], row["batch"],
                  "  ".join(f"{k}: {v:.1f}us" for k, v in best))
    check = {f"L={r}": agreement(r) for r in args.rings}
    print("agreement with native (max relative error):", check)
    memory = {str(r): memory_per_request(r) for r in args.rings}
    print("state memory per request (bytes):", {"ssu": checkpoint_bytes(), **memory})
    payload = {
        "shapes": dict(nheads=NHEADS, headdim=HEADDIM, dstate=DSTATE, ngroups=NGROUPS,
                       state="bfloat16", inputs="bfloat16", ring_dt="float32",
                       A="float32 tied", tokens=1, dt_softplus=True, z=True, D=True,
                       dt_bias=True, indices="int32", in_place=True),
        "memory_per_request": {"ssu": checkpoint_bytes(), "replay": memory},
        "agreement": check,
        "rows": rows,
    }
    path = write_json("replay_bench.json", payload, args.out)
    print(path)
    plot_or_hint(plot, path, f"--plot {path}")


if __name__ == "__main__":
    main()
