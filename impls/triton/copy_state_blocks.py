"""Triton copy_state_blocks (not yet implemented)."""
