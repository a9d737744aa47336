"""selective_scan: bad input raises a ValueError naming the argument, before anything is
written; vLLM's call (2-D B and C, outputs returned) runs unchanged."""

import pytest
import torch

from mamba_ir import ops


def scan_args():
    return {
        "u": torch.randn(6, 7),
        "ssm_states": torch.randn(8, 6, 4),
        "delta": torch.rand(6, 7),
        "A": -torch.rand(6, 4),
        "B": torch.randn(2, 4, 7),
        "C": torch.randn(2, 4, 7),
        "D": torch.randn(6),
        "query_start_loc": torch.tensor([0, 3, 3, 7]),
        "cache_indices": torch.tensor([1, 2, 3]),
        "has_initial_state": torch.tensor([True, False, True]),
        "src_cache_indices": torch.tensor([0, 0, 3]),
        "block_size": 2,
        "checkpoint_state_indices": torch.tensor([[4, -1], [-1, -1], [5, 6]]),
    }


CASES = [
    # (changes, argument named, words expected)
    ({"u": torch.randn(6, 7, 1)}, "u", "2 dimensions"),
    ({"ssm_states": torch.randn(8, 5, 4)}, "ssm_states", "shape (slots, 6, dstate)"),
    ({"delta": torch.rand(6, 6)}, "delta", "shape (6, 7)"),
    ({"A": -torch.rand(6)}, "A", "shape (6, 4)"),
    ({"B": torch.randn(4, 4, 7)}, "B", "ngroups dividing 6"),
    ({"B": torch.randn(4, 6)}, "B", "shape (4, 7)"),
    ({"C": torch.randn(1, 4, 7)}, "C", "shape (2, 4, 7)"),
    ({"D": torch.randn(6, 1)}, "D", "shape (6,)"),
    ({"z": torch.randn(7, 6)}, "z", "shape (6, 7)"),
    ({"delta_bias": torch.randn(3)}, "delta_bias", "shape (6,)"),
    ({"out": torch.empty(6, 1).expand(6, 7)}, "out", "no stride-0"),
    ({"query_start_loc": None}, "query_start_loc", "varlen"),
    ({"query_start_loc": torch.tensor([0, 3, 2, 7])}, "query_start_loc", "non-decreasing"),
    ({"query_start_loc": torch.tensor([0, 3, 3, 6])}, "query_start_loc", "to 7"),
    ({"cache_indices": torch.tensor([1, 2])}, "cache_indices", "at least 3 rows"),
    ({"cache_indices": torch.tensor([1, 2, 8])}, "cache_indices", "rows in [0, 8)"),
    ({"cache_indices": torch.tensor([3, 2, 3]), "block_size": 0, "checkpoint_state_indices": None},
     "cache_indices", "distinct"),
    ({"src_cache_indices": torch.tensor([0, 0, 1])}, "src_cache_indices", "another entry"),
    ({"src_cache_indices": torch.tensor([0, 0, 4])}, "src_cache_indices", "another entry"),
    ({"has_initial_state": torch.tensor([1, 0, 1])}, "has_initial_state", "dtype"),
    ({"block_size": -1}, "block_size", "an int >= 0"),
    ({"block_size": 0}, "block_size", "with checkpoint_state_indices"),
    ({"checkpoint_state_indices": None}, "checkpoint_state_indices", "with block_size"),
    ({"checkpoint_state_indices": torch.tensor([[4], [-1], [5]])}, "checkpoint_state_indices",
     "at least 2 columns"),
    ({"checkpoint_state_indices": torch.tensor([[4, -1], [-1, -1], [5, 1]])},
     "cache_indices / checkpoint_state_indices", "distinct"),
    ({"num_computed_tokens": torch.tensor([0, -1, 0])}, "num_computed_tokens", ">= 0"),
]


@pytest.mark.parametrize(("changes", "argument", "words"), CASES,
                         ids=[f"{c[1]}-{c[2]}" for c in CASES])
def test_bad_input_is_named_and_nothing_is_written(changes, argument, words):
    args = {**scan_args(), **changes}
    before = args["ssm_states"].clone()
    with pytest.raises(ValueError) as info:
        ops.selective_scan(**args)
    message = str(info.value)
    assert message.startswith(f"{argument}: expected"), message
    assert words in message, message
    assert torch.equal(args["ssm_states"], before)


def test_vllm_mamba1_call_runs_as_written():
    # vLLM's mixer: B and C as (dstate, tokens) transposes, positional order kept; the
    # output comes back as the return value (z and delta are left as they are)
    args = scan_args()
    z = torch.randn(6, 7)
    B, C = torch.randn(7, 4).t(), torch.randn(7, 4).t()
    z_before, delta_before = z.clone(), args["delta"].clone()
    out = ops.selective_scan(
        args["u"], args["ssm_states"], args["delta"], args["A"], B, C, args["D"], z, None, True,
        cache_indices=args["cache_indices"], has_initial_state=args["has_initial_state"],
        query_start_loc=args["query_start_loc"],
    )
    assert out.shape == (6, 7) and out.is_contiguous() and not out.isnan().any()
    assert torch.equal(z, z_before) and torch.equal(args["delta"], delta_before)
    one_group = ops.selective_scan(
        args["u"], args["ssm_states"].clone(), args["delta"], args["A"], B[None], C[None],
        args["D"], z, None, True, query_start_loc=args["query_start_loc"],
        cache_indices=args["cache_indices"], has_initial_state=torch.zeros(3, dtype=torch.bool),
    )
    assert one_group.shape == out.shape
