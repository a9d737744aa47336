"""Tensor parallelism on the CPU: gloo processes serve the sharded hybrid and agree with
the unsharded model.

Two launches (tests/tp_worker.py): tp 2, where each rank holds one of the two B/C groups
and one of the two KV heads, and tp 4, where the groups and KV heads are replicated (two
ranks each) and the gated norm's groups span two ranks. Every rank serves the same
prompts twice (cold, then from prefix-cache hits), eager and compiled with the passes,
and must give the unsharded model's greedy tokens, its logits within float32 rounding of
the summation order, its block table, and state rows holding the rank's heads. The
unsharded reference runs eagerly here (compiled against eager is tests/test_model.py's).
"""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from tp_worker import BLOCK, CONFIG, model, run, serve

from mamba_ir.models import HybridModel, ShardPlan, TensorParallel, random_model
from mamba_ir.models.tp import RowParallelLinear

# logits of the sharded model: partial sums added in another order (observed <= 4e-6)
ATOL = 2e-5
MODES = ("eager", "compiled")


@pytest.fixture(scope="module")
def unsharded() -> dict:
    return serve(model())


@pytest.fixture(scope="module", params=[2, 4], ids=["tp2-groups-split", "tp4-groups-replicated"])
def ranks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list:
    size = request.param
    out = tmp_path_factory.mktemp(f"tp{size}")
    mp.start_processes(run, args=(size, f"file://{out / 'init'}", str(out)), nprocs=size,
                       start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(size)]


def test_every_rank_gives_the_unsharded_tokens_and_logits(ranks, unsharded):
    # the second run is served from the first one's checkpoints
    assert unsharded["cached"] == [[0, 0, 0], [2 * BLOCK, BLOCK, 0]]
    for rank in ranks:
        for mode in MODES:
            got = rank[mode]
            assert got["tokens"] == unsharded["tokens"], mode
            assert got["cached"] == unsharded["cached"], mode
            for run_got, run_ref in zip(got["logits"], unsharded["logits"], strict=True):
                for a, b in zip(run_got, run_ref, strict=True):
                    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_ranks_agree_and_keep_the_unsharded_block_table(ranks, unsharded):
    # the all-reduce gives every rank the same sums, so the same logits: each rank's own
    # scheduler makes the same choices (slots, checkpoints) without talking to the others
    for mode in MODES:
        first = ranks[0][mode]
        for rank in ranks:
            assert rank[mode]["table"] == unsharded["table"]
            for run_got, run_first in zip(rank[mode]["logits"], first["logits"], strict=True):
                for a, b in zip(run_got, run_first, strict=True):
                    assert torch.equal(a, b)


def test_each_rank_state_rows_hold_its_heads(ranks, unsharded):
    size = len(ranks)
    slots = [slot for _, slot in unsharded["table"]] + [0]  # checkpoints and the zero slot
    for r, rank in enumerate(ranks):
        plan = ShardPlan(CONFIG, TensorParallel(r, size))
        channels = plan.rows("layers.0.mixer.conv_weight")[1]
        heads = plan.rows("layers.0.mixer.A_log")[1]
        for mode in MODES:
            for layer, (conv, ssm) in rank[mode]["states"].items():
                full_conv, full_ssm = unsharded["states"][layer]
                assert conv.shape == (full_conv.shape[0], plan.conv_dim, full_conv.shape[2])
                assert ssm.shape[1] == plan.mamba_heads
                torch.testing.assert_close(conv[slots], full_conv[slots][:, channels],
                                           atol=ATOL, rtol=0)
                torch.testing.assert_close(ssm[slots], full_ssm[slots][:, heads],
                                           atol=ATOL, rtol=0)


def test_compiled_graphs_hold_collectives_and_every_rank_lowers_them_alike(ranks):
    size = len(ranks)
    # per graph and layer: out_proj or o_proj, and down_proj; with groups spread over
    # ranks, each Mamba layer's gated norm adds one
    per_graph = 2 * CONFIG.num_layers + (len(CONFIG.mamba_layers) if size > 2 else 0)
    decisions = []
    for r, rank in enumerate(ranks):
        targets = rank["targets"]
        assert targets.count("_c10d_functional.all_reduce.default") == 2 * per_graph
        sites = rank["compiled"]["report"]
        assert {s["graph_name"] for s in sites} == {"prefill", "decode"}
        assert all(s["rank"] == r for s in sites)
        # align copies fold across graphs that hold collectives
        assert any(s["op"] == "copy_state_blocks" and s["fused"] for s in sites)
        decisions.append([{k: v for k, v in s.items() if k != "rank"} for s in sites])
    assert all(d == decisions[0] for d in decisions)


def _targets(fn, *args) -> list[str]:
    """The call targets of the graphs TorchDynamo captures from ``fn(*args)``."""
    seen = []

    def record(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    with torch.inference_mode():
        torch.compile(fn, backend=record, fullgraph=True)(*args)
    return seen


def test_one_rank_holds_no_collective():
    from mamba_ir.models import Engine

    for tp in (None, TensorParallel(0, 1)):
        m = random_model(CONFIG, tp=tp)
        assert not any(isinstance(x, RowParallelLinear) for x in m.modules())
        assert all(layer.mixer.norm.shared is None for layer in m.layers
                   if layer.kind == "mamba")
        engine = Engine(m, block_size=BLOCK, max_requests=2, max_len=16)
        slots = torch.tensor([2, 3], dtype=torch.int32)
        targets = _targets(engine.steps.decode, torch.tensor([1, 2]), torch.tensor([0, 0]),
                           torch.tensor([0, 1]), slots)
        assert "mamba_ir.selective_state_update.default" in targets
        assert not [t for t in targets if "c10d" in t or "all_reduce" in t]


def _in_proj_parts(weight: torch.Tensor, heads: int, groups: int) -> list[torch.Tensor]:
    """in_proj's rows as z, x, B, C, dt for ``heads`` heads and ``groups`` groups."""
    c = CONFIG
    inner, bc = heads * c.mamba_d_head, groups * c.mamba_d_state
    return list(weight.split([inner, inner, bc, bc, heads]))


@pytest.mark.parametrize("size", [2, 4])
def test_shards_split_heads_and_split_or_replicate_groups(size):
    full = model().state_dict()
    c, name = CONFIG, "layers.0.mixer.in_proj.weight"
    whole = _in_proj_parts(full[name], c.mamba_n_heads, c.mamba_n_groups)
    plans = [ShardPlan(c, TensorParallel(r, size)) for r in range(size)]
    shards = [p.shard_state_dict(full) for p in plans]
    parts = [_in_proj_parts(s[name], p.mamba_heads, p.mamba_groups)
             for s, p in zip(shards, plans, strict=True)]
    for k in (0, 1, 4):  # z, x, dt: split by heads
        assert torch.equal(torch.cat([p[k] for p in parts]), whole[k])
    d = c.mamba_d_state
    for r, p in enumerate(parts):
        for k in (2, 3):  # B, C: the groups of the rank's heads
            first = r * c.mamba_n_groups // size
            assert torch.equal(p[k], whole[k][first * d:(first + plans[r].mamba_groups) * d])
    # the conv's channels are the x, B, C channels in_proj gives the rank (random rows
    # are distinct: a row of the shard is found in the whole by its values)
    xbc = full[name][c.intermediate_mamba:c.intermediate_mamba + c.conv_dim]
    for s, plan in zip(shards, plans, strict=True):
        rows = s[name][plan.inner:plan.inner + plan.conv_dim]
        channels = (rows[:, None] == xbc[None]).all(-1).int().argmax(-1)
        assert torch.equal(xbc[channels], rows)
        for conv in ("layers.0.mixer.conv_weight", "layers.0.mixer.conv_bias"):
            assert torch.equal(s[conv], full[conv][channels])
    # row-parallel projections split their input columns; the rest is replicated
    for key in ("layers.0.mixer.out_proj.weight", "layers.1.attn.o_proj.weight",
                "layers.1.mlp.down_proj.weight"):
        assert torch.equal(torch.cat([s[key] for s in shards], dim=1), full[key])
    for key in ("embed.weight", "lm_head.weight", "layers.0.mixer.out_proj.bias"):
        assert all(torch.equal(s[key], full[key]) for s in shards)
    # KV heads: two over four ranks, each read by the rank's query heads
    kv = "layers.1.attn.k_proj.weight"
    for r, s in enumerate(shards):
        head = r * c.num_key_value_heads // size
        width = plans[r].kv_heads * c.attention_head_dim
        assert torch.equal(s[kv], full[kv][head * c.attention_head_dim:][:width])


@pytest.mark.parametrize(("changes", "size", "match"), [
    ({}, 3, "tp: 3 ranks cannot shard mamba_n_heads 4 .*be a multiple of"),
    ({"mamba_n_heads": 12, "mamba_d_head": 16, "hidden_size": 96, "mamba_n_groups": 4}, 3,
     "tp: 3 ranks cannot shard mamba_n_groups 4 .*divide or be divided by"),
    ({"num_attention_heads": 2, "num_key_value_heads": 1}, 4,
     "tp: 4 ranks cannot shard num_attention_heads 2"),
    ({"intermediate_size": 50}, 4, "tp: 4 ranks cannot shard intermediate_size 50"),
])
def test_unshardable_sizes_are_refused(changes, size, match):
    with pytest.raises(ValueError, match=match):
        HybridModel(CONFIG.with_(**changes), TensorParallel(0, size))


@pytest.mark.parametrize(("rank", "size", "match"), [
    (2, 2, r"tp.rank: expected a rank in \[0, 2\), got 2"),
    (0, 0, "tp.size: expected an int >= 1, got 0"),
    (-1, 2, "tp.rank: expected an int >= 0, got -1"),
])
def test_bad_ranks_are_refused(rank, size, match):
    with pytest.raises(ValueError, match=match):
        TensorParallel(rank, size)
