"""FlashInfer provider, registering itself on import."""

from . import selective_state_update

__all__ = ["selective_state_update"]
