"""How a decode call's tokens map onto sequences, shared by the native references.

Three forms: one token per sequence (``lead == (batch,)``), a fixed number per sequence
(``lead == (batch, T)``), and variable lengths given by ``cu_seqlens`` over flat tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenLayout:
    starts: torch.Tensor  # (count,) first flat token of each sequence
    lengths: torch.Tensor  # (count,)
    per_seq: int  # tokens per sequence in the (batch, T) form, else 0

    @property
    def count(self) -> int:
        return self.starts.shape[0]

    @property
    def max_len(self) -> int:
        return int(self.lengths.max()) if self.count else 0

    def step(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Which sequences have a token ``t``, and its flat index (clamped where they don't)."""
        live = t < self.lengths
        return live, self.starts + torch.where(live, t, 0)

    def flat(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.flatten(0, 1) if self.per_seq else tensor

    def gather(self, tensor: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        flat = self.flat(tensor)
        return flat[tok.clamp(max=flat.shape[0] - 1)]  # a dead sequence may start past the end

    def scatter(self, out: torch.Tensor, tok: torch.Tensor, values: torch.Tensor) -> None:
        values = values.to(out.dtype)
        if self.per_seq:
            out[tok // self.per_seq, tok % self.per_seq] = values
        else:
            out[tok] = values

    def rows(
        self,
        indices: torch.Tensor | None,
        dst_indices: torch.Tensor | None,
        num_accepted_tokens: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sequence's source row, and its destination rows (one per token column).

        Index tensors may be longer than the number of sequences: the tail is ignored. The
        source column under speculative decoding, ``max(accepted - 1, 0)``, is bounded by
        the source indices' columns (the eager check refuses larger counts)."""
        device = self.starts.device
        if indices is None:
            indices = torch.arange(self.count, device=device)
        indices = indices[: self.count]
        base = (indices if indices.dim() == 2 else indices[:, None]).long()
        dst = base if dst_indices is None else dst_indices[: self.count].long()
        if dst.dim() == 1:
            dst = dst[:, None]
        col = torch.zeros(self.count, 1, dtype=torch.long, device=device)
        if num_accepted_tokens is not None:
            accepted = num_accepted_tokens[: self.count].long()
            col = (accepted - 1).clamp(min=0, max=max(base.shape[1] - 1, 0))[:, None]
        return base.gather(1, col)[:, 0], dst


def token_layout(
    lead: torch.Size | tuple[int, ...],
    cu_seqlens: torch.Tensor | None,
    device: torch.device,
) -> TokenLayout:
    """The layout of a call whose per-token tensors have leading dims ``lead``.

    Offsets are clamped to ``[0, tokens]`` and an end before its start is an empty
    sequence, as in every provider: compiled calls skip the value checks, and an offset
    outside the tokens must shorten a sequence rather than index past them."""
    if cu_seqlens is not None:
        cu = cu_seqlens.long().clamp(0, lead[0])
        starts = cu[:-1]
        return TokenLayout(starts, (cu[1:] - starts).clamp(min=0), 0)
    batch = lead[0]
    per_seq = lead[1] if len(lead) == 2 else 1
    starts = torch.arange(batch, device=device) * per_seq
    lengths = torch.full((batch,), per_seq, device=device)
    return TokenLayout(starts, lengths, per_seq if len(lead) == 2 else 0)
