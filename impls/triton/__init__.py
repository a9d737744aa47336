"""Triton provider: one module per op, each registering itself on import."""

from . import (
    causal_conv1d_fn,
    causal_conv1d_update,
    copy_state_blocks,
    mamba_chunk_scan,
    replay_materialize,
    replay_state_update,
    selective_scan,
    selective_state_update,
)

__all__ = [
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "copy_state_blocks",
    "mamba_chunk_scan",
    "replay_materialize",
    "replay_state_update",
    "selective_scan",
    "selective_state_update",
]
