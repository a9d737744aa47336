"""Tensor parallelism: what each rank of a group holds of the hybrid, and the layers that
join the ranks' parts.

Sharded the way serving engines shard these layers:

* Mamba2 mixer: SSM heads split (their ``x``, ``z``, ``dt``, ``A``, ``D``, ``dt_bias``,
  conv channels and norm weights); B/C groups split when ``n_groups % tp == 0``, else
  (``tp % n_groups == 0``) each rank holds the one group its heads read, replicated on
  the ``tp / n_groups`` ranks that share it; ``out_proj`` row-parallel;
* the gated RMSNorm normalises per group: local when a rank holds whole groups, else the
  ranks sharing a group sum their parts of its mean square (one all-reduce);
* attention: query heads split, KV heads split or, with fewer KV heads than ranks, the one
  KV head a rank's queries read replicated; ``o_proj`` row-parallel;
* MLP: gate and up projections split by column, ``down_proj`` row-parallel;
* embeddings, norms and the LM head replicated: every rank computes the same logits.

A row-parallel projection multiplies its rank's input columns and sums the partial
products with a *functional* all-reduce (``torch.distributed._functional_collectives``),
so a compiled graph holds the collective as a node among the IR calls. With one rank no
layer holds a collective: the modules are the unsharded ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import HybridConfig

if dist.is_available():
    from torch.distributed import _functional_collectives as funcol


@dataclass(frozen=True)
class TensorParallel:
    """One process's place in a tensor-parallel group: ``rank`` of ``size``, over the
    ``torch.distributed`` process group ``group`` (None: the default group)."""

    rank: int = 0
    size: int = 1
    group: Any = None

    def __post_init__(self) -> None:
        for name, value, low in (("size", self.size, 1), ("rank", self.rank, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"tp.{name}: expected an int >= {low}, got {value!r}")
        if self.rank >= self.size:
            raise ValueError(f"tp.rank: expected a rank in [0, {self.size}), got {self.rank}")

    @classmethod
    def of_group(cls, group: Any = None) -> TensorParallel:
        """This process in ``group`` (None: the default group) of ``torch.distributed``,
        which must be initialised."""
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("group: torch.distributed is not initialised "
                             "(init_process_group first)")
        return cls(dist.get_rank(group), dist.get_world_size(group), group)


def all_reduce(x: torch.Tensor, group: Any) -> torch.Tensor:
    """The sum of ``x`` over the ranks of ``group`` (a functional collective)."""
    return funcol.all_reduce(x, "sum", group if group is not None else dist.group.WORLD)


def _span(start: int, count: int, width: int = 1, offset: int = 0) -> torch.Tensor:
    """Indices of ``count`` consecutive blocks of ``width`` from block ``start``."""
    return torch.arange(offset + start * width, offset + (start + count) * width)


@dataclass(frozen=True)
class ShardPlan:
    """The part of ``config``'s model that rank ``tp.rank`` holds: its sizes, and the
    indices of its rows in the unsharded weights. Bad sizes raise ValueError naming ``tp``."""

    config: HybridConfig
    tp: TensorParallel = TensorParallel()

    def __post_init__(self) -> None:
        c, n = self.config, self.tp.size
        needs = [
            ("mamba_n_heads", c.mamba_n_heads, c.mamba_n_heads % n == 0),
            ("mamba_n_groups", c.mamba_n_groups,
             c.mamba_n_groups % n == 0 or n % c.mamba_n_groups == 0),
        ]
        if c.attention_layers:
            kv = c.num_key_value_heads
            needs += [("num_attention_heads", c.num_attention_heads,
                       c.num_attention_heads % n == 0),
                      ("num_key_value_heads", kv, kv % n == 0 or n % kv == 0)]
        if c.intermediate_size:
            needs.append(("intermediate_size", c.intermediate_size,
                          c.intermediate_size % n == 0))
        for name, value, ok in needs:
            if not ok:
                how = "divide or be divided by" if name in (
                    "mamba_n_groups", "num_key_value_heads") else "be a multiple of"
                raise ValueError(f"tp: {n} ranks cannot shard {name} {value} (it must {how} "
                                 "the number of ranks)")

    # -- sizes on this rank ----------------------------------------------------------

    @property
    def size(self) -> int:
        return self.tp.size

    @property
    def mamba_heads(self) -> int:
        return self.config.mamba_n_heads // self.size

    @property
    def mamba_groups(self) -> int:
        """B/C groups on this rank: ``n_groups / tp``, or 1 (replicated) with fewer groups
        than ranks."""
        return max(self.config.mamba_n_groups // self.size, 1)

    @property
    def first_group(self) -> int:
        """The first (with fewer groups than ranks: the only) group this rank holds."""
        return self.tp.rank * self.config.mamba_n_groups // self.size

    @property
    def norm_ranks(self) -> int:
        """Ranks sharing each norm group: 1 when every rank holds whole groups."""
        return max(self.size // self.config.mamba_n_groups, 1)

    @property
    def inner(self) -> int:
        return self.mamba_heads * self.config.mamba_d_head

    @property
    def conv_dim(self) -> int:
        return self.inner + 2 * self.mamba_groups * self.config.mamba_d_state

    @property
    def attention_heads(self) -> int:
        return self.config.num_attention_heads // self.size

    @property
    def kv_heads(self) -> int:
        return max(self.config.num_key_value_heads // self.size, 1)

    @property
    def mlp_size(self) -> int:
        return self.config.intermediate_size // self.size

    # -- rows of the unsharded weights -------------------------------------------------

    def _heads(self, width: int = 1, offset: int = 0) -> torch.Tensor:
        return _span(self.tp.rank * self.mamba_heads, self.mamba_heads, width, offset)

    def _groups(self, offset: int) -> torch.Tensor:
        return _span(self.first_group, self.mamba_groups, self.config.mamba_d_state, offset)

    def _xbc(self, offset: int) -> torch.Tensor:
        """x, B and C channels of this rank, in the conv's channel order."""
        c = self.config
        bc = c.mamba_n_groups * c.mamba_d_state
        return torch.cat([self._heads(c.mamba_d_head, offset),
                          self._groups(offset + c.intermediate_mamba),
                          self._groups(offset + c.intermediate_mamba + bc)])

    def rows(self, name: str) -> tuple[int, torch.Tensor] | None:
        """How the unsharded parameter ``name`` (this package's names) is split: the dim
        and the indices this rank holds along it; None for a replicated parameter."""
        c = self.config
        tail = name.split(".", 2)[-1] if name.startswith("layers.") else ""
        inner, p = c.intermediate_mamba, c.mamba_d_head
        if tail in ("mixer.in_proj.weight", "mixer.in_proj.bias"):  # z, xBC, dt
            return 0, torch.cat([self._heads(p), self._xbc(inner),
                                 self._heads(1, inner + c.conv_dim)])
        if tail in ("mixer.conv_weight", "mixer.conv_bias"):
            return 0, self._xbc(0)
        if tail in ("mixer.dt_bias", "mixer.A_log", "mixer.D"):
            return 0, self._heads()
        if tail == "mixer.norm.weight":
            return 0, self._heads(p)
        if tail == "mixer.out_proj.weight":
            return 1, self._heads(p)
        d, q = c.attention_head_dim, self.attention_heads
        if tail in ("attn.q_proj.weight", "attn.q_proj.bias"):
            return 0, _span(self.tp.rank * q, q, d)
        if tail in ("attn.k_proj.weight", "attn.k_proj.bias",
                    "attn.v_proj.weight", "attn.v_proj.bias"):
            first = self.tp.rank * c.num_key_value_heads // self.size
            return 0, _span(first, self.kv_heads, d)
        if tail == "attn.o_proj.weight":
            return 1, _span(self.tp.rank * q, q, d)
        m = self.mlp_size
        if tail in ("mlp.gate_proj.weight", "mlp.gate_proj.bias",
                    "mlp.up_proj.weight", "mlp.up_proj.bias"):
            return 0, _span(self.tp.rank * m, m)
        if tail == "mlp.down_proj.weight":
            return 1, _span(self.tp.rank * m, m)
        return None

    def shard_state_dict(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's part of an unsharded state dict (this package's names)."""
        out = {}
        for name, tensor in state.items():
            split = self.rows(name) if self.size > 1 else None
            if split is None:
                out[name] = tensor
                continue
            dim, index = split
            out[name] = tensor.index_select(dim, index.to(tensor.device)).contiguous()
        return out


def plan_of(config: HybridConfig, tp: TensorParallel | None) -> ShardPlan:
    return ShardPlan(config, tp if tp is not None else TensorParallel())


class RowParallelLinear(nn.Linear):
    """A projection whose input columns are split over the ranks: each rank multiplies
    its columns, an all-reduce sums the partial products, the bias is added once after."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group: Any) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


def row_parallel(in_features: int, out_features: int, bias: bool, plan: ShardPlan) -> nn.Linear:
    """The output projection over this rank's ``in_features`` columns: a plain
    ``nn.Linear`` on one rank (no collective), :class:`RowParallelLinear` otherwise."""
    if plan.size == 1:
        return nn.Linear(in_features, out_features, bias=bias)
    return RowParallelLinear(in_features, out_features, bias, plan.tp.group)


def shared_group_mean(partial: torch.Tensor, index: int, groups: int, group: Any, width: int
                      ) -> torch.Tensor:
    """The mean over a norm group of ``width`` channels spread over several ranks, from
    this rank's sums ``partial`` ``(..., 1)``: each rank places its sum in its group's
    column ``index`` of a ``(..., groups)`` tensor of zeros, one all-reduce over the whole
    process group adds them, and each takes back its column (one process group serves
    every set of ranks)."""
    spread = F.pad(partial, (index, groups - 1 - index))
    return all_reduce(spread, group)[..., index:index + 1] / width
