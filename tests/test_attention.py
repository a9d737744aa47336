"""``kv_attention``: the per-request KV cache attention of the hybrid model.

The reference kernel (a float32 SDPA per sequence) is checked against an explicit float64
softmax over each sequence's whole context; the memory test shows that a prefill reads
and allocates by context, not by ``max_len``; on a GPU the FlashAttention path matches the
reference.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mamba_ir.models import demo_config
from mamba_ir.models.attention import Attention, flash_refusal, kv_attention, reference

HEADS, KV_HEADS, DIM = 4, 2, 16


def _oracle(q, k, v, k_cache, v_cache, bounds, rows, lens, scale):
    """float64: each new token against the row's earlier context and the new keys."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    group = q.shape[1] // k.shape[1]
    for b, (row, length) in enumerate(zip(rows, lens, strict=True)):
        start, end = bounds[b], bounds[b + 1]
        first = length - (end - start)
        keys = torch.cat([k_cache[row, :first].double(), k[start:end].double()])
        values = torch.cat([v_cache[row, :first].double(), v[start:end].double()])
        for i in range(end - start):
            for h in range(q.shape[1]):
                seen = slice(0, first + i + 1)
                s = keys[seen, h // group] @ q[start + i, h].double() * scale
                out[start + i, h] = torch.softmax(s, 0) @ values[seen, h // group]
    return out


def _case(dtype=torch.float32, device="cpu", max_len=24, rows=4):
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    k_cache, v_cache = rnd(rows, max_len, KV_HEADS, DIM), rnd(rows, max_len, KV_HEADS, DIM)
    # a fresh prompt, one continuing after 9 cached tokens, one token after 20, in rows 2, 0, 3
    news, lens, kv_rows = [5, 3, 1], [5, 12, 21], [2, 0, 3]
    bounds = [0, 5, 8, 9]
    n = bounds[-1]
    return (rnd(n, HEADS, DIM), rnd(n, KV_HEADS, DIM), rnd(n, KV_HEADS, DIM), k_cache, v_cache,
            bounds, kv_rows, lens, news)


def _index(values, device="cpu"):
    return torch.tensor(values, dtype=torch.int32, device=device)


def test_reference_matches_float64_oracle_and_writes_only_new_positions():
    q, k, v, k_cache, v_cache, bounds, rows, lens, news = _case()
    before = k_cache.clone(), v_cache.clone()
    want = _oracle(q, k, v, k_cache, v_cache, bounds, rows, lens, DIM**-0.5)
    out = kv_attention(q, k, v, k_cache, v_cache, _index(bounds), _index(rows), _index(lens),
                       DIM**-0.5)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    for cache, old, new in ((k_cache, before[0], k), (v_cache, before[1], v)):
        expect = old.clone()
        for b, (row, length, n) in enumerate(zip(rows, lens, news, strict=True)):
            expect[row, length - n:length] = new[bounds[b]:bounds[b + 1]]
        torch.testing.assert_close(cache, expect, atol=0, rtol=0)  # row 1 untouched too


def test_decode_form_equals_one_token_sequences():
    q, k, v, k_cache, v_cache, _, rows, lens, _ = _case()
    q, k, v = q[:3], k[:3], v[:3]
    ones = kv_attention(q, k, v, k_cache.clone(), v_cache.clone(), _index([0, 1, 2, 3]),
                        _index(rows), _index(lens), 0.3)
    decode = kv_attention(q, k, v, k_cache, v_cache, None, _index(rows), _index(lens), 0.3)
    torch.testing.assert_close(decode, ones, atol=0, rtol=0)


@pytest.mark.parametrize(("lens", "match"), [([4, 12, 21], "context_lens\\[0\\]"),
                                             ([5, 12, 25], "context_lens\\[2\\]")])
def test_bad_context_raises_before_writing(lens, match):
    q, k, v, k_cache, v_cache, bounds, rows, _, _ = _case()
    before = k_cache.clone()
    with pytest.raises(ValueError, match=match):
        kv_attention(q, k, v, k_cache, v_cache, _index(bounds), _index(rows), _index(lens), 1.0)
    assert torch.equal(k_cache, before)


def test_flash_path_refuses_with_reasons():
    half = torch.zeros(3, HEADS, DIM, dtype=torch.bfloat16)
    cache = torch.zeros(2, 8, KV_HEADS, DIM, dtype=torch.bfloat16)
    assert "fp16/bf16" in flash_refusal(half.float(), cache.float())
    assert "head_dim 12" in flash_refusal(half[..., :12], cache[..., :12])
    assert "not contiguous" in flash_refusal(half, cache.transpose(0, 1))
    assert "CUDA device" in flash_refusal(half, cache)  # on the CPU


class _PeakBytes(TorchDispatchMode):
    """Peak bytes of the tensors created while active (views of inputs excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.mamba_ir_models.kv_attention.default:
            with self:  # count what the kernel allocates inside
                return reference(*args, **kwargs)
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage().data_ptr()
            if key in self.seen or key in inputs:
                continue
            nbytes = t.untyped_storage().nbytes()
            self.seen.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, key, nbytes)
        return out


def _prefill_peak(max_len: int, tokens: int = 1024) -> int:
    cfg = demo_config()
    layer = Attention(cfg)
    shape = (2, max_len, cfg.num_key_value_heads, cfg.attention_head_dim)
    k_cache, v_cache = torch.zeros(shape), torch.zeros(shape)
    hidden = torch.randn(tokens, cfg.hidden_size)
    with torch.no_grad(), _PeakBytes() as mode:
        layer(hidden, torch.arange(tokens), k_cache, v_cache, _index([0, tokens]),
              _index([0]), _index([tokens]))
    return mode.peak


def test_prefill_memory_grows_with_context_not_max_len():
    tokens = 1024
    small, large = _prefill_peak(2048, tokens), _prefill_peak(16384, tokens)
    assert small == large
    cfg = demo_config()
    # one key per (token, max_len position) -- what gathering each token's row costs
    per_max_len = tokens * 16384 * cfg.num_key_value_heads * cfg.attention_head_dim * 4
    assert large < per_max_len / 100


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_path_matches_reference(dtype):
    args = _case(dtype, "cuda", max_len=4096, rows=5)
    q, k, v, k_cache, v_cache, bounds, rows, lens, _ = args
    for cu in (_index(bounds, "cuda"), None):
        n = q.shape[0] if cu is not None else 3
        call = (q[:n], k[:n], v[:n])
        ref_cache = k_cache.clone(), v_cache.clone()
        want = reference(*call, *ref_cache, None if cu is None else cu.cpu(),
                         _index(rows), _index(lens), DIM**-0.5)
        got_cache = k_cache.clone(), v_cache.clone()
        got = kv_attention(*call, *got_cache, cu, _index(rows, "cuda"), _index(lens, "cuda"),
                           DIM**-0.5)
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
        for a, b in zip(got_cache, ref_cache, strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
