"""Triton causal_conv1d_update (not yet implemented)."""
