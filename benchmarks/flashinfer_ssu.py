"""What the FlashInfer provider adds to raw FlashInfer, Mamba2 decode, CUDA-graph replays.

Per batch, in place and with destination indices (redirect): raw
``flashinfer.mamba.selective_state_update`` (its one-token kernel), the provider as it
plans the call, the provider forced onto FlashInfer's multi-token kernel, the Triton
provider, and a device-to-device copy of the same state bytes (the roof).

    python -m benchmarks.flashinfer_ssu [--out DIR]     # on the GPU machine, with FlashInfer
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmarks.common import DOCS, copy_rate, time_us, write_json
from benchmarks.ssu import decode_call, raw_flashinfer, raw_flashinfer_args, state_bytes
from mamba_ir import get_op
from mamba_ir.impls.flashinfer import selective_state_update as provider

BATCHES = (1, 8, 64, 256)


def measure() -> dict[str, Any]:
    raw = raw_flashinfer()
    if raw is None:
        raise SystemExit("flashinfer is not importable")
    rows: dict[str, Any] = {}
    for batch in BATCHES:
        roof = copy_rate(state_bytes(batch))
        for redirect in (False, True):
            row = _times(raw, batch, redirect)
            row["copy_roof_us"] = 2 * state_bytes(batch) / roof * 1e6
            rows[f"batch {batch}, {'redirect' if redirect else 'in place'}"] = row
            print(batch, redirect, row, flush=True)
    return rows


def _times(raw: Any, batch: int, redirect: bool) -> dict[str, Any]:
    op = get_op("selective_state_update")
    call = op.bind(**decode_call(batch, redirect=redirect))
    raw_args = raw_flashinfer_args(call)
    row: dict[str, Any] = {"flashinfer_raw_one_token": time_us(lambda: raw(**raw_args))}
    row["provider"] = time_us(lambda: provider.selective_state_update(**call))
    row["provider_plan"] = str(provider.plan(call, provider.device_info(0), True))
    row["provider_multi_token"] = time_us(
        lambda: provider.selective_state_update(**call, one_token=False))
    row["triton"] = time_us(lambda: op.impls["triton"].fn(**call))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DOCS)
    args = parser.parse_args()
    print(write_json("flashinfer_bench.json", {"timings_us": measure()}, args.out))


if __name__ == "__main__":
    main()
