"""Plain-PyTorch SampleAttention: stage 1 (column scores) and stage 3 (sparse attention).

These are the references the Triton kernels are tested against, and the backend used on
machines without CUDA. All math is float32 whatever the input dtype. Both functions work in
chunks so that memory stays bounded for long sequences (S in the tens of thousands on a CPU):

- `column_scores` processes one KV head and a chunk of sampled rows at a time, and only the
  keys those rows can see.
- `sparse_attention` processes the query heads of one KV head together, in blocks of rows,
  computing scores only for the contiguous window band of each block and the selected columns
  before it, so its cost follows the kept entries rather than S^2. Consecutive blocks are
  batched into one fused SDPA call each.

GQA: query head h reads KV head h // (Hq // Hkv); K and V are never repeated across heads.

Limits: `sparse_attention` still issues about ten tensor ops per batch of row blocks; on a CPU
whose cores are shared with other busy processes, multi-threaded ops wait on each other and
this path slows down more than one dense SDPA call does. Heads of one KV head with different
windows all compute the widest band (masked), and heads with fewer columns are padded to the
most, so uneven heads cost more than their kept entries.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .selection import Selection

# Upper bound on the float32 score elements stage 1 holds at once (1 Mi elements = 4 MiB):
# chunks that stay in cache measured ~3x faster on CPU than 128 MiB ones.
_STAGE1_CHUNK_ELEMS = 1 << 20
# Query rows per block in stage 3: large enough for efficient matmuls, small enough that the
# band overhead (block rows x block rows) stays minor next to the window.
_STAGE3_BLOCK_M = 128
# Stage 3 batches consecutive row blocks into one SDPA call while their gathered keys stay under
# this many float32 elements (16 MiB) and the batch under this many blocks (columns are padded
# to the last block's prefix, so long batches would score masked columns).
_STAGE3_KEY_ELEMS = 1 << 22
_STAGE3_MAX_BATCH = 16


def check_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None
) -> tuple[int, int, int, int, int]:
    """Assert the attention input layout (q (B, Hq, S, D), k and v (B, Hkv, S, D), Hq % Hkv == 0,
    one device); returns (B, Hq, Hkv, S, D)."""
    assert q.dim() == 4, f"q must be (B, Hq, S, D), got shape {tuple(q.shape)}"
    assert k.dim() == 4, f"k must be (B, Hkv, S, D), got shape {tuple(k.shape)}"
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    assert k.shape[0] == B and k.shape[2] == S and k.shape[3] == D, (
        f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in B, S or D"
    )
    assert Hkv >= 1 and Hq % Hkv == 0, f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})"
    if v is not None:
        assert v.shape == k.shape, f"v shape {tuple(v.shape)} must equal k shape {tuple(k.shape)}"
        assert q.device == k.device == v.device, "q, k, v must be on the same device"
    else:
        assert q.device == k.device, "q and k must be on the same device"
    assert S >= 1, "sequence length must be >= 1"
    return B, Hq, Hkv, S, D


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Exact causal attention through torch SDPA.

    q: (B, Hq, S, D); k, v: (B, Hkv, S, D), Hq % Hkv == 0, same dtype.
    scale: softmax scale, default 1/sqrt(D).
    Returns (B, Hq, S, D) in q's dtype.
    """
    _, Hq, Hkv, _, _ = check_qkv(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=Hq != Hkv)


def column_scores(
    q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, window_tokens: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1: attention of sampled query rows, accumulated per key column.

    q: (B, Hq, S, D); k: (B, Hkv, S, D); any float dtype, Hq % Hkv == 0.
    rows: (R,) int64, sorted unique sampled query rows (from `sample_rows`).
    window_tokens: band width w >= 1; row r's band is keys (r - w, r].
    scale: softmax scale.

    With p_r the exact causal softmax of row r over keys j <= r, returns (float32, q's device)
      scores:      (B, Hq, S), scores[b, h, j] = mean over rows r of p_r[j] * [j <= r - w]
      window_mass: (B, Hq, R), window_mass[b, h, i] = sum of p_{rows[i]} over its band.
    """
    B, Hq, Hkv, S, _ = check_qkv(q, k)
    assert rows.dim() == 1 and rows.numel() >= 1, (
        f"rows must be a non-empty (R,) tensor, got {tuple(rows.shape)}"
    )
    assert window_tokens >= 1, f"window_tokens must be >= 1, got {window_tokens}"
    rows = rows.to(device=q.device, dtype=torch.int64)
    assert int(rows.min()) >= 0 and int(rows.max()) < S, f"rows must lie in [0, {S})"
    assert bool((rows[1:] > rows[:-1]).all()), "rows must be sorted and unique"
    G = Hq // Hkv
    R = rows.numel()
    dev = q.device
    scores = torch.zeros(B, Hq, S, dtype=torch.float32, device=dev)
    window_mass = torch.empty(B, Hq, R, dtype=torch.float32, device=dev)
    chunk = max(1, _STAGE1_CHUNK_ELEMS // (G * S))
    keys = torch.arange(S, device=dev)
    for b in range(B):
        for g in range(Hkv):
            heads = slice(g * G, (g + 1) * G)
            kf = k[b, g].float()  # (S, D)
            for c0 in range(0, R, chunk):
                r = rows[c0 : c0 + chunk]
                n = int(r[-1]) + 1  # the chunk's rows see no key past its last row
                logits = torch.matmul(q[b, heads, r].float(), kf[:n].T) * scale  # (G, rc, n)
                j = keys[:n]
                causal = j[None, :] <= r[:, None]
                before = j[None, :] <= r[:, None] - window_tokens
                p = torch.softmax(logits.masked_fill_(~causal, float("-inf")), dim=-1)
                window_mass[b, heads, c0 : c0 + r.numel()] = (p * (causal & ~before)).sum(-1)
                scores[b, heads, :n] += p.masked_fill_(~before, 0.0).sum(1)
    return scores.div_(R), window_mass


def sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sel: Selection, scale: float
) -> torch.Tensor:
    """Stage 3: exact softmax attention over the entries kept by `sel`, skipping the rest.

    q: (B, Hq, S, D); k, v: (B, Hkv, S, D); same dtype, Hq % Hkv == 0.
    sel: Selection for (B, Hq) and seq_len S (window (B, Hq) int32, cols (B, Hq, C) int32, or
         (B, Hq, NSEG, C) for a segmented selection).
    scale: softmax scale.
    Returns (B, Hq, S, D) in q's dtype. Row i of head h attends keys j <= i with
    i - window < j (band) or j in the selected columns (of i's segment) with j <= i - window.

    The query heads sharing a KV head are processed together in blocks of rows [m0, m1): only
    the band keys [m0 - w + 1, m1) and the selected columns below m1 - w are scored. Since cols
    are ascending, the latter are a prefix of each head's gathered column keys; heads with
    shorter prefixes are padded to the longest and masked. Heads with window >= S are plain
    causal attention.
    """
    B, Hq, Hkv, S, D = check_qkv(q, k, v)
    assert sel.seq_len == S, f"selection is for seq_len {sel.seq_len}, inputs have S={S}"
    sel.check_shapes(B, Hq)
    assert bool((sel.window >= 1).all()), "sel.window must be >= 1"
    seg_cols, seg_ncols = sel.per_segment()
    C = seg_cols.shape[-1]
    valid = torch.arange(C, device=seg_cols.device) < seg_ncols[..., None]
    if C > 1:
        rising = seg_cols[..., 1:] > seg_cols[..., :-1]
        assert bool((rising | ~valid[..., 1:]).all()), "sel.cols must be strictly ascending within ncols"
    # Padding S is never <= i - w, so padded entries mask themselves out below.
    all_cols = torch.where(valid, seg_cols, S).to(device=q.device, dtype=torch.int64)  # (B, Hq, NSEG, C)
    G = Hq // Hkv
    dev = q.device
    out = torch.empty_like(q)
    windows = sel.window.cpu().tolist()
    longest = seg_ncols.amax(-1).cpu().tolist()
    for b in range(B):
        for g in range(Hkv):
            kf = k[b, g].float()  # (S, D)
            vf = v[b, g].float()
            group = range(g * G, (g + 1) * G)
            dense = [h for h in group if windows[b][h] >= S]
            if dense:
                hd = torch.tensor(dense, device=dev)
                o = F.scaled_dot_product_attention(
                    q[b, hd].float()[None], kf[None, None], vf[None, None],
                    is_causal=True, scale=scale, enable_gqa=True,
                )
                out[b, hd] = o[0].to(q.dtype)
            heads = [h for h in group if windows[b][h] < S]
            if heads:
                hs = torch.tensor(heads, device=dev)
                cols = all_cols[b, hs, :, : max(longest[b][h] for h in heads)]
                o = _sparse_group(q[b, hs], kf, vf, [windows[b][h] for h in heads], cols, scale, sel.segment_rows())
                out[b, hs] = o.to(q.dtype)
    return out


def _sparse_group(
    qh: torch.Tensor,
    kf: torch.Tensor,
    vf: torch.Tensor,
    windows: list[int],
    cols: torch.Tensor,
    scale: float,
    segment: int,
) -> torch.Tensor:
    """Stage 3 for n query heads sharing one KV head; returns (n, S, D) float32.

    qh: (n, S, D) queries; kf, vf: (S, D) float32 keys and values.
    windows: n band widths, each < S.
    cols: (n, NSEG, c) int64 selected columns per segment of `segment` query rows, ascending,
          padded with S (NSEG = 1, segment >= S: one list per head).

    Rows go in blocks of m (dividing the segment). Block t scores the selected columns its rows
    may use (a prefix of each head's sorted columns of its segment, padded to the longest over
    heads) and its band keys [t*m - w_max + 1, t*m + m). Several consecutive blocks form one SDPA
    batch, as many as fit the key budget, so the number of tensor ops stays small.
    """
    S, D = kf.shape
    dev = kf.device
    n = len(windows)
    nseg = cols.shape[1]
    m = _STAGE3_BLOCK_M if nseg == 1 else math.gcd(_STAGE3_BLOCK_M, segment)
    nblk = -(-S // m)
    m0s = torch.arange(0, nblk * m, m, device=dev)  # (nblk,) first row of each block
    seg_of = (m0s // segment).clamp(max=nseg - 1)  # (nblk,) each block's column list
    rows_in_block = torch.arange(m, device=dev)
    w = torch.tensor(windows, device=dev)  # (n,)
    w_max = max(windows)
    L = m + w_max - 1  # band keys of one block
    # Zero keys before key 0 and past S give every block its band as an equal-length window of
    # one padded tensor; the masks below never show them to a real row.
    pad = (0, 0, w_max - 1, nblk * m - S)
    k_band = F.pad(kf, pad).unfold(0, L, m).transpose(1, 2)  # (nblk, L, D) view
    v_band = F.pad(vf, pad).unfold(0, L, m).transpose(1, 2)
    block_cols = cols[:, seg_of].contiguous()  # (n, nblk, c)
    # Columns block t uses: cols < min(t*m + m, S) - w (the padding S is never counted); of
    # those, cols < t*m - w + 1 are seen by every row of the block and need no comparison.
    last = (m0s + m).clamp(max=S)
    prefix = torch.searchsorted(block_cols, (last[None, :, None] - w[:, None, None]).contiguous())[..., 0]
    settled = torch.searchsorted(block_cols, (m0s[None, :, None] - w[:, None, None] + 1).contiguous())[..., 0]
    prefix = prefix.amax(0).tolist()
    settled = settled.amin(0).tolist()
    if nseg == 1:
        kc = kf[cols[:, 0].clamp(max=S - 1)]  # (n, c, D)
        vc = vf[cols[:, 0].clamp(max=S - 1)]
    # Band slot c of a block holds key m0 - w_max + 1 + c; row m0 + r sees it when
    # 0 <= r + w_max - 1 - c < w. The same for every block, up to keys before 0.
    offset = rows_in_block[:, None] + (w_max - 1) - torch.arange(L, device=dev)[None, :]  # (m, L)
    band_base = (offset >= 0) & (offset[None] < w[:, None, None])  # (n, m, L)
    slots = torch.arange(L, device=dev)

    out = torch.empty(n, nblk * m, D, dtype=torch.float32, device=dev)
    t0 = 0
    while t0 < nblk:
        t1 = t0 + 1
        P = prefix[t0]
        while (
            t1 < nblk
            and t1 - t0 < _STAGE3_MAX_BATCH
            and (t1 + 1 - t0) * n * (max(P, prefix[t1]) + L) * D <= _STAGE3_KEY_ELEMS
        ):
            P = max(P, prefix[t1])
            t1 += 1
        T = t1 - t0
        r0, r1 = t0 * m, min(t1 * m, S)
        qs = qh[:, r0:r1].float()  # (n, rows, D)
        if r1 - r0 < T * m:  # the last block is short: pad its rows, drop them below
            qs = F.pad(qs, (0, 0, 0, T * m - (r1 - r0)))
        qs = qs.reshape(n, T, m, D).transpose(0, 1)  # (T, n, m, D)
        bc = block_cols[:, t0:t1, :P].transpose(0, 1)  # (T, n, P)
        if nseg == 1:
            ck = kc[None, :, :P].expand(T, n, P, D)
            cv = vc[None, :, :P].expand(T, n, P, D)
        else:
            ck = kf[bc.clamp(max=S - 1)]
            cv = vf[bc.clamp(max=S - 1)]
        keys = torch.cat((ck, k_band[t0:t1, None].expand(T, n, L, D)), 2)
        vals = torch.cat((cv, v_band[t0:t1, None].expand(T, n, L, D)), 2)
        i = m0s[t0:t1, None] + rows_in_block[None, :]  # (T, m) query rows
        col_visible = torch.ones(T, n, m, P, dtype=torch.bool, device=dev)
        c0 = min(settled[t0:t1])
        col_visible[..., c0:] = bc[:, :, None, c0:] <= (i[:, None, :, None] - w[None, :, None, None])
        real = slots[None, :] >= (w_max - 1) - m0s[t0:t1, None]  # (T, L): slot holds a key >= 0
        band_visible = band_base[None] & real[:, None, None, :]  # (T, n, m, L)
        # One fused SDPA call measured faster on CPU than separate matmul/mask/exp passes.
        # Every row sees its own key, so no row is fully masked.
        o = F.scaled_dot_product_attention(
            qs, keys, vals, attn_mask=torch.cat((col_visible, band_visible), dim=-1), scale=scale
        )
        out[:, r0 : t1 * m] = o.transpose(0, 1).reshape(n, T * m, D)
        t0 = t1
    return out[:, :S]
