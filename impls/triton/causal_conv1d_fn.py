"""Triton causal_conv1d_fn (not yet implemented)."""
