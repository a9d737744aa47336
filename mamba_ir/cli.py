"""``python -m mamba_ir {demo,ops,bench}``: the IR at work on a real hybrid model."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import random
import signal
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from .models.cache import DECODES, RING, STATE_DTYPES
from .ops._quant import QUANTIZED
from .priority import ENV_VAR, checked_priority
from .progress import bar

logger = logging.getLogger("mamba_ir")


# -- helpers ---------------------------------------------------------------------------------


def _device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_arg(text: str) -> torch.device:
    """``--device``: a torch device name (``cpu``, ``cuda``, ``cuda:1``)."""
    try:
        return torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a torch device (expected e.g. cpu, cuda, cuda:1)") from None


def device_missing(device: torch.device) -> str | None:
    """Why ``device`` cannot be used on this machine, or ``None``."""
    if device.type == "cpu" or device.type == "meta":
        return None
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        if device.type == "cuda" and torch.version.cuda is None and torch.version.hip is None:
            return f"this torch ({torch.__version__}) is built without CUDA"
        return f"no {device.type} device is available on this machine"
    count = getattr(backend, "device_count", lambda: 1)()
    if device.index is not None and device.index >= count:
        return f"this machine has {count} {device.type} device(s)"
    return None


def count_arg(minimum: int) -> Any:
    """An argparse type for integers >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def _dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name:
        return getattr(torch, name)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=level)


# -- ops -------------------------------------------------------------------------------------


def example_calls(device: torch.device, dtype: torch.dtype) -> dict[str, dict[str, Any]]:
    """Each op's example call (``register_example``), bound: a small decode/prefill batch
    laid out as the hybrid model calls it. Ops without an example are left out."""
    from mamba_ir import REGISTRY

    return {
        name: op.bind(**op.example(device, dtype))
        for name, op in REGISTRY.items()
        if op.example is not None
    }


def cmd_ops(args: argparse.Namespace) -> int:
    """For each op on a small batch: the provider chosen and why the others were skipped."""
    from mamba_ir import get_op, set_priority

    device = _device(args.device)
    dtype = _dtype(args.dtype, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {device} ({name}), dtype {str(dtype).removeprefix('torch.')}, "
          f"torch {torch.__version__}")
    with set_priority(args.priority) if args.priority else _null():
        for name, call in example_calls(device, dtype).items():
            op = get_op(name)
            decision = op.decide(call)
            order = op.priority(device.type)
            print(f"\n{name}")
            print(f"  priority : {', '.join(order)}")
            print(f"  chosen   : {decision.provider}")
            for provider, why in decision.skipped:
                print(f"  skipped  : {provider}: {why}")
            for provider, impl in op.impls.items():
                if provider not in order:
                    print(f"  not tried: {provider}: registered for {', '.join(impl.platforms)}"
                          f" only (force it with --priority {provider})")
    return 0


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# -- demo ------------------------------------------------------------------------------------


def _conversations(
    n: int, system_tokens: int, vocab: int, seed: int
) -> tuple[list[int], list[list[list[int]]]]:
    """A shared system prompt and, per conversation, one user message per turn."""
    rng = random.Random(seed)
    system = [rng.randrange(1, vocab) for _ in range(system_tokens)]
    users = [[[rng.randrange(1, vocab) for _ in range(rng.randrange(6, 15))] for _ in range(8)]
             for _ in range(n)]
    return system, users


def _agreement(fast: Sequence[Any], ref: Sequence[Any]) -> tuple[float, int, int]:
    """Max |logit difference| while both saw the same tokens, and matching tokens/total."""
    worst, same, total = 0.0, 0, 0
    for a, b in zip(fast, ref, strict=True):
        for i, (ta, tb) in enumerate(zip(a.tokens, b.tokens, strict=True)):
            worst = max(worst, (a.logits[i] - b.logits[i]).abs().max().item())
            total += 1
            same += ta == tb
            if ta != tb:  # later positions condition on different tokens
                total += len(a.tokens) - i - 1
                break
    return worst, same, total


def decode_problem(args: argparse.Namespace) -> str | None:
    """Why ``--decode`` / ``--ring`` cannot serve with the other state options, or None."""
    if args.decode != "replay":
        return None if args.ring is None else (
            f"--ring {args.ring}: sets the ring of --decode replay (decode is {args.decode})")
    if args.state_dtype is not None and STATE_DTYPES[args.state_dtype] in QUANTIZED:
        return (f"--decode replay: keeps a float32, float16 or bfloat16 checkpoint; "
                f"--state-dtype {args.state_dtype} is quantized")
    if args.state_rounding != "nearest":
        return (f"--decode replay: rounds its checkpoint to nearest once per flush; "
                f"--state-rounding {args.state_rounding} is not supported with it")
    return None


def cmd_demo(args: argparse.Namespace) -> int:
    from mamba_ir import set_priority
    from mamba_ir.models import Engine, demo_config, from_pretrained, random_model

    _setup_logging(args.verbose)
    torch.manual_seed(args.seed)
    device = _device(args.device)
    dtype = _dtype(args.dtype, device)
    t_start = time.perf_counter()
    if args.model:
        try:
            model = from_pretrained(args.model, device=device, dtype=dtype)
        except (OSError, ValueError, KeyError) as exc:  # a folder this loader cannot read
            raise SystemExit(f"mamba-ir demo: --model {args.model}: {exc}") from None
        source = args.model
    else:
        model = random_model(demo_config(), seed=args.seed, device=device, dtype=dtype)
        source = "random init"
    cfg = model.config
    print(f"mamba-ir demo on {device} ({str(dtype).removeprefix('torch.')}), torch "
          f"{torch.__version__}")
    print(f"model: {cfg.describe()}; {model.num_parameters() / 1e6:.2f}M parameters ({source})")
    if args.state_dtype:
        rounded = ", rounded stochastically" if args.state_rounding == "stochastic" else ""
        print(f"SSM state: {args.state_dtype}{rounded}")
    if args.decode == "replay":
        print(f"decode: replay, ring {args.ring or RING} (the reference decodes standard)")

    system, users = _conversations(args.conversations, args.system_tokens, cfg.vocab_size,
                                   args.seed)
    max_len = args.system_tokens + args.turns * (14 + args.new_tokens) + 8
    kwargs = dict(block_size=args.block_size, max_requests=args.conversations, max_len=max_len,
                  state_dtype=args.state_dtype, state_rounding=args.state_rounding)

    # compile: one graph per step kind serves every batch and chunk size
    try:
        engine = Engine(model, compile=not args.no_compile, priority=args.priority,
                        decode=args.decode, ring=args.ring or RING, **kwargs)
    except ValueError as exc:  # a state option the model's states cannot take
        _error("demo", str(exc))
    if not args.no_compile:
        t0 = time.perf_counter()
        print("compiling the prefill and decode steps (lowering + align fusion) ...")
        with bar(2, "compiling", unit="step", leave=False) as steps:
            engine.generate([system[:3], system[:5]], 2, on_step=lambda _: steps.update(1))
        engine.reset()
        print(f"compiled in {time.perf_counter() - t0:.1f} s")

    # serve: every turn's prompt is the whole conversation so far
    history = [list(system) for _ in range(args.conversations)]
    prompts_per_turn, served = [], []
    generated = args.conversations * args.turns * args.new_tokens
    t0 = time.perf_counter()
    with bar(generated, "serving", unit="tok") as progress:
        for turn in range(args.turns):
            prompts = [h + u[turn] for h, u in zip(history, users, strict=True)]
            done = engine.generate(prompts, args.new_tokens, on_step=progress.update)
            prompts_per_turn.append(prompts)
            served.append(done)
            history = [p + d.tokens for p, d in zip(prompts, done, strict=True)]
    serve_s = time.perf_counter() - t0

    # reference: the same prompts through the uncompiled model, every op native, standard
    # decode (a replay engine is checked against the standard op)
    reference = Engine(model, compile=False, **kwargs)
    t0 = time.perf_counter()
    with set_priority([]), bar(generated, "eager native", unit="tok") as progress:
        ref = [reference.generate(p, args.new_tokens, on_step=progress.update)
               for p in prompts_per_turn]
    eager_s = time.perf_counter() - t0

    report = engine.lowering_report()
    print("\nlowering report (compiled call sites: provider, skipped providers, fusion):")
    summary = report.summary() or "(not compiled: every op dispatched eagerly)"
    print(textwrap.indent(summary, "  "))
    if args.verbose:
        for site in report:
            print(f"    {site}")

    st = engine.prefix.stats
    prompt_tokens = sum(len(p) for turn in prompts_per_turn for p in turn)
    print(f"\nprefix cache (block {args.block_size}, align mode): {st.hits}/{st.lookups} "
          f"requests hit, {st.hit_tokens}/{prompt_tokens} prompt tokens served from "
          f"checkpoints, {st.saved} checkpoints saved, {st.evicted} evicted")
    print(f"prefill tokens computed: {engine.stats.prefill_tokens} (of {prompt_tokens}), "
          f"{engine.stats.decode_steps} decode steps")

    flat = [c for turn in served for c in turn]
    flat_ref = [c for turn in ref for c in turn]
    worst, same, total = _agreement(flat, flat_ref)
    print(f"agreement with the eager native model: max |dlogit| {worst:.2e}, "
          f"tokens {same}/{total} identical")
    generated = sum(len(c.tokens) for c in flat)
    label = "eager dispatch" if args.no_compile else "compiled"
    print(f"throughput: {label} {generated / serve_s:.1f} tok/s, eager native "
          f"{generated / eager_s:.1f} tok/s ({generated} tokens, {args.conversations} "
          f"conversations x {args.turns} turns)")
    print(f"total {time.perf_counter() - t_start:.1f} s")
    # greedy tokens of a random model may flip on rounding in half precision or a quantized
    # state (a provider may round a stored value one step away from native's); logits may not
    exact = dtype == torch.float32 and args.state_dtype in (None, "float32")
    tolerance = 1e-3 if exact else 0.25
    if worst > tolerance:
        print(f"FAILED: max |dlogit| {worst:.2e} exceeds {tolerance} for {dtype}")
        return 1
    return 0


# -- bench -----------------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace) -> int:
    # the benchmarks live in a clone's benchmarks/ folder, not in the package (main checks)
    from benchmarks import e2e, prefill

    _setup_logging(args.verbose)
    return (prefill if args.prefill else e2e).run(args)  # main has set and checked args.out


# -- entry -----------------------------------------------------------------------------------


class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: ...)`` to options that have a meaningful default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" not in text and action.default not in (None, False, argparse.SUPPRESS):
            if action.option_strings and action.nargs != 0:
                text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="mamba-ir",
        description="mamba-ir: a torch.compile custom-op IR for the SSM layers of hybrid models",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,ops,bench}")
    positive = count_arg(1)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", type=device_arg,
                       help="torch device (default: cuda when available, else cpu)")
        p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                       help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
        p.add_argument("--priority", metavar="SPEC",
                       help="provider order, e.g. 'triton' or "
                            "'selective_state_update=flashinfer,triton' (native is always last)")
        p.add_argument("-v", "--verbose", action="count", default=0,
                       help="log lowering decisions (-v) and eager dispatch (-vv)")

    def state_dtype(p: argparse.ArgumentParser) -> None:
        p.add_argument("--state-dtype", choices=list(STATE_DTYPES),
                       help="dtype of the Mamba states (default: --dtype); int16, int8 and "
                            "float8_e4m3fn quantize the SSM state, one float32 scale per "
                            "block of d_state values, the conv state staying in --dtype")
        p.add_argument("--state-rounding", choices=["nearest", "stochastic"], default="nearest",
                       help="how decode rounds the stored SSM state: stochastic (float16, "
                            "bfloat16 and quantized states) is unbiased over long decodes")
        p.add_argument("--decode", choices=list(DECODES), default="standard",
                       help="decode op: replay keeps a checkpoint and a ring of the last "
                            "--ring tokens' inputs per sequence (replay_state_update), "
                            "flushed into a new checkpoint when full (float states only)")
        p.add_argument("--ring", type=positive, metavar="N",
                       help=f"ring entries per sequence with --decode replay (default: {RING})")

    def command(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, formatter_class=_HelpFormatter, **kwargs)
        p.set_defaults(parser=p)
        common(p)
        return p

    demo = command(
        "demo", help="compile a small hybrid model and serve a chat-like workload",
        description="Build a small random-init Bamba-style hybrid (or load --model), compile "
                    "it with the lowering and align-fusion passes, serve multi-turn "
                    "conversations sharing a system prompt, and compare with the eager "
                    "native model.",
    )
    demo.add_argument("--model", metavar="PATH",
                      help="local Bamba, Granite-4-H or Mamba2 checkpoint folder (config.json "
                           "+ safetensors; needs the hf extra: pip install 'mamba-ir[hf]')")
    demo.add_argument("--conversations", type=positive, metavar="N", default=4,
                      help="concurrent conversations")
    demo.add_argument("--turns", type=positive, metavar="N", default=3,
                      help="turns per conversation")
    demo.add_argument("--new-tokens", type=positive, metavar="N", default=16,
                      help="tokens generated per turn")
    demo.add_argument("--system-tokens", type=positive, metavar="N", default=40,
                      help="shared system prompt length")
    demo.add_argument("--block-size", type=positive, metavar="N", default=16,
                      help="state checkpoint interval, in tokens")
    demo.add_argument("--seed", type=int, default=0, help="random seed (model and prompts)")
    demo.add_argument("--no-compile", action="store_true",
                      help="serve with eager dispatch instead of compiling (a quick check)")
    state_dtype(demo)
    demo.set_defaults(func=cmd_demo)

    ops = command(
        "ops", help="which provider serves each op on this device, and why others don't",
        description="For each IR op on a small batch on the current device: the priority "
                    "order, the provider chosen, and every skipped provider with its reason.",
    )
    ops.set_defaults(func=cmd_ops)

    bench = command(
        "bench", help="end-to-end decode benchmark on a GPU (JSON + plot in docs/)",
        description="Decode tokens/s of a ~1B-parameter random-init hybrid at several batch "
                    "sizes: compiled with CUDA graphs vs eager native, against the "
                    "bytes-moved roofline (weights + states per step / measured copy rate). "
                    "Runs from a clone of the repository (it uses benchmarks/).",
    )
    bench.add_argument("--batches", type=positive, metavar="N", nargs="+", default=[1, 16, 64],
                       help="decode batch sizes")
    bench.add_argument("--context", type=positive, metavar="N", default=512,
                       help="tokens already in each sequence (attention KV length)")
    bench.add_argument("--layers", type=positive, metavar="N",
                       help="override the number of layers (smoke tests)")
    bench.add_argument("--out", help="JSON output path (default docs/e2e_bench.json, with "
                                     "--prefill docs/prefill_bench.json)")
    bench.add_argument("--prefill", action="store_true",
                       help="serving benchmark instead: time to first token by prompt length "
                            "(--lengths) with GPU time by kernel category, and decode "
                            "tokens/s by context (--contexts) and batch (--batches)")
    bench.add_argument("--lengths", type=positive, metavar="N", nargs="+",
                       default=[512, 2048, 8192, 32768], help="--prefill: prompt lengths")
    bench.add_argument("--contexts", type=positive, metavar="N", nargs="+", default=[512, 8192],
                       help="--prefill: decode context lengths")
    bench.add_argument("--block-size", type=positive, metavar="N", default=256,
                       help="--prefill: state checkpoint interval (a multiple of the scan chunk)")
    bench.add_argument("--prefill-tokens", type=positive, metavar="N", default=8192,
                       help="--prefill: tokens per prefill step")
    bench.add_argument("--reps", type=positive, metavar="N", default=5,
                       help="--prefill: timed runs per prompt length (median)")
    bench.add_argument("--profile", action="store_true",
                       help="also record GPU kernel time per step by category (profiler)")
    bench.add_argument("--plot-only", action="store_true",
                       help="only redraw the plot from an existing --out JSON")
    state_dtype(bench)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit status. Mistakes are answered with one line on stderr."""
    try:
        status = _main(argv)
        sys.stdout.flush()  # a reader that left shows here, not at the interpreter's exit
        return status
    except BrokenPipeError:
        # the reader went away (`mamba-ir ops | head -1`): stop quietly, as a Unix tool killed
        # by SIGPIPE does, and keep the interpreter's final flush from failing again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + getattr(signal, "SIGPIPE", 13)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    env = os.environ.get(ENV_VAR)
    if env:
        try:
            checked_priority(env, ENV_VAR)
        except ValueError as exc:
            _error(args.command, str(exc))
    if args.priority is not None:
        try:
            checked_priority(args.priority, "--priority")
        except ValueError as exc:
            args.parser.error(str(exc))
    if args.device is not None and (why := device_missing(args.device)):
        args.parser.error(f"--device {args.device}: {why} (--device cpu runs everywhere)")
    if args.command == "bench" and not _find_benchmarks():
        args.parser.error("bench needs the benchmarks/ folder of a clone of the mamba-ir "
                          "repository (it is not installed with the package): run it from "
                          "the root of a clone")
    if args.command == "bench":
        args.out = args.out or ("docs/prefill_bench.json" if args.prefill else
                                "docs/e2e_bench.json")
        if (why := out_problem(Path(args.out), must_exist=args.plot_only)) is not None:
            _error("bench", f"--out {args.out}: {why}")
    if args.command == "bench" and not args.plot_only and args.device is None:
        if (why := device_missing(torch.device("cuda"))) is not None:
            args.parser.error(f"bench times CUDA kernels and needs a GPU: {why}")
    if args.command in ("demo", "bench") and args.state_rounding == "stochastic" and (
            (args.state_dtype or args.dtype) == "float32"):
        _error(args.command, "--state-rounding stochastic: rounds float16, bfloat16 and "
               "quantized states (--state-dtype), not a float32 one")
    if args.command in ("demo", "bench") and (why := decode_problem(args)) is not None:
        _error(args.command, why)
    if args.command == "demo" and args.model:
        _require("safetensors", "--model", "hf")
    return int(args.func(args) or 0)


def _error(command: str, message: str) -> NoReturn:
    """A mistake in what the command was given, answered as argparse answers one (exit
    status 2) but in one line: no usage text for a problem that is not about usage."""
    print(f"mamba-ir {command}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _find_benchmarks() -> bool:
    """Whether ``benchmarks`` (a clone's folder) can be imported. ``python -m mamba_ir``
    puts the working folder on ``sys.path``, the ``mamba-ir`` script does not: from the
    root of a clone, the script adds it too."""
    if importlib.util.find_spec("benchmarks") is not None:
        return True
    root = Path.cwd()
    if not all((root / "benchmarks" / f).is_file() for f in ("__init__.py", "e2e.py",
                                                            "prefill.py")):
        return False
    sys.path.insert(0, str(root))
    return importlib.util.find_spec("benchmarks") is not None


def out_problem(path: Path, *, must_exist: bool) -> str | None:
    """Why ``path`` cannot take a benchmark's JSON (or, ``must_exist``, be read and have its
    plot written beside it), or ``None``. Tried before a run, not after it."""
    if must_exist and not path.is_file():
        return "no such file (--plot-only redraws the plot of an existing JSON)"
    if path.is_dir():
        return "is a folder (expected a JSON file path)"
    folder = path.parent
    if not folder.is_dir():
        return f"{folder} is not a folder" if folder.exists() else f"folder {folder} does not exist"
    if must_exist and not os.access(path, os.R_OK):
        return "cannot be read"
    try:  # the one reliable test of writing there (permissions, read-only file systems)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return f"cannot write in {folder} ({exc.strerror or exc})"
    if path.exists() and not os.access(path, os.W_OK):
        return "cannot be written"
    return None


def _require(module: str, what: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise SystemExit(f"mamba-ir: {what} needs {module}: pip install 'mamba-ir[{extra}]'")


if __name__ == "__main__":
    sys.exit(main())
