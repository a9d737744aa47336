"""Triton provider: one module per op."""
