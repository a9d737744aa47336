"""selective_scan (Mamba1 prefill) benchmark: the Triton op against today's prefill path.

Falcon-Mamba-7B / Jamba mixer shapes (dim 8192, dstate 16, one group, bf16 inputs and
state), laid out as vLLM's Mamba1 mixer passes them: ``u`` and ``z`` the two halves of one
in_proj output, ``delta`` a dt_proj output, ``B`` and ``C`` column slices of one x_proj
output, all transposed views of ``(tokens, ...)`` tensors. 2,048 / 8,192 / 32,768 tokens
split evenly over 1, 8 and 64 sequences, timed as CUDA-graph replays. The path it replaces
is the multi-token varlen ``selective_state_update`` (Triton provider) in its Mamba1 layout
on the same tensors. Bytes/s counts what the op must move (u, delta, z, B, C read, out
written, each sequence's state row read and written) against a device copy of as many
bytes measured in the same run. ``--sweep`` also times a grid of launch configurations.

    python -m benchmarks.selective_scan [--sweep] [--out DIR]     # on the GPU machine
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import DOCS, progress, roof_rate, time_us, write_json

DIM, DSTATE, DT_RANK = 8192, 16, 256
TOKENS = (2048, 8192, 32768)
SEQS = (1, 8, 64)
SWEEP_CASES = ((2048, 1), (8192, 1), (8192, 8), (32768, 64))


def make_call(ntok: int, nseq: int, *, dim: int = DIM, dstate: int = DSTATE,
              device: str = "cuda", seed: int = 0) -> dict[str, Any]:
    """A prefill call in vLLM's Mamba1 layout; a state cache of 2 x nseq rows, each
    sequence read and written in place at a random row."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device) * scale

    bf16 = torch.bfloat16
    proj = randn(ntok, 2 * dim).to(bf16)
    params = randn(ntok, DT_RANK + 2 * dstate).to(bf16)
    lengths = [ntok // nseq] * nseq
    lengths[-1] += ntok - sum(lengths)
    qsl = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                       device=device)
    rows = torch.randperm(2 * nseq, generator=g, device=device)[:nseq].to(torch.int32)
    return dict(
        u=proj[:, :dim].t(),
        ssm_states=randn(2 * nseq, dim, dstate, scale=0.5).to(bf16),
        delta=randn(ntok, dim, scale=0.5).to(bf16).t(),
        A=-torch.arange(1, dstate + 1, dtype=torch.float32).repeat(dim, 1).to(device),
        B=params[:, DT_RANK : DT_RANK + dstate].t(),
        C=params[:, DT_RANK + dstate :].t(),
        D=torch.ones(dim, device=device),
        z=proj[:, dim:].t(),
        delta_bias=randn(dim, scale=0.1) - 4.0,
        delta_softplus=True,
        query_start_loc=qsl,
        cache_indices=rows,
        has_initial_state=torch.ones(nseq, dtype=torch.bool, device=device),
        pad_slot_id=-1,
        out=torch.empty(dim, ntok, dtype=bf16, device=device),
    )


def ssu_args(call: dict[str, Any]) -> dict[str, Any]:
    """The same step as the multi-token varlen selective_state_update (Mamba1 layout)."""
    return dict(
        state=call["ssm_states"],
        x=call["u"].t(),
        dt=call["delta"].t(),
        A=call["A"],
        B=call["B"].t(),
        C=call["C"].t(),
        D=call["D"],
        z=call["z"].t(),
        dt_bias=call["delta_bias"],
        dt_softplus=True,
        state_batch_indices=call["cache_indices"],
        pad_slot_id=-1,
        cu_seqlens=call["query_start_loc"],
        out=call["out"].t(),
    )


def op_bytes(ntok: int, nseq: int) -> int:
    """Bytes the op must move: inputs read once, output written, state rows read + written."""
    return 2 * ntok * (4 * DIM + 2 * DSTATE) + 2 * nseq * DIM * DSTATE * 2


def sweep_configs() -> list[Any]:
    from mamba_ir.impls.triton.selective_scan import Config

    return [Config(d, t, w) for d in (8, 16, 32, 64) for t in (8, 16, 32) for w in (1, 2, 4, 8)
            if d * DSTATE * t <= 16384]


def measure(ntok: int, nseq: int, sweep: bool) -> dict[str, Any]:
    from mamba_ir.impls.triton.selective_scan import selective_scan as scan
    from mamba_ir.impls.triton.selective_state_update import selective_state_update as ssu

    call = make_call(ntok, nseq)
    nbytes = op_bytes(ntok, nseq)
    row: dict[str, Any] = {"tokens": ntok, "seqs": nseq, "bytes": nbytes}
    row.update({f"{k}_tbs": v / 1e12 for k, v in roof_rate(nbytes).items()})
    row["triton_us"] = time_us(lambda: scan(**call))
    row["ssu_us"] = time_us(lambda: ssu(**ssu_args(call)), reps=50 if ntok > 8192 else 100)
    row["triton_tbs"] = nbytes / (row["triton_us"] * 1e-6) / 1e12
    row["triton_vs_roof"] = row["triton_tbs"] / row["roof_tbs"]
    row["speedup_vs_ssu"] = row["ssu_us"] / row["triton_us"]
    if sweep and (ntok, nseq) in SWEEP_CASES:
        row["sweep"] = {}
        for c in sweep_configs():
            key = f"d{c.block_d}_t{c.block_t}_w{c.num_warps}"
            try:
                row["sweep"][key] = time_us(lambda c=c: scan(**call, config=c))
            except Exception as exc:  # a config that does not compile: say so, go on
                row.setdefault("sweep_errors", {})[key] = f"{exc}"[:200]
    return row


def agreement() -> dict[str, float]:
    """Max |difference| of Triton against native (fp32 per-token loop) on one call."""
    from mamba_ir import get_op
    from mamba_ir.impls.triton.selective_scan import selective_scan as scan

    base = make_call(2048, 8, seed=1)
    got = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in base.items()}
    ref = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in base.items()}
    scan(**got)
    get_op("selective_scan").native(**ref)
    rows = base["cache_indices"].long()
    return {
        "out_max_abs": (got["out"].float() - ref["out"].float()).abs().max().item(),
        "out_max_abs_ref": ref["out"].float().abs().max().item(),
        "state_max_abs": (got["ssm_states"][rows].float() - ref["ssm_states"][rows].float())
        .abs().max().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time launch configs")
    parser.add_argument("--out", type=Path, default=DOCS, help="directory for the JSON")
    args = parser.parse_args()
    from mamba_ir.impls.triton.selective_scan import default_config

    cases = [(t, s) for t in TOKENS for s in SEQS]
    rows = [measure(t, s, args.sweep) for t, s in progress(cases, "selective scan")]
    print(f"{'tokens':>6} {'seqs':>4} {'triton us':>9} {'ssu us':>8} {'x ssu':>5} "
          f"{'TB/s':>5} {'%copy':>6}")
    for r in rows:
        print(f"{r['tokens']:>6} {r['seqs']:>4} {r['triton_us']:>9.1f} {r['ssu_us']:>8.1f} "
              f"{r['speedup_vs_ssu']:>5.1f} {r['triton_tbs']:>5.2f} {r['triton_vs_roof']:>6.1%}")
        if "sweep" in r:
            best = sorted(r["sweep"].items(), key=lambda kv: kv[1])[:3]
            print("   best:", "  ".join(f"{k}: {v:.1f}us" for k, v in best),
                  r.get("sweep_errors", ""))
    check = agreement()
    print("agreement with native:", check)
    cfg = default_config(DIM, DSTATE)
    payload = {
        "shapes": dict(dim=DIM, dstate=DSTATE, ngroups=1, inputs="bfloat16 transposed views "
                       "of in_proj / dt_proj / x_proj outputs (vLLM's Mamba1 mixer)",
                       state="bfloat16", A="float32 (dim, dstate)", D="float32 (dim,)",
                       delta_bias="float32 (dim,)", delta_softplus=True, z=True),
        "default_config": f"d{cfg.block_d}_t{cfg.block_t}_w{cfg.num_warps}",
        "agreement": check,
        "rows": rows,
    }
    print(write_json("selective_scan_bench.json", payload, args.out))


if __name__ == "__main__":
    main()
