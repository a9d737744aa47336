"""The IR ops. Each is a ``torch.library`` custom op in the ``mamba_ir`` namespace."""

from .causal_conv1d_fn import causal_conv1d_fn
from .causal_conv1d_update import causal_conv1d_update
from .copy_state_blocks import copy_state_blocks
from .mamba_chunk_scan import mamba_chunk_scan
from .replay_materialize import replay_materialize
from .replay_state_update import replay_state_update
from .selective_scan import selective_scan
from .selective_state_update import selective_state_update

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
