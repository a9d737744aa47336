"""How each state dtype's rounding drifts over long decodes: the state and the output after
1 to 4,096 ``selective_state_update`` steps against a float64 recurrence of the same
inputs, per state dtype, rounding to nearest and stochastically (``rand_seed``).

Realistic Mamba2 parameters: ``A = -exp(A_log)``, ``A_log ~ U(0, log 16)``; step sizes
log-uniform in ``[1e-3, 1e-1]`` (after softplus); D and the z gate present; inputs in
float32, so only the state's storage rounds. Errors are relative: ``|h - h64| / |h64|``
over all state values (Frobenius), and the output's largest absolute error over its
root mean square. Runs on the CPU (the native op) or a GPU (the Triton provider).

    python -m benchmarks.state_precision [--steps 4096] [--device cpu] [--out DIR]
    python -m benchmarks.state_precision --plot docs/state_precision.json
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import DOCS, plot_or_hint, progress, pyplot, save_figure, write_json
from mamba_ir.ops._quant import QUANTIZED, ROUNDED, quantize, values

DTYPES = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "int16": torch.int16, "int8": torch.int8, "float8_e4m3fn": torch.float8_e4m3fn,
}
BATCH, NHEADS, HEADDIM, DSTATE = 4, 4, 64, 128


def inputs(steps: int, device: str, seed: int = 0, batch: int = BATCH,
           nheads: int = NHEADS) -> dict[str, torch.Tensor]:
    """Every step's inputs, drawn once so that every dtype sees the same stream."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    log_dt = torch.empty(steps, batch, nheads).uniform_(math.log(1e-3), math.log(1e-1),
                                                       generator=g)
    a_log = torch.empty(nheads).uniform_(0, math.log(16), generator=g)
    made = dict(x=rand(steps, batch, nheads, HEADDIM), dt=log_dt.exp(),
                B=rand(steps, batch, 1, DSTATE), C=rand(steps, batch, 1, DSTATE),
                z=rand(steps, batch, nheads, HEADDIM), A=-a_log.exp(), D=rand(nheads))
    return {k: v.to(device) for k, v in made.items()}


def reference(data: dict[str, torch.Tensor], marks: list[int]) -> dict[int, tuple]:
    """The float64 recurrence: (state, output) after each step in ``marks``."""
    batch, nheads = data["x"].shape[1:3]
    h = torch.zeros(batch, nheads, HEADDIM, DSTATE, dtype=torch.float64, device=data["x"].device)
    A, D = data["A"].double(), data["D"].double()
    got = {}
    for t in range(max(marks)):
        x, dt = data["x"][t].double(), data["dt"][t].double()[..., None]
        B, C = data["B"][t].double(), data["C"][t].double()
        h = h * torch.exp(A[:, None] * dt)[..., None] + (dt * x)[..., None] * B[:, :, None, :]
        y = (h * C[:, :, None, :]).sum(-1) + D[:, None] * x
        y = y * F.silu(data["z"][t].double())
        if t + 1 in marks:
            got[t + 1] = (h.clone(), y)
    return got


def run(data: dict[str, torch.Tensor], dtype: torch.dtype, stochastic: bool,
        marks: list[int]) -> dict[int, tuple]:
    """The op with the state stored in ``dtype``: (state as float64, output) at ``marks``."""
    from mamba_ir import ops

    dev = data["x"].device
    batch, nheads = data["x"].shape[1:3]
    zero = torch.zeros(batch, nheads, HEADDIM, DSTATE, device=dev)
    state, scale = quantize(zero, dtype) if dtype in QUANTIZED else (zero.to(dtype), None)
    A = data["A"][:, None, None].expand(nheads, HEADDIM, DSTATE)
    D = data["D"][:, None].expand(nheads, HEADDIM)
    seed = torch.zeros((), dtype=torch.int64, device=dev)
    out = torch.empty(batch, nheads, HEADDIM, device=dev)
    got = {}
    for t in range(max(marks)):
        seed.fill_(t)
        ops.selective_state_update(
            state, data["x"][t], data["dt"][t][..., None].expand(batch, nheads, HEADDIM), A,
            data["B"][t], data["C"][t], D=D, z=data["z"][t], out=out, state_scale=scale,
            rand_seed=seed if stochastic else None)
        if t + 1 in marks:
            got[t + 1] = (values(state, scale).double(), out.double().clone())
    return got


def errors(ref: dict[int, tuple], got: dict[int, tuple]) -> dict[str, list[float]]:
    state, output = [], []
    for step in sorted(ref):
        (h64, y64), (h, y) = ref[step], got[step]
        state.append(float((h - h64).norm() / h64.norm()))
        output.append(float((y - y64).abs().max() / y64.pow(2).mean().sqrt()))
    return {"state_rel": state, "output_rel": output}


def measure(steps: int, device: str, batch: int = BATCH, nheads: int = NHEADS
            ) -> dict[str, Any]:
    marks = [2**k for k in range(int(math.log2(steps)) + 1)]
    data = inputs(steps, device, batch=batch, nheads=nheads)
    ref = reference(data, marks)
    cases = [(name, sr) for name, dt in DTYPES.items() for sr in (False, True)
             if not sr or dt in ROUNDED]
    series = {}
    for name, sr in progress(cases, "state dtypes"):
        label = f"{name}{' + stochastic' if sr else ''}"
        series[label] = errors(ref, run(data, DTYPES[name], sr, marks))
        print(f"{label:>26}: state {series[label]['state_rel'][-1]:.2e}, "
              f"output {series[label]['output_rel'][-1]:.2e} after {steps} steps", flush=True)
    return {"steps": marks, "series": series}


def hybrid_agreement(new_tokens: int, device: str, prompts: int = 4) -> dict[str, Any]:
    """The bundled demo hybrid (random init, float32 weights) decoding ``new_tokens``
    greedily from ``prompts`` prompts of 32 tokens with each state dtype and rounding,
    against float32 state: the share of generated tokens equal to float32's, the first
    step where any prompt's token differs, and the largest logit difference while every
    token so far agreed."""
    from mamba_ir.models import Engine, demo_config, random_model

    model = random_model(demo_config(), seed=0, device=device)
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    batch = [torch.randint(0, vocab, (32,), generator=g).tolist() for _ in range(prompts)]

    def generate(dtype: str, rounding: str) -> list:
        engine = Engine(model, max_requests=prompts, max_len=32 + new_tokens + 1,
                        state_dtype=dtype, state_rounding=rounding, prefix_cache=False)
        return engine.generate(batch, new_tokens)

    ref = generate("float32", "nearest")
    rows = {}
    cases = [(n, r) for n, dt in DTYPES.items() if n != "float32"
             for r in ("nearest", "stochastic") if r == "nearest" or dt in ROUNDED]
    for name, rounding in progress(cases, "hybrid greedy decode"):
        got = generate(name, rounding)
        same = [[a == b for a, b in zip(c.tokens, r.tokens, strict=True)]
                for c, r in zip(got, ref, strict=True)]
        first = min((row.index(False) for row in same if False in row), default=new_tokens)
        diff = max(float((c.logits[t] - r.logits[t]).abs().max())
                   for c, r in zip(got, ref, strict=True) for t in range(first))
        label = f"{name}{' + stochastic' if rounding == 'stochastic' else ''}"
        rows[label] = {"token_agreement": sum(map(sum, same)) / (new_tokens * prompts),
                       "first_divergence": first, "max_logit_diff_while_agreeing": diff}
        where = f"first differs at step {first}" if first < new_tokens else "none differs"
        print(f"{label:>26}: {rows[label]['token_agreement']:.1%} tokens as float32, {where}, "
              f"max |dlogit| {diff:.2e} while all agree", flush=True)
    return {"new_tokens": new_tokens, "prompts": prompts, "config": model.config.describe(),
            "rows": rows}


def plot(json_path: Path) -> Path:
    import json

    data = json.loads(json_path.read_text())
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    panels = (("state_rel", "state: |h - h64| / |h64|"),
              ("output_rel", "output: max |y - y64| / rms y64"))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for label, s in data["series"].items():
            name = label.split(" ")[0]  # one colour per dtype, dashed when stochastic
            ax.plot(data["steps"], s[key], marker=".", label=label,
                    color=f"C{list(DTYPES).index(name)}",
                    linestyle="--" if "stochastic" in label else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("decode steps")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize="x-small", loc="lower right")
    fig.suptitle(f"state precision against float64 ({data['environment'].get('device', '')})")
    return save_figure(fig, json_path.with_suffix(".png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4096, help="decode steps (a power of 2)")
    parser.add_argument("--device", default="cpu", help="cpu (native) or cuda (Triton)")
    parser.add_argument("--batch", type=int, default=BATCH, help="sequences")
    parser.add_argument("--heads", type=int, default=NHEADS, help="SSM heads (headdim 64, "
                        "dstate 128)")
    parser.add_argument("--out", type=Path, default=DOCS, help="directory for the JSON")
    parser.add_argument("--plot", type=Path, help="only draw the PNG from this JSON")
    parser.add_argument("--hybrid-tokens", type=int, default=1024,
                        help="greedy tokens of the demo hybrid per state dtype (0: skip)")
    args = parser.parse_args()
    if args.plot:
        print(plot(args.plot))
        return
    if args.steps < 1 or args.steps & (args.steps - 1):
        raise SystemExit(f"--steps: expected a power of 2, got {args.steps}")
    with torch.inference_mode():  # tensors made here skip torch 2.11's version bump
        payload = measure(args.steps, args.device, args.batch, args.heads)
        if args.hybrid_tokens:
            payload["hybrid"] = hybrid_agreement(args.hybrid_tokens, args.device)
    payload["shapes"] = dict(batch=args.batch, nheads=args.heads, headdim=HEADDIM, dstate=DSTATE,
                             ngroups=1, inputs="float32", dt="log-uniform [1e-3, 1e-1]",
                             A_log="U(0, log 16)", D=True, z=True)
    path = write_json("state_precision.json", payload, args.out)
    print(path)
    plot_or_hint(plot, path, f"--plot {path}")


if __name__ == "__main__":
    main()
