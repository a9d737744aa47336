"""Triton selective_state_update (not yet implemented)."""
