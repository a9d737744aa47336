"""Bridges from other libraries' models to the IR ops.

``mamba_ir.integrations.transformers.patch(model)`` runs a loaded transformers model's
Mamba2 mixers on the ops (docs/transformers.md). Nothing here is imported by ``mamba_ir``
itself: each bridge imports its library only when used.
"""
