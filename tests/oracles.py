"""Independent float64 references: one sequence and one token at a time, straight from the
definitions in docs/ops.md, sharing no code with the native ops."""

from __future__ import annotations

from typing import Any

import torch


def _seqs(lengths: list[int], starts: list[int]) -> list[list[int]]:
    return [list(range(s, s + n)) for s, n in zip(starts, lengths, strict=True)]


def _ids(t: torch.Tensor | None) -> list[Any] | None:
    return None if t is None else t.tolist()


def selective_state_update(call: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (new state, output) in float64; a quantized state's values are its integers
    (or float8 values) times their block's scale."""
    state0 = call["state"].double()
    if call.get("state_scale") is not None:
        state0 = state0 * call["state_scale"].double()[..., None]
    mamba1 = state0.dim() == 3
    lift = (
        (lambda t: None if t is None else t.double().unsqueeze(-2))
        if mamba1
        else (lambda t: None if t is None else t.double())
    )
    x, dt, B, C, z = (lift(call[k]) for k in ("x", "dt", "B", "C", "z"))
    if mamba1:
        state0 = state0.unsqueeze(1)
        A = call["A"].double().unsqueeze(0)
        D = None if call["D"] is None else call["D"].double().unsqueeze(0)
        bias = None if call["dt_bias"] is None else call["dt_bias"].double().unsqueeze(0)
    else:
        A = call["A"].double()
        D = None if call["D"] is None else call["D"].double()
        bias = None if call["dt_bias"] is None else call["dt_bias"].double()
    nheads, ngroups = state0.shape[1], B.shape[-2]
    multi = x.dim() == 4
    if multi:  # (batch, T, ...) -> flat tokens
        T = x.shape[1]
        x, dt, B, C = (t.reshape(-1, *t.shape[2:]) for t in (x, dt, B, C))
        z = None if z is None else z.reshape(-1, *z.shape[2:])
        seqs = _seqs([T] * (x.shape[0] // T), [b * T for b in range(x.shape[0] // T)])
    elif call["cu_seqlens"] is not None:
        cu = call["cu_seqlens"].tolist()
        seqs = _seqs([b - a for a, b in zip(cu, cu[1:], strict=False)], cu[:-1])
    else:
        seqs = [[b] for b in range(x.shape[0])]
    pad = call["pad_slot_id"]
    sbi, dsbi, nacc = (
        _ids(call["state_batch_indices"]),
        _ids(call["dst_state_batch_indices"]),
        _ids(call["num_accepted_tokens"]),
    )
    state = state0.clone()
    out = torch.zeros_like(x)
    for b, toks in enumerate(seqs):
        src_row = b if sbi is None else sbi[b]
        dst_row = src_row if dsbi is None else dsbi[b]
        if nacc is not None:
            src = src_row[max(nacc[b] - 1, 0)]
        else:
            src = src_row[0] if isinstance(src_row, list) else src_row
        h = torch.zeros_like(state0[0]) if src == pad else state0[src].clone()
        for t, tok in enumerate(toks):
            for hd in range(nheads):
                g = hd // (nheads // ngroups)
                d = dt[tok, hd] + (0 if bias is None else bias[hd])
                if call["dt_softplus"]:
                    d = torch.where(d <= 20, torch.log1p(torch.exp(d)), d)
                if call.get("dt_limit") is not None:
                    lo, hi = (torch.tensor(float(v), dtype=torch.float64) for v in call["dt_limit"])
                    d = torch.minimum(torch.maximum(d, lo), hi)
                h[hd] = (
                    h[hd] * torch.exp(A[hd] * d[:, None])
                    + (d[:, None] * B[tok, g][None]) * x[tok, hd][:, None]
                )
                y = (h[hd] * C[tok, g][None]).sum(-1)
                if D is not None:
                    y = y + D[hd] * x[tok, hd]
                if z is not None:
                    y = y * z[tok, hd] * torch.sigmoid(z[tok, hd])
                out[tok, hd] = y
            if nacc is not None and dst_row[t] != pad:
                state[dst_row[t]] = h
        if nacc is None and toks:
            dst = dst_row[0] if isinstance(dst_row, list) else dst_row
            if dst != pad:
                state[dst] = h
    out = out.reshape(call["x"].shape) if not mamba1 else out.squeeze(-2).reshape(call["x"].shape)
    return (state.squeeze(1) if mamba1 else state), out


def _conv(
    hist: list[torch.Tensor], weight: torch.Tensor, bias: Any, act: Any, t: int
) -> torch.Tensor:
    width = weight.shape[1]
    y = torch.zeros_like(hist[0]) if bias is None else bias.double().clone()
    for k in range(width):
        y = y + weight[:, k].double() * hist[t + k]
    if act in ("silu", "swish"):
        y = y / (1 + torch.exp(-y))
    return y


def causal_conv1d_fn(call: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    x, w, states0 = call["x"].double(), call["weight"], call["conv_states"].double()
    width, pad = w.shape[1], call["pad_slot_id"]
    qsl = call["query_start_loc"].tolist()
    n = len(qsl) - 1
    dst = list(range(n)) if call["cache_indices"] is None else call["cache_indices"].tolist()
    src = dst if call["src_cache_indices"] is None else call["src_cache_indices"].tolist()
    init = [False] * n if call["has_initial_state"] is None else call["has_initial_state"].tolist()
    states, out = states0.clone(), torch.zeros_like(x)
    for b in range(n):
        toks = list(range(qsl[b], qsl[b + 1]))
        if not toks:
            continue
        use = init[b] and src[b] != pad
        hist = [
            states0[src[b], :, j] if use else torch.zeros(x.shape[0], dtype=torch.float64)
            for j in range(width - 1)
        ]
        hist += [x[:, t] for t in toks]
        for i, t in enumerate(toks):
            out[:, t] = _conv(hist, w, call["bias"], call["activation"], i)
        if dst[b] != pad:
            for j in range(width - 1):
                states[dst[b], :, j] = hist[len(hist) - (width - 1) + j]
    return states, out


def causal_conv1d_update(call: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    x, w, states0 = call["x"].double(), call["weight"], call["conv_state"].double()
    width, pad = w.shape[1], call["pad_slot_id"]
    if call["query_start_loc"] is not None:
        qsl = call["query_start_loc"].tolist()
        seqs = [[(t,) for t in range(a, b)] for a, b in zip(qsl, qsl[1:], strict=False)]
        get = lambda tok: x[tok[0]]  # noqa: E731
    elif x.dim() == 3:
        seqs = [[(b, t) for t in range(x.shape[2])] for b in range(x.shape[0])]
        get = lambda tok: x[tok[0], :, tok[1]]  # noqa: E731
    else:
        seqs = [[(b,)] for b in range(x.shape[0])]
        get = lambda tok: x[tok[0]]  # noqa: E731
    n = len(seqs)
    dst = (
        list(range(n))
        if call["conv_state_indices"] is None
        else call["conv_state_indices"].tolist()
    )
    src = dst if call["src_conv_state_indices"] is None else call["src_conv_state_indices"].tolist()
    nacc, offs = _ids(call["num_accepted_tokens"]), _ids(call["src_token_offset"])
    states, out = states0.clone(), torch.zeros_like(x)
    for b, toks in enumerate(seqs):
        off = offs[b] if offs is not None else (max(nacc[b] - 1, 0) if nacc is not None else 0)
        hist = [
            states0[src[b], :, off + j]
            if src[b] != pad
            else torch.zeros(w.shape[0], dtype=torch.float64)
            for j in range(width - 1)
        ]
        hist += [get(tok) for tok in toks]
        for i, tok in enumerate(toks):
            y = _conv(hist, w, call["bias"], call["activation"], i)
            if x.dim() == 3:
                out[tok[0], :, tok[1]] = y
            else:
                out[tok[0]] = y
        if not toks or dst[b] == pad:
            continue
        if nacc is not None:
            kept = hist[1:]
        else:
            kept = hist[len(toks) :]
        for j, col in enumerate(kept):
            states[dst[b], :, j] = col
    return states, out


def copy_state_blocks(call: dict[str, Any]) -> tuple[torch.Tensor, None]:
    state0, pad = call["state"].double(), call["pad_slot_id"]
    state = state0.clone()
    for s, d in zip(call["src"].tolist(), call["dst"].tolist(), strict=True):
        if s != pad and d != pad:
            state[d] = state0[s]
    return state, None


def mamba_chunk_scan(call: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (new state, output) in float64; checkpoints at every block boundary."""
    state0 = call["state"].double()
    x, dt, B, C = (call[k].double() for k in ("x", "dt", "B", "C"))
    A, z = call["A"].double(), call["z"]
    D, bias, limit = call["D"], call["dt_bias"], call["dt_limit"]
    nheads, ngroups = x.shape[1], B.shape[1]
    cu, pad, bs = call["cu_seqlens"].tolist(), call["pad_slot_id"], call["block_size"]
    n = len(cu) - 1
    sbi, dsbi = _ids(call["state_batch_indices"]), _ids(call["dst_state_batch_indices"])
    sbi = list(range(n)) if sbi is None else sbi
    dsbi = sbi if dsbi is None else dsbi
    done = _ids(call["num_computed_tokens"]) or [0] * n
    ckpt = _ids(call["checkpoint_state_indices"])
    state, out = state0.clone(), torch.zeros_like(x)
    for b in range(n):
        h = torch.zeros_like(state0[0]) if sbi[b] == pad else state0[sbi[b]].clone()
        boundaries = 0
        for i, tok in enumerate(range(cu[b], cu[b + 1])):
            for hd in range(nheads):
                g = hd // (nheads // ngroups)
                d = dt[tok, hd] + (0 if bias is None else bias[hd].double())
                if call["dt_softplus"]:
                    d = torch.where(d <= 20, torch.log1p(torch.exp(d)), d)
                if limit is not None:
                    d = d.clamp(limit[0], limit[1])
                h[hd] = h[hd] * torch.exp(A[hd] * d) + d * x[tok, hd][:, None] * B[tok, g][None]
                y = (h[hd] * C[tok, g][None]).sum(-1)
                if D is not None:
                    y = y + D[hd].double() * x[tok, hd]
                if z is not None:
                    zz = z[tok, hd].double()
                    y = y * zz * torch.sigmoid(zz)
                out[tok, hd] = y
            if bs and (done[b] + i + 1) % bs == 0:
                row = ckpt[b][boundaries]
                boundaries += 1
                if row != pad:
                    state[row] = h
        if cu[b + 1] > cu[b] and dsbi[b] != pad:
            state[dsbi[b]] = h
    return state, out


def selective_scan(call: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (new ssm_states, output) in float64: Mamba1, channel-first tokens."""
    state0 = call["ssm_states"].double()
    u, delta, A = call["u"].double(), call["delta"].double(), call["A"].double()
    B, C = (call[k].double() for k in ("B", "C"))
    if B.dim() == 2:
        B, C = B[None], C[None]
    D, z, bias = call["D"], call["z"], call["delta_bias"]
    dim, ngroups = u.shape[0], B.shape[0]
    qsl, pad, bs = call["query_start_loc"].tolist(), call["pad_slot_id"], call["block_size"]
    n = len(qsl) - 1
    nslots = state0.shape[0]
    dst = (_ids(call["cache_indices"]) or list(range(n)))[:n]  # entries past n are ignored
    src = (_ids(call["src_cache_indices"]) or dst)[:n]
    init = (_ids(call["has_initial_state"]) or [False] * n)[:n]
    done = (_ids(call["num_computed_tokens"]) or [0] * n)[:n]
    ckpt = _ids(call["checkpoint_state_indices"])
    state, out = state0.clone(), torch.zeros_like(u)
    for b in range(n):
        use = init[b] and src[b] != pad and 0 <= src[b] < nslots
        h = state0[src[b]].clone() if use else torch.zeros_like(state0[0])
        boundaries = 0
        for i, tok in enumerate(range(qsl[b], qsl[b + 1])):
            for d in range(dim):
                g = d // (dim // ngroups)
                step = delta[d, tok] + (0 if bias is None else bias[d].double())
                if call["delta_softplus"] and step <= 20:  # softplus, linear above 20
                    step = torch.log1p(torch.exp(step))
                h[d] = h[d] * torch.exp(A[d] * step) + step * B[g, :, tok] * u[d, tok]
                y = (h[d] * C[g, :, tok]).sum()
                if D is not None:
                    y = y + D[d].double() * u[d, tok]
                if z is not None:
                    zz = z[d, tok].double()
                    y = y * zz / (1 + torch.exp(-zz))
                out[d, tok] = y
            if bs and (done[b] + i + 1) % bs == 0:
                row = ckpt[b][boundaries]
                boundaries += 1
                if row != pad:
                    state[row] = h
        if qsl[b + 1] > qsl[b] and dst[b] != pad:
            state[dst[b]] = h
    return state, out


def _replay_rows(state, rx, rdt, rb, lengths: list[int]) -> torch.Tensor:
    rows = []
    for r in range(state.shape[0]):
        n = lengths[r]
        parts = [state[r].flatten()]
        for t in (rx, rdt, rb):
            kept = torch.zeros_like(t[r])
            kept[:n] = t[r, :n]
            parts.append(kept.flatten())
        parts.append(torch.tensor([float(n)], dtype=torch.float64))
        rows.append(torch.cat(parts))
    return torch.stack(rows) if rows else torch.zeros(0, 0, dtype=torch.float64)


def replay_state_update(call: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (new rows, output) in float64, each row laid out as the op's row value: the
    checkpoint, the ring's filled entries (zeros past ring_len), ring_len. With
    ``num_accepted_tokens``: T tokens per sequence after the source row's last T entries
    (the previous call's) are cut to the accepted ones."""
    state0 = call["state"].double()
    rx0, rdt0, rb0 = (call[k].double() for k in ("ring_x", "ring_dt", "ring_B"))
    len0 = call["ring_len"].tolist()
    spec = call.get("num_accepted_tokens") is not None
    x, dt, B, C = (call[k].double() for k in ("x", "dt", "B", "C"))
    z = call["z"]
    if not spec:  # one token: a call of T = 1 whose ring holds everything committed
        x, dt, B, C = (t[:, None] for t in (x, dt, B, C))
        z = None if z is None else z[:, None]
    A = call["A"].double()
    D, bias, limit = call["D"], call["dt_bias"], call["dt_limit"]
    nslots, nheads = state0.shape[:2]
    ring, ngroups, pad = rx0.shape[1], B.shape[2], call["pad_slot_id"]
    T = x.shape[1]
    sbi, dsbi = _ids(call["state_batch_indices"]), _ids(call["dst_state_batch_indices"])
    nacc = _ids(call["num_accepted_tokens"]) if spec else None
    state, rx, rdt, rb = state0.clone(), rx0.clone(), rdt0.clone(), rb0.clone()
    lengths = list(len0)
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        src = b if sbi is None else sbi[b]
        dst = src if dsbi is None else dsbi[b]
        n = 0 if src == pad else len0[src]
        if spec:  # the previous call's rejected tokens are not part of the stream
            n = 0 if src == pad else n - T + nacc[b]
        h = torch.zeros_like(state0[0]) if src == pad else state0[src].clone()
        drafts = []
        for t in range(T):
            steps = []
            for hd in range(nheads):
                d = dt[b, t, hd, 0] + (0 if bias is None else bias[hd, 0].double())
                if call["dt_softplus"]:
                    d = torch.where(d <= 20, torch.log1p(torch.exp(d)), d)
                if limit is not None:
                    d = d.clamp(limit[0], limit[1])
                steps.append(d)
            drafts.append((x[b, t], torch.stack(steps), B[b, t]))

        def advance(h, xt, dtt, Bt):
            for hd in range(nheads):
                g = hd // (nheads // ngroups)
                h[hd] = h[hd] * torch.exp(A[hd] * dtt[hd]) + dtt[hd] * Bt[g][None] * xt[hd][:, None]

        for i in range(n):  # the ring's committed tokens
            advance(h, rx0[src, i], rdt0[src, i], rb0[src, i])
        committed = h.clone()
        for t, token in enumerate(drafts):  # then the call's, each output after its token
            advance(h, *token)
            for hd in range(nheads):
                g = hd // (nheads // ngroups)
                y = (h[hd] * C[b, t, g][None]).sum(-1)
                if D is not None:
                    y = y + D[hd].double() * x[b, t, hd]
                if z is not None:
                    zz = z[b, t, hd].double()
                    y = y * zz * torch.sigmoid(zz)
                out[b, t, hd] = y
        if dst == pad:
            continue
        if not spec and n == ring:  # full: the state is the new checkpoint, the ring empty
            state[dst] = h
            lengths[dst] = 0
        elif spec and n + T > ring:  # the tokens don't fit: the committed state is the
            state[dst] = committed  # checkpoint, the tokens an empty ring's first entries
            for t, token in enumerate(drafts):
                rx[dst, t], rdt[dst, t], rb[dst, t] = token
            lengths[dst] = T
        else:
            state[dst] = torch.zeros_like(h) if src == pad else state0[src]
            rx[dst, :n], rdt[dst, :n], rb[dst, :n] = rx0[src, :n], rdt0[src, :n], rb0[src, :n]
            for t, token in enumerate(drafts):
                rx[dst, n + t], rdt[dst, n + t], rb[dst, n + t] = token
            lengths[dst] = n + T
    return _replay_rows(state, rx, rdt, rb, lengths), out if spec else out[:, 0]


def replay_materialize(call: dict[str, Any]) -> tuple[torch.Tensor, None]:
    """Returns (new rows, None) in float64, each row laid out as the op's row value."""
    state0 = call["state"].double()
    rx, rdt, rb = (call[k].double() for k in ("ring_x", "ring_dt", "ring_B"))
    len0 = call["ring_len"].tolist()
    A, pad = call["A"].double(), call["pad_slot_id"]
    nslots, nheads = state0.shape[:2]
    ngroups = rb.shape[2]
    state, lengths = state0.clone(), list(len0)
    for s, d in zip(call["src"].tolist(), call["dst"].tolist(), strict=True):
        h = torch.zeros_like(state0[0]) if s == pad else state0[s].clone()
        for i in range(0 if s == pad else len0[s]):
            for hd in range(nheads):
                g = hd // (nheads // ngroups)
                step = rdt[s, i, hd]
                decay = 1.0 if step == 0 else torch.exp(A[hd] * step)
                h[hd] = h[hd] * decay + step * rb[s, i, g][None] * rx[s, i, hd][:, None]
        if d != pad:
            state[d], lengths[d] = h, 0
    return _replay_rows(state, rx, rdt, rb, lengths), None


ORACLES = {
    "selective_state_update": selective_state_update,
    "causal_conv1d_fn": causal_conv1d_fn,
    "causal_conv1d_update": causal_conv1d_update,
    "copy_state_blocks": copy_state_blocks,
    "mamba_chunk_scan": mamba_chunk_scan,
    "selective_scan": selective_scan,
    "replay_state_update": replay_state_update,
    "replay_materialize": replay_materialize,
}
