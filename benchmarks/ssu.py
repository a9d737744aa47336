"""selective_state_update decode benchmark: Triton vs FlashInfer vs native, against the copy roof.

Mamba2 decode shapes (nheads=128, headdim=64, dstate=128, ngroups=8, bf16 state; dt, A,
D and dt_bias tied over headdim as Mamba2 passes them), one token per sequence, timed as
CUDA-graph replays. Achieved bandwidth counts the state bytes only (one read and one
write of every addressed row, the part that cannot be avoided), and the roof is a
device-to-device copy of the same bytes measured in the same run.

Also measured: src redirect (read rows src, write rows dst) against in-place, and the
two-kernel alternative (copy_state_blocks, then in-place). ``--sweep`` times a grid of
launch configurations per batch (how the defaults were chosen).

``--quant`` measures the state dtypes instead: bf16 against quantized int16, int8 and
float8 e4m3 states (one float32 scale per dstate block), Triton in place at the same
shapes. There every byte the call moves counts (state and scales read and written, the
per-token inputs read, the output written), against a same-run copy of as many bytes, and
each dtype's time is also given as a speedup over the bf16 state's at the same batch, and
with stochastic rounding (``rand_seed``) as its cost over rounding to nearest. There
``--sweep`` times each launch config with and without stochastic rounding.

    python -m benchmarks.ssu [--sweep] [--out DIR]      # on the GPU machine
    python -m benchmarks.ssu --quant [--sweep] [--out DIR]
    python -m benchmarks.ssu --plot docs/ssu_bench.json  # the plot, from the JSON (either)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    DOCS,
    copy_rate,
    kernel_copy_rate,
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
from mamba_ir.ops._quant import QUANTIZED, ROUNDED, quantize

BATCHES = (1, 8, 32, 64, 128, 256, 512)
NATIVE_MAX_BATCH = 128  # native eager allocates fp32 copies of every row: slow beyond this
NHEADS, HEADDIM, DSTATE, NGROUPS = 128, 64, 128, 8
STATE_DTYPES = {
    "bfloat16": torch.bfloat16,
    "int16": torch.int16,
    "int8": torch.int8,
    "float8_e4m3fn": torch.float8_e4m3fn,
}


def decode_call(
    batch: int,
    *,
    redirect: bool,
    seed: int = 0,
    state_dtype: torch.dtype = torch.bfloat16,
    device: str = "cuda",
) -> dict[str, Any]:
    """A Mamba2 decode call on a cache of 2 x batch rows (in place: the first half); a
    quantized ``state_dtype`` comes with its scales (``state_scale``)."""
    g = torch.Generator(device=device).manual_seed(seed)
    bf16, dev = torch.bfloat16, device

    def rand(*shape, dtype=bf16, scale=1.0):
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(dtype)

    h = rand(2 * batch, NHEADS, HEADDIM, DSTATE, dtype=torch.float32, scale=0.5)
    if state_dtype in QUANTIZED:
        state, state_scale = quantize(h, state_dtype)
    else:
        state, state_scale = h.to(state_dtype), None
    rows = torch.randperm(2 * batch, generator=g, device=dev).to(torch.int32)
    return dict(
        state=state,
        state_scale=state_scale,
        x=rand(batch, NHEADS, HEADDIM),
        dt=rand(batch, NHEADS, 1, scale=0.5).expand(batch, NHEADS, HEADDIM),
        A=(-torch.rand(NHEADS, 1, 1, generator=g, device=dev) - 0.5).expand(
            NHEADS, HEADDIM, DSTATE
        ),
        B=rand(batch, NGROUPS, DSTATE),
        C=rand(batch, NGROUPS, DSTATE),
        D=rand(NHEADS, 1).expand(NHEADS, HEADDIM),
        z=rand(batch, NHEADS, HEADDIM),
        dt_bias=rand(NHEADS, 1).expand(NHEADS, HEADDIM),
        dt_softplus=True,
        state_batch_indices=rows[:batch],
        dst_state_batch_indices=rows[batch:] if redirect else None,
        pad_slot_id=-1,
        out=torch.empty(batch, NHEADS, HEADDIM, dtype=bf16, device=dev),
    )


def raw_flashinfer() -> Any:
    """``flashinfer.mamba.selective_state_update`` itself, or None where it cannot be had."""
    try:
        from flashinfer.mamba import selective_state_update
    except Exception:  # not installed, or no kernel for this machine
        return None
    return selective_state_update


def raw_flashinfer_args(call: dict[str, Any]) -> dict[str, Any]:
    """The arguments of an op call that FlashInfer's own function takes."""
    keys = (
        "state",
        "x",
        "dt",
        "A",
        "B",
        "C",
        "D",
        "z",
        "dt_bias",
        "dt_softplus",
        "state_batch_indices",
        "dst_state_batch_indices",
        "pad_slot_id",
        "out",
    )
    return {k: call[k] for k in keys}


def state_bytes(batch: int, state_dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of state one call reads (and again writes)."""
    return batch * NHEADS * HEADDIM * DSTATE * state_dtype.itemsize


def moved_bytes(batch: int, state_dtype: torch.dtype) -> dict[str, int]:
    """Every byte an in-place decode call of :func:`decode_call` moves, by part: the state
    and its float32 scales (one per dstate block), each read and written once; the
    per-token inputs read (x, z, B, C, dt one per head, bf16; the int32 row index) and
    the output written; the per-head parameters (A float32, D and dt_bias bf16), once."""
    rows = batch * NHEADS * HEADDIM
    parts = {
        "state": 2 * state_bytes(batch, state_dtype),
        "scales": 2 * rows * 4 if state_dtype in QUANTIZED else 0,
        "inputs": 2 * (2 * rows + 2 * batch * NGROUPS * DSTATE + batch * NHEADS) + 4 * batch,
        "output": 2 * rows,
        "parameters": NHEADS * (4 + 2 + 2),
    }
    parts["total"] = sum(parts.values())
    return parts


def sweep_configs() -> list[Any]:
    from mamba_ir.impls.triton.selective_state_update import Config

    pairs = ((8, 1), (8, 2), (16, 1), (16, 2), (16, 4), (32, 1), (32, 2), (32, 4), (64, 4))
    return [Config(bd, w) for bd, w in pairs] + [Config(16, 2, stream=True)]


def config_key(c: Any) -> str:
    return f"block_d={c.block_d},warps={c.num_warps},stream={int(c.stream)}"


COPY_SWEEP = ((1024, 2), (2048, 2), (2048, 4), (4096, 4), (4096, 8), (8192, 8))


def measure(batch: int, fi: Any, sweep: bool) -> dict[str, Any]:
    from mamba_ir import get_op
    from mamba_ir.impls.triton.copy_state_blocks import copy_state_blocks as triton_copy
    from mamba_ir.impls.triton.selective_state_update import selective_state_update as triton_ssu

    nbytes = state_bytes(batch)
    row = {"batch": batch, "state_bytes": nbytes}
    row["copy_tbs"] = copy_rate(nbytes) / 1e12
    row["kernel_copy_tbs"] = kernel_copy_rate(nbytes) / 1e12
    row["roof_tbs"] = max(row["copy_tbs"], row["kernel_copy_tbs"])
    inplace = decode_call(batch, redirect=False)
    redirect = decode_call(batch, redirect=True)
    src, dst = redirect["state_batch_indices"], redirect["dst_state_batch_indices"]
    two_kernel = dict(redirect, state_batch_indices=dst, dst_state_batch_indices=None)

    def tbs(us: float) -> float:
        return 2 * nbytes / (us * 1e-6) / 1e12

    row["triton_us"] = time_us(lambda: triton_ssu(**inplace))
    row["triton_redirect_us"] = time_us(lambda: triton_ssu(**redirect))

    def copy_then_inplace() -> None:
        triton_copy(two_kernel["state"], src, dst, -1)
        triton_ssu(**two_kernel)

    row["copy_state_blocks_us"] = time_us(lambda: triton_copy(redirect["state"], src, dst, -1))
    row["copy_then_inplace_us"] = time_us(copy_then_inplace)
    if fi is not None:
        try:
            row["flashinfer_us"] = time_us(lambda: fi(**raw_flashinfer_args(inplace)))
            row["flashinfer_redirect_us"] = time_us(lambda: fi(**raw_flashinfer_args(redirect)))
        except Exception as exc:  # report and go on: the other columns still stand
            row["flashinfer_error"] = f"{type(exc).__name__}: {exc}"[:300]
    if batch <= NATIVE_MAX_BATCH:
        native = get_op("selective_state_update").native
        row["native_us"] = time_us(lambda: native(**inplace), graph=False, reps=20)
    for key in [k for k in row if k.endswith("_us")]:
        row[key.removesuffix("_us") + "_tbs"] = tbs(row[key])
    row["triton_vs_copy"] = row["triton_tbs"] / row["copy_tbs"]
    row["triton_vs_roof"] = row["triton_tbs"] / row["roof_tbs"]
    if sweep:
        row["sweep"] = {
            config_key(c): time_us(lambda c=c: triton_ssu(**inplace, config=c))
            for c in sweep_configs()
        }
        row["copy_sweep"] = {
            f"block={b},warps={w}": time_us(
                lambda b=b, w=w: triton_copy(redirect["state"], src, dst, -1, block=b, num_warps=w)
            )
            for b, w in COPY_SWEEP
        }
    return row


def agreement(fi: Any) -> dict[str, float]:
    """Max |difference| of Triton against FlashInfer and native on one decode call."""
    from mamba_ir import get_op
    from mamba_ir.impls.triton.selective_state_update import selective_state_update as triton_ssu

    result = {}
    base = decode_call(64, redirect=True, seed=1)
    runs = {"native": get_op("selective_state_update").native, "triton": triton_ssu}
    if fi is not None:
        runs["flashinfer"] = lambda **c: fi(**raw_flashinfer_args(c))
    got = {}
    for name, fn in runs.items():
        call = {
            k: v.clone() if isinstance(v, torch.Tensor) and 0 not in v.stride() else v
            for k, v in base.items()
        }
        try:
            fn(**call)
        except Exception as exc:
            result[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        dst = call["dst_state_batch_indices"].long()
        got[name] = (call["out"].float(), call["state"][dst].float())
    for name in got:
        if name != "triton" and "triton" in got:
            result[f"triton_vs_{name}_out"] = (got["triton"][0] - got[name][0]).abs().max().item()
            result[f"triton_vs_{name}_state"] = (got["triton"][1] - got[name][1]).abs().max().item()
    return result


# tile heights x warps: one-byte states' candidates hold 128 (32 x 1), 64 (16 x 1, 32 x 2,
# 64 x 4) or 32 (32 x 4, 64 x 8) float32 values per thread
QUANT_SWEEP = ((8, 1), (16, 1), (16, 2), (32, 1), (32, 2), (32, 4), (64, 2), (64, 4), (64, 8))


def quant_sweep_configs() -> list[Any]:
    from mamba_ir.impls.triton.selective_state_update import Config

    return [Config(bd, w) for bd, w in QUANT_SWEEP]


def measure_dtypes(batch: int, dtypes: list[str], sweep: bool) -> list[dict[str, Any]]:
    """One row per state dtype at ``batch``: Triton in place, timed, against the copy roof
    of as many bytes as the call moves."""
    from mamba_ir.impls.triton.selective_state_update import selective_state_update as triton_ssu

    rows = []
    for name in dtypes:
        call = decode_call(batch, redirect=False, state_dtype=STATE_DTYPES[name])
        row: dict[str, Any] = {"batch": batch, "state_dtype": name,
                               "bytes": moved_bytes(batch, STATE_DTYPES[name])}
        roof = roof_rate(row["bytes"]["total"] // 2)  # a copy of half reads and writes all
        row |= {"copy_tbs": roof["memcpy"] / 1e12, "kernel_copy_tbs": roof["kernel"] / 1e12,
                "roof_tbs": roof["roof"] / 1e12}
        row["triton_us"] = time_us(lambda call=call: triton_ssu(**call))
        if STATE_DTYPES[name] in ROUNDED:  # the seed a serving step would pass, on the device
            seeded = call | {"rand_seed": torch.tensor(batch, device=call["x"].device)}
            row["triton_sr_us"] = time_us(lambda call=seeded: triton_ssu(**call))
        if sweep:
            row["sweep"] = {
                config_key(c): time_us(lambda c=c, call=call: triton_ssu(**call, config=c))
                for c in quant_sweep_configs()
            }
            if "triton_sr_us" in row:  # the random bits hold registers of their own
                row["sr_sweep"] = {
                    config_key(c): time_us(lambda c=c, call=seeded: triton_ssu(**call, config=c))
                    for c in quant_sweep_configs()
                }
        del call
        rows.append(row)
    return rows


def quant_rates(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` of :func:`measure_dtypes` with what follows from their times: bytes/s,
    the share of the copy roof, and the speedup over the bf16 state at the same batch."""
    bf16 = {r["batch"]: r["triton_us"] for r in rows if r["state_dtype"] == "bfloat16"}
    for r in rows:
        r["triton_tbs"] = r["bytes"]["total"] / (r["triton_us"] * 1e-6) / 1e12
        r["triton_vs_roof"] = r["triton_tbs"] / r["roof_tbs"]
        if r["batch"] in bf16:
            r["speedup_vs_bf16"] = bf16[r["batch"]] / r["triton_us"]
        if "triton_sr_us" in r:
            r["sr_slowdown"] = r["triton_sr_us"] / r["triton_us"] - 1
    return rows


def quant_agreement(dtypes: list[str]) -> dict[str, float]:
    """Per quantized dtype, on one decode call at batch 64: Triton's output against
    native's (max |difference|), and its written state against native's in quantization
    steps (values that differ by more than one step: 0 expected)."""
    from mamba_ir import get_op
    from mamba_ir.impls.triton.selective_state_update import selective_state_update as triton_ssu

    op = get_op("selective_state_update")
    result = {}
    for name in dtypes:
        if STATE_DTYPES[name] not in QUANTIZED:
            continue
        base = decode_call(64, redirect=True, seed=1, state_dtype=STATE_DTYPES[name])
        got = {}
        for provider, fn in (("native", op.native), ("triton", triton_ssu)):
            call = {k: v.clone() if isinstance(v, torch.Tensor) and 0 not in v.stride() else v
                    for k, v in base.items()}
            fn(**call)
            dst = call["dst_state_batch_indices"].long()
            got[provider] = (call["out"].float(),
                             op.rows.value({"state": call["state"][dst],
                                            "state_scale": call["state_scale"][dst]}))
        (ref_v, ref_step), (tri_v, tri_step) = got["native"][1], got["triton"][1]
        beyond = (tri_v - ref_v).abs() > torch.maximum(ref_step, tri_step) * (1 + 1e-6)
        result[f"{name}_out"] = (got["triton"][0] - got["native"][0]).abs().max().item()
        result[f"{name}_state_beyond_one_step"] = int(beyond.sum())
    return result


QUANT_COLUMNS = [
    ("batch", "batch", "{:>5}"),
    ("state_dtype", "state", "{:>13}"),
    ("total_mib", "MiB moved", "{:>9.2f}"),
    ("triton_us", "triton us", "{:>9.1f}"),
    ("triton_tbs", "TB/s", "{:>5.2f}"),
    ("roof_tbs", "roof TB/s", "{:>9.2f}"),
    ("triton_vs_roof", "%roof", "{:>6.1%}"),
    ("speedup_vs_bf16", "vs bf16", "{:>7.2f}"),
    ("triton_sr_us", "stoch. us", "{:>9.1f}"),
    ("sr_slowdown", "stoch. cost", "{:>11.1%}"),
]


def quant_table(rows: list[dict[str, Any]]) -> str:
    return table([r | {"total_mib": r["bytes"]["total"] / 2**20} for r in rows], QUANT_COLUMNS)


COLUMNS = [
    ("batch", "batch", "{:>5}"),
    ("copy_tbs", "memcpy TB/s", "{:>11.2f}"),
    ("kernel_copy_tbs", "kcopy TB/s", "{:>10.2f}"),
    ("triton_us", "triton us", "{:>9.1f}"),
    ("triton_tbs", "TB/s", "{:>5.2f}"),
    ("triton_vs_copy", "%memcpy", "{:>7.1%}"),
    ("triton_vs_roof", "%best", "{:>6.1%}"),
    ("triton_redirect_us", "redirect us", "{:>11.1f}"),
    ("copy_then_inplace_us", "copy+inpl us", "{:>12.1f}"),
    ("copy_state_blocks_tbs", "copy_blocks TB/s", "{:>16.2f}"),
    ("flashinfer_us", "flashinfer us", "{:>13.1f}"),
    ("flashinfer_redirect_us", "fi redirect us", "{:>14.1f}"),
    ("native_us", "native us", "{:>9.1f}"),
]


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]] | None = None) -> str:
    return common_table(rows, COLUMNS if columns is None else columns)


def _short(key: str) -> str:
    return key.replace(",stream=0", "").replace("block_d=", "tile ").replace(",warps=", "x128, w")


def plot(json_path: Path, extra: str | None = None) -> Path:
    """TB/s against batch; ``extra`` names a swept launch config to draw as its own line.
    The JSON of ``--quant`` draws one line per state dtype."""
    data = json.loads(json_path.read_text())
    if "state_dtypes" in data:
        return plot_quant(json_path, data)
    rows = data["rows"]
    x = [r["batch"] for r in rows]
    used = data.get("default_config", "the default launch config")
    series = {f"triton in place ({_short(used)})": [r["triton_tbs"] for r in rows]}
    if extra:
        nbytes = [2 * r["state_bytes"] / 1e12 for r in rows]
        series[f"triton in place ({_short(extra)}, sweep)"] = [
            b / (r["sweep"][extra] * 1e-6) for b, r in zip(nbytes, rows, strict=True)
        ]
    series["triton src redirect"] = [r["triton_redirect_tbs"] for r in rows]
    if all("flashinfer_tbs" in r for r in rows):
        series["flashinfer 0.7.2 in place"] = [r["flashinfer_tbs"] for r in rows]
    series["copy_state_blocks + triton in place"] = [r["copy_then_inplace_tbs"] for r in rows]
    env = data["environment"]
    return plot_series(
        json_path.with_suffix(".png"),
        x,
        series,
        xlabel="batch (sequences, one token each)",
        ylabel="state TB/s (read + write)",
        title=f"selective_state_update decode, Mamba2 bf16 state\n"
        f"{env.get('device', '?')}, {env['date']}",
        roof=[r["roof_tbs"] for r in rows],
        roof_label="device-to-device copy (best of memcpy and a copy kernel)",
    )


def plot_quant(json_path: Path, data: dict[str, Any]) -> Path:
    """Bytes/s moved against batch, one line per state dtype, under the copy roof."""
    rows = data["rows"]
    batches = sorted({r["batch"] for r in rows})
    by = {(r["state_dtype"], r["batch"]): r for r in rows}
    series = {}
    for name in data["state_dtypes"]:
        last = by[(name, batches[-1])]
        label = f"{name} state"
        if "speedup_vs_bf16" in last and name != "bfloat16":
            label += f" ({last['speedup_vs_bf16']:.2f}x bf16 at batch {batches[-1]})"
        series[label] = [by[(name, b)]["triton_tbs"] for b in batches]
    env = data["environment"]
    return plot_series(
        json_path.with_suffix(".png"),
        batches,
        series,
        xlabel="batch (sequences, one token each)",
        ylabel="TB/s moved (state, scales, inputs, output)",
        title=f"selective_state_update decode by state dtype, Triton in place\n"
        f"{env.get('device', '?')}, {env['date']}",
        roof=[max(by[(n, b)]["roof_tbs"] for n in data["state_dtypes"]) for b in batches],
        roof_label="device-to-device copy of as many bytes (best of memcpy and a kernel)",
    )


def main_quant(args: argparse.Namespace) -> None:
    from mamba_ir.impls.triton.selective_state_update import default_config

    dtypes = args.state_dtypes.split(",")
    unknown = sorted(set(dtypes) - set(STATE_DTYPES))
    if unknown:
        raise SystemExit(f"--state-dtypes: unknown {unknown}; choose from {list(STATE_DTYPES)}")
    rows = [r for b in progress(BATCHES, "ssu decode by state dtype")
            for r in measure_dtypes(b, dtypes, args.sweep)]
    rows = quant_rates(rows)
    print(quant_table(rows))
    if args.sweep:
        for row in rows:
            for name in ("sweep", "sr_sweep"):
                best = sorted(row.get(name, {}).items(), key=lambda kv: kv[1])[:4]
                if best:
                    print(name, row["state_dtype"], row["batch"],
                          "  ".join(f"{k}: {v:.1f}us" for k, v in best))
    check = quant_agreement(dtypes)
    print("agreement with native:", check)
    payload = {
        "shapes": dict(nheads=NHEADS, headdim=HEADDIM, dstate=DSTATE, ngroups=NGROUPS,
                       inputs="bfloat16", A="float32 tied", tokens=1, dt_softplus=True,
                       z=True, D=True, dt_bias=True, indices="int32", in_place=True),
        "state_dtypes": dtypes,
        "agreement": check,
        "default_configs": {
            name: config_key(default_config(HEADDIM, DSTATE, STATE_DTYPES[name].itemsize))
            for name in dtypes
        },
        "rows": rows,
    }
    path = write_json("ssu_quant_bench.json", payload, args.out)
    print(path)
    plot_or_hint(plot, path, f"--plot {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time launch configs")
    parser.add_argument("--out", type=Path, default=DOCS, help="directory for the JSON")
    parser.add_argument("--plot", type=Path, help="only draw the PNG from this JSON")
    parser.add_argument(
        "--plot-config", help="a swept config to draw too, e.g. 'block_d=16,warps=1,stream=0'"
    )
    parser.add_argument("--quant", action="store_true",
                        help="compare state dtypes (ssu_quant_bench.json) instead")
    parser.add_argument("--state-dtypes", default=",".join(STATE_DTYPES),
                        help="with --quant: comma-separated, bfloat16 first for the speedups")
    args = parser.parse_args()
    if args.plot:
        print(plot(args.plot, args.plot_config))
        return
    if args.quant:
        main_quant(args)
        return
    fi = raw_flashinfer()
    rows = [measure(b, fi, args.sweep) for b in progress(BATCHES, "ssu decode")]
    print(table(rows))
    for row in rows:
        if "flashinfer_error" in row:
            print(f"flashinfer at batch {row['batch']}: {row['flashinfer_error']}")
    if args.sweep:
        for row in rows:
            for name in ("sweep", "copy_sweep"):
                best = sorted(row[name].items(), key=lambda kv: kv[1])[:4]
                print(name, row["batch"], "  ".join(f"{k}: {v:.1f}us" for k, v in best))
    check = agreement(fi)
    print("agreement (max abs diff):", check)
    shapes = dict(
        nheads=NHEADS,
        headdim=HEADDIM,
        dstate=DSTATE,
        ngroups=NGROUPS,
        state="bfloat16",
        inputs="bfloat16",
        A="float32 tied",
        tokens=1,
        dt_softplus=True,
        z=True,
        D=True,
        dt_bias=True,
        indices="int32",
    )
    from mamba_ir.impls.triton.selective_state_update import default_config

    payload = {
        "shapes": shapes,
        "flashinfer": fi is not None,
        "agreement": check,
        "default_config": config_key(default_config(HEADDIM, DSTATE, 2)),
        "rows": rows,
    }
    path = write_json("ssu_bench.json", payload, args.out)
    print(path)


if __name__ == "__main__":
    main()
