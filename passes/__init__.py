"""Inductor graph passes: lowering and align-copy fusion."""
