"""Every Triton provider launches its kernels on its tensors' CUDA device.

Triton launches on the *current* device: an eager call on ``cuda:1`` while ``cuda:0`` is
current would fail ("Pointer argument cannot be accessed from Triton"). The CPU test runs
each registered Triton provider on fake ``cuda:1`` tensors with the device switch and the
kernel launches recorded instead of performed; the GPU test runs them on a real second
device against native.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import mamba_ir
from mamba_ir import get_op

triton = pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TRITON_OPS = sorted(name for name, op in mamba_ir.REGISTRY.items() if "triton" in op.impls)


def _ssu(t: Callable[..., torch.Tensor]) -> dict[str, Any]:
    return dict(
        state=t(8, 4, 16, 16), x=t(2, 4, 16), dt=t(2, 4, 16), A=t(4, 16, 16), B=t(2, 1, 16),
        C=t(2, 1, 16), D=t(4, 16), z=t(2, 4, 16), dt_bias=t(4, 16), dt_softplus=True,
        dt_limit=(0.0, 1.0), state_batch_indices=t(2, dtype=torch.int32),
        dst_state_batch_indices=t(2, dtype=torch.int32), out=t(2, 4, 16),
    )


def _conv_update(t: Callable[..., torch.Tensor]) -> dict[str, Any]:
    return dict(x=t(2, 32), conv_state=t(8, 32, 3), weight=t(32, 4), bias=t(32),
                conv_state_indices=t(2, dtype=torch.int32))


def _conv_fn(t: Callable[..., torch.Tensor]) -> dict[str, Any]:
    return dict(x=t(32, 10), weight=t(32, 4), bias=t(32), conv_states=t(8, 32, 3),
                query_start_loc=t(3, dtype=torch.int32), cache_indices=t(2, dtype=torch.int32),
                has_initial_state=t(2, dtype=torch.bool))


def _copy(t: Callable[..., torch.Tensor]) -> dict[str, Any]:
    return dict(state=t(8, 4, 16), src=t(2, dtype=torch.int32), dst=t(2, dtype=torch.int32))


def _chunk_scan(t: Callable[..., torch.Tensor]) -> dict[str, Any]:
    return dict(
        state=t(8, 4, 16, 16), x=t(10, 4, 16), dt=t(10, 4), A=t(4), B=t(10, 1, 16),
        C=t(10, 1, 16), chunk_size=8, cu_seqlens=t(3, dtype=torch.int32), D=t(4),
        z=t(10, 4, 16), dt_bias=t(4), state_batch_indices=t(2, dtype=torch.int32),
        out=t(10, 4, 16),
    )


def _selective_scan(t: Callable[..., torch.Tensor]) -> dict[str, Any]:
    return dict(
        u=t(32, 10), ssm_states=t(8, 32, 16), delta=t(32, 10), A=t(32, 16), B=t(1, 16, 10),
        C=t(1, 16, 10), D=t(32), z=t(32, 10), delta_bias=t(32),
        query_start_loc=t(3, dtype=torch.int32), cache_indices=t(2, dtype=torch.int32),
        has_initial_state=t(2, dtype=torch.bool), out=t(32, 10),
    )


def _replay(t: Callable[..., torch.Tensor]) -> dict[str, Any]:
    return dict(
        state=t(8, 4, 16, 16), ring_x=t(8, 4, 4, 16), ring_dt=t(8, 4, 4, dtype=torch.float32),
        ring_B=t(8, 4, 1, 16), ring_len=t(8, dtype=torch.int32), x=t(2, 4, 16),
        dt=t(2, 4, 16), A=t(4, 16, 16), B=t(2, 1, 16), C=t(2, 1, 16), D=t(4, 16),
        z=t(2, 4, 16), dt_bias=t(4, 16), dt_softplus=True,
        state_batch_indices=t(2, dtype=torch.int32),
        dst_state_batch_indices=t(2, dtype=torch.int32), out=t(2, 4, 16),
    )


def _materialize(t: Callable[..., torch.Tensor]) -> dict[str, Any]:
    return dict(
        state=t(8, 4, 16, 16), ring_x=t(8, 4, 4, 16), ring_dt=t(8, 4, 4, dtype=torch.float32),
        ring_B=t(8, 4, 1, 16), ring_len=t(8, dtype=torch.int32), A=t(4, 16, 16),
        src=t(2, dtype=torch.int32), dst=t(2, dtype=torch.int32),
    )


# one call per op with its optional tensors given; only shapes matter (nothing is read)
CALLS = {
    "selective_state_update": _ssu,
    "causal_conv1d_update": _conv_update,
    "causal_conv1d_fn": _conv_fn,
    "copy_state_blocks": _copy,
    "mamba_chunk_scan": _chunk_scan,
    "selective_scan": _selective_scan,
    "replay_state_update": _replay,
    "replay_materialize": _materialize,
}


class Devices:
    """A stand-in for the CUDA runtime's current device, and the kernel launches seen."""

    def __init__(self, current: int) -> None:
        self.current = current
        self.switches: list[int] = []
        self.launches: list[tuple[str, int]] = []

    @contextlib.contextmanager
    def device(self, index: int) -> Iterator[None]:
        self.switches.append(index)
        before, self.current = self.current, index
        try:
            yield
        finally:
            self.current = before

    def record(self) -> Callable[..., None]:
        """A kernel class's ``run`` that notes the kernel and the current device."""

        def run(kernel: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
            self.launches.append((kernel.fn.__name__, self.current))

        return run


@pytest.fixture
def devices(monkeypatch: pytest.MonkeyPatch) -> Devices:
    seen = Devices(current=0)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: seen.current)
    monkeypatch.setattr(torch.cuda, "device", seen.device)
    for kernel_class in (InterpretedFunction, JITFunction):
        monkeypatch.setattr(kernel_class, "run", seen.record())
    return seen


def _fake_call(name: str, device: str) -> dict[str, Any]:
    """The op's call with fake tensors on ``device`` (a device this machine need not have);
    enter a FakeTensorMode before building it."""

    def tensor(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device)

    return get_op(name).bind(**CALLS[name](tensor))


def test_every_triton_op_has_a_call_here() -> None:
    assert TRITON_OPS == sorted(CALLS), "a Triton provider without a case in CALLS"


@pytest.mark.parametrize("name", TRITON_OPS)
@pytest.mark.parametrize("current", [0, 1])
def test_launches_run_on_the_tensors_device(devices: Devices, name: str, current: int) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    devices.current = current
    with FakeTensorMode():
        get_op(name).impls["triton"].fn(**_fake_call(name, "cuda:1"))
    assert devices.launches, f"{name}: no kernel launched"
    assert all(dev == 1 for _, dev in devices.launches), (
        f"{name}: launches outside cuda:1 ({devices.launches})")
    # the switch is entered only when needed, and left afterwards
    assert devices.switches == ([] if current == 1 else [1])
    assert devices.current == current


def test_cpu_calls_never_ask_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU tensors (the interpreter) the guard stays out of torch.cuda entirely."""

    def no_cuda(*_: Any) -> None:
        raise AssertionError("torch.cuda was asked for a CPU call")

    monkeypatch.setattr(torch.cuda, "current_device", no_cuda)
    monkeypatch.setattr(torch.cuda, "device", no_cuda)
    state = torch.arange(24.0).reshape(4, 6)
    get_op("copy_state_blocks").impls["triton"].fn(
        state, torch.tensor([0]), torch.tensor([3]), -1)
    assert torch.equal(state[3], state[0])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("name", TRITON_OPS)
def test_second_device_matches_native(name: str) -> None:
    from mamba_ir.testing import check_impl

    with torch.cuda.device(0):
        check_impl(name, "triton", device="cuda:1", max_examples=30)
        assert torch.cuda.current_device() == 0
