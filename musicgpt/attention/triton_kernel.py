"""Fused Music-Transformer relative attention in Triton: no L x L tensor and no [L, R] logits.

FlexAttention (musicgpt.attention.flex) needs the relative logits R = q E_r^T as a real
[B, H, L, min(L, max_rel_dist)] tensor, saved for the backward, whose gradient it scatters with
atomic adds. Here every tile computes its share of them itself. A query tile (rows m0..m0+BM-1)
meets a key tile (columns n0..n0+BN-1) at distances m0 - n0 - (BN - 1) ... m0 - n0 + BM - 1, a
band of BM + BN - 1 consecutive rows of E_r. One tensor-core product q @ band^T gives every
(query, distance) pair of the tile, and a per-row shift picks the (query, key) ones:

    band rows:  d0  d0+1  d0+2  d0+3      qe = q @ band^T, BM = BN = 2, d0 = m0 - n0 - 1
    qe row a=0:  x0   x1    x2    -        S_rel[a, b] = qe[a, a - b + BN - 1]
    qe row a=1:  y0   y1    y2    -        S_rel = [[x1, x0],
                                                    [y2, y1]]

which is the skew of eager.relative_logits done inside a tile (`tl.gather`). The bands of
neighbouring key tiles overlap by half, so while a query tile walks its keys (forward, and the
dq / dE_r pass of the backward) each key tile multiplies only BLOCK new rows; only the dk / dv
pass, where the query tile changes, multiplies whole bands. The backward runs the shift the
other way on dS and adds `dS_band^T @ q` into dE_r, a [BLOCK, D] block per tile.
Tile products per (query tile, key tile): forward 3, dq / dE_r pass 6, dk / dv pass 6: 15, where
flash attention needs 7 and exact relative attention at least 11. ONE_PASS_BACKWARD drops the
dk / dv pass: the dq / dE_r pass adds each tile's dk and dv too (2 products, 2 atomic adds), 11.
Distances past max_rel_dist - 1 read (and train) the last row, as in the eager path; a tile whose
every distance is past it (most tiles of a sequence much longer than max_rel_dist) needs no band:
its relative term is q_i . E_r[R - 1] for every key, one dot product per query row, and its
gradient a row sum of dS.

It keeps for the backward what flash attention keeps: q, k and v (read in place, e.g. as views
of one qkv projection), the output (written token-major, so the projection after it reads a
view), one log-sum-exp per row, and E_r.

Causal attention only (no sliding window, no dropout); CUDA, or Triton's interpreter on CPU
(TRITON_INTERPRET=1), which is what the CPU tests run; scripts/compile_triton_kernels.py
compiles the kernels for a GPU without one and reports their registers and spills.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = tl = None

BLOCK = 64  # query and key tile size on the GPU, chosen by register spills (see num_warps_for)
# Backward in one pass over query tiles, dk and dv added atomically per tile (8 backward tile
# products per pair instead of 12, and 2 more atomic [BLOCK, D] adds), or in two (a dq / dE_r
# pass, then a dk / dv pass over key tiles, no atomics for them). scripts/gpu_check.sh times both.
ONE_PASS_BACKWARD = False


def available() -> bool:
    """Whether this installation can run the kernels (Triton with tl.gather, torch custom ops)."""
    return triton is not None and hasattr(tl, "gather") and hasattr(torch.library, "custom_op")


if triton is not None:

    @triton.jit
    def _band(e_base, d_start, R, D: tl.constexpr, BLOCK: tl.constexpr):
        """Rows of E_r for distances d_start .. d_start + BLOCK - 1 (clamped to 0 .. R - 1)."""
        rows = tl.minimum(tl.maximum(d_start + tl.arange(0, BLOCK), 0), R - 1)
        return rows, tl.load(e_base + rows[:, None] * D + tl.arange(0, D)[None, :])

    @triton.jit
    def _shift(qe_lo, qe_hi, BLOCK: tl.constexpr):
        """S_rel[a, b] = qe[a, a - b + BLOCK - 1] of a tile whose band products are split in a
        low half (columns 0 .. BLOCK - 1) and a high half: the skew, one gather per half
        (joining the halves into one [BLOCK, 2 BLOCK] gather spilled more registers)."""
        a = tl.arange(0, BLOCK)
        c = a[:, None] - a[None, :] + BLOCK - 1  # band column of (query a, key b)
        return tl.where(c < BLOCK, tl.gather(qe_lo, tl.minimum(c, BLOCK - 1), 1),
                        tl.gather(qe_hi, tl.maximum(c - BLOCK, 0), 1))

    @triton.jit
    def _unshift(ds, BLOCK: tl.constexpr):
        """dS moved back to the band's distances: (low half, high half), each [BLOCK, BLOCK]."""
        a = tl.arange(0, BLOCK)[:, None]
        w = tl.arange(0, BLOCK)[None, :]
        b_lo = a - w + BLOCK - 1  # key column of (query a, low band row w); never negative
        b_hi = a - w - 1  # ... of (query a, high band row w); never past the tile
        lo = tl.where(b_lo < BLOCK, tl.gather(ds, tl.minimum(b_lo, BLOCK - 1), 1), 0.0)
        hi = tl.where(b_hi >= 0, tl.gather(ds, tl.maximum(b_hi, 0), 1), 0.0)
        return lo, hi

    @triton.jit
    def _head(bh, H, sb, sh):
        """Offset of program bh's (batch bh // H, head bh % H) rows in a view with these strides."""
        return (bh // H).to(tl.int64) * sb + (bh % H).to(tl.int64) * sh

    @triton.jit
    def _load_rows(ptr, rows, T, stride, D: tl.constexpr):
        """Rows `rows` (`stride` apart) of a [T, D] matrix at `ptr`; rows past T read as zeros."""
        return tl.load(ptr + rows[:, None] * stride + tl.arange(0, D)[None, :],
                       mask=rows[:, None] < T, other=0.0)

    @triton.jit
    def _first_high_half(q, e_base, m0, far_end, R, D: tl.constexpr, BLOCK: tl.constexpr,
                         PREC: tl.constexpr):
        """q against the high half of the first near tile's band (distances m0 - far_end + 1
        ...), which no earlier tile computed."""
        _, e_hi = _band(e_base, m0 - far_end + 1, R, D, BLOCK)
        return tl.dot(q, tl.trans(e_hi), input_precision=PREC)

    @triton.jit
    def _near_logits(q, k, qe_hi, e_base, m0, n0, R, D: tl.constexpr, BLOCK: tl.constexpr,
                     PREC: tl.constexpr):
        """Unscaled q k^T + S_rel of a near tile whose band's high half `qe_hi` the previous key
        tile computed; also the new low half's product, the next tile's high half."""
        _, e_lo = _band(e_base, m0 - n0 - (BLOCK - 1), R, D, BLOCK)
        qe_lo = tl.dot(q, tl.trans(e_lo), input_precision=PREC)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) + _shift(qe_lo, qe_hi, BLOCK)
        return s, qe_lo

    @triton.jit
    def _flush_band(pending, e_rows, rows, q, de_base, scale, D: tl.constexpr,
                    PREC: tl.constexpr):
        """A band half whose dS is complete: add its dE_r rows; return its share of dq."""
        tl.atomic_add(de_base + rows[:, None] * D + tl.arange(0, D)[None, :],
                      tl.dot(tl.trans(pending.to(q.dtype)), q, input_precision=PREC) * scale)
        return tl.dot(pending.to(e_rows.dtype), e_rows, input_precision=PREC)

    @triton.jit
    def _clipped(q, e_base, R, D: tl.constexpr):
        """q_i . E_r[R - 1] per query: the whole relative term of a far tile, where every
        distance is past the last embedding (no band, no gather)."""
        last = tl.load(e_base + (R - 1) * D + tl.arange(0, D))
        return tl.sum(q.to(tl.float32) * last.to(tl.float32)[None, :], 1), last

    @triton.jit
    def _far_tiles_end(m0, R, BLOCK: tl.constexpr):
        """Key tiles n0 < this are far for query tile m0: m0 - (n0 + BLOCK - 1) >= R - 1."""
        return tl.maximum(m0 - R + 2, 0) // BLOCK * BLOCK

    @triton.jit
    def _softmax_step(s, v, m_i, l_i, acc, PREC: tl.constexpr):
        """One key tile of the online softmax (flash attention's running max and sum)."""
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        return m_new, l_i * alpha + tl.sum(p, 1), acc

    @triton.jit
    def forward_kernel(Q, K, V, E, O, LSE, H, T, R, scale, sqb, sqh, sqt, sob, soh, sot,
                 D: tl.constexpr, BLOCK: tl.constexpr, PREC: tl.constexpr):
        """Q, K, V share strides (sqb, sqh, sqt), O has its own (views of [B, H, T, D])."""
        start_m, bh = tl.program_id(0), tl.program_id(1)
        base = _head(bh, H, sqb, sqh)
        e_base = E + (bh % H) * R * D
        m0 = start_m * BLOCK
        offs_m = m0 + tl.arange(0, BLOCK)
        offs_n = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, D)
        q = _load_rows(Q + base, offs_m, T, sqt, D)
        m_i = tl.full([BLOCK], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK], tl.float32)
        acc = tl.zeros([BLOCK, D], tl.float32)
        far_end = _far_tiles_end(m0, R, BLOCK)
        clipped, last = _clipped(q, e_base, R, D)
        for n0 in range(0, far_end, BLOCK):  # far tiles: every key visible, S_rel = clipped
            cols = n0 + offs_n
            k, v = _load_rows(K + base, cols, T, sqt, D), _load_rows(V + base, cols, T, sqt, D)
            s = (tl.dot(q, tl.trans(k), input_precision=PREC) + clipped[:, None]) * scale
            m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, PREC)
        # Near tiles, keys left to right: each tile's band is the next one's high half, so
        # only its low half (distances m0 - n0 - BLOCK + 1 ...) is a new product.
        qe_hi = _first_high_half(q, e_base, m0, far_end, R, D, BLOCK, PREC)
        for n0 in range(far_end, tl.minimum(m0 + BLOCK, T), BLOCK):
            cols = n0 + offs_n
            k, v = _load_rows(K + base, cols, T, sqt, D), _load_rows(V + base, cols, T, sqt, D)
            s, qe_hi = _near_logits(q, k, qe_hi, e_base, m0, n0, R, D, BLOCK, PREC)
            s = tl.where((offs_m[:, None] >= cols[None, :]) & (cols[None, :] < T), s * scale,
                         float("-inf"))
            m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, PREC)
        acc = acc / l_i[:, None]
        row_ok = offs_m < T
        tl.store(O + _head(bh, H, sob, soh) + offs_m[:, None] * sot + offs_d[None, :],
                 acc.to(O.dtype.element_ty), mask=row_ok[:, None])
        tl.store(LSE + bh.to(tl.int64) * T + offs_m, m_i + tl.log(l_i), mask=row_ok)

    @triton.jit
    def _probs_and_grad(s, visible, v, do, lse, delta, scale, PREC: tl.constexpr):
        """Recomputed probabilities P of a tile from its unscaled logits, and dS, the gradient
        of the scaled logits."""
        p = tl.where(visible, tl.exp(s * scale - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        return p, p * (dp - delta[:, None])

    @triton.jit
    def _add_kv_grads(DK, DV, cols, T, p, ds, q, do, D: tl.constexpr, PREC: tl.constexpr):
        """One-pass backward: this tile's share of dk (unscaled) and dv, added atomically."""
        at = cols[:, None] * D + tl.arange(0, D)[None, :]
        ok = cols[:, None] < T
        tl.atomic_add(DK + at, tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC), mask=ok)
        tl.atomic_add(DV + at, tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC), mask=ok)

    @triton.jit
    def backward_dq_de_kernel(Q, K, V, DO, LSE, DELTA, E, DQ, DE, DK, DV, H, T, R, scale,
                        sqb, sqh, sqt, sob, soh, sot,
                        D: tl.constexpr, BLOCK: tl.constexpr, PREC: tl.constexpr,
                        KV: tl.constexpr):
        """dq for one query tile over its key tiles; each tile's dE_r band added atomically.
        With KV, also every tile's dk and dv (atomically, into fp32 DK, DV): one pass."""
        start_m, bh = tl.program_id(0), tl.program_id(1)
        base = _head(bh, H, sqb, sqh)
        grads = bh.to(tl.int64) * T * D  # DQ, DK, DV are contiguous [B, H, T, D]
        e_base = E + (bh % H) * R * D
        de_base = DE + (bh % H) * R * D
        m0 = start_m * BLOCK
        offs_m = m0 + tl.arange(0, BLOCK)
        offs_n = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, D)
        row_ok = offs_m < T
        q = _load_rows(Q + base, offs_m, T, sqt, D)
        do = _load_rows(DO + _head(bh, H, sob, soh), offs_m, T, sot, D)
        lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK, D], tl.float32)
        far_end = _far_tiles_end(m0, R, BLOCK)
        clipped, last = _clipped(q, e_base, R, D)
        far_ds = tl.zeros([BLOCK], tl.float32)  # sum of dS over far keys: the clipped term's
        for n0 in range(0, far_end, BLOCK):
            cols = n0 + offs_n
            k, v = _load_rows(K + base, cols, T, sqt, D), _load_rows(V + base, cols, T, sqt, D)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) + clipped[:, None]
            p, ds = _probs_and_grad(s, row_ok[:, None], v, do, lse, delta, scale, PREC)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
            far_ds += tl.sum(ds, 1)
            if KV:
                _add_kv_grads(DK + grads, DV + grads, cols, T, p, ds, q, do, D, PREC)
        # Near tiles as in the forward. The high half of a tile's band is the low half of the
        # previous one: its dS (`pending`) is complete once this tile's is added, and goes into
        # dq and dE_r in one product each. Only that dS is carried from tile to tile, in the
        # inputs' dtype as those products take it; its E_r rows are loaded again (registers
        # are what this kernel runs short of: scripts/compile_triton_kernels.py).
        qe_hi = _first_high_half(q, e_base, m0, far_end, R, D, BLOCK, PREC)
        pending = tl.zeros([BLOCK, BLOCK], q.dtype)
        for n0 in range(far_end, tl.minimum(m0 + BLOCK, T), BLOCK):
            cols = n0 + offs_n
            k, v = _load_rows(K + base, cols, T, sqt, D), _load_rows(V + base, cols, T, sqt, D)
            s, qe_hi = _near_logits(q, k, qe_hi, e_base, m0, n0, R, D, BLOCK, PREC)
            visible = (offs_m[:, None] >= cols[None, :]) & (cols[None, :] < T) & row_ok[:, None]
            p, ds = _probs_and_grad(s, visible, v, do, lse, delta, scale, PREC)
            ds = ds.to(q.dtype)  # as every product below takes it: half the registers in bf16
            dq += tl.dot(ds, k, input_precision=PREC)
            if KV:
                _add_kv_grads(DK + grads, DV + grads, cols, T, p, ds, q, do, D, PREC)
            ds_lo, ds_hi = _unshift(ds, BLOCK)
            rows_hi, e_hi = _band(e_base, m0 - n0 + 1, R, D, BLOCK)  # the previous low half
            dq += _flush_band(pending.to(tl.float32) + ds_hi.to(tl.float32), e_hi, rows_hi, q,
                              de_base, scale, D, PREC)
            pending = ds_lo
        rows_lo, e_lo = _band(e_base, -(BLOCK - 1), R, D, BLOCK)  # the diagonal tile's low half
        dq += _flush_band(pending.to(tl.float32), e_lo, rows_lo, q, de_base, scale, D, PREC)
        dq += far_ds[:, None] * last.to(tl.float32)[None, :]
        if far_end > 0:
            tl.atomic_add(de_base + (R - 1) * D + offs_d,
                          tl.sum(far_ds[:, None] * q.to(tl.float32), 0) * scale)
        tl.store(DQ + grads + offs_m[:, None] * D + offs_d[None, :],
                 (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def backward_dk_dv_kernel(Q, K, V, DO, LSE, DELTA, E, DK, DV, H, T, R, scale,
                        sqb, sqh, sqt, sob, soh, sot,
                        D: tl.constexpr, BLOCK: tl.constexpr, PREC: tl.constexpr):
        """dk and dv for one key tile over the query tiles that see it."""
        start_n, bh = tl.program_id(0), tl.program_id(1)
        base = _head(bh, H, sqb, sqh)
        do_base = DO + _head(bh, H, sob, soh)
        grads = bh.to(tl.int64) * T * D
        e_base = E + (bh % H) * R * D
        n0 = start_n * BLOCK
        cols = n0 + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, D)
        col_ok = cols < T
        k, v = _load_rows(K + base, cols, T, sqt, D), _load_rows(V + base, cols, T, sqt, D)
        dk = tl.zeros([BLOCK, D], tl.float32)
        dv = tl.zeros([BLOCK, D], tl.float32)
        near_end = (n0 + R + 2 * BLOCK - 3) // BLOCK * BLOCK  # first query tile that is far
        for m0 in range(n0, T, BLOCK):
            offs_m = m0 + tl.arange(0, BLOCK)
            row_ok = offs_m < T
            q, do = _load_rows(Q + base, offs_m, T, sqt, D), _load_rows(do_base, offs_m, T, sot, D)
            lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
            if m0 >= near_end:
                clipped, last = _clipped(q, e_base, R, D)
                s = tl.dot(q, tl.trans(k), input_precision=PREC) + clipped[:, None]
                visible = row_ok[:, None] & col_ok[None, :]
            else:
                # q changes from tile to tile here, so the whole band is multiplied each time.
                _, e_lo = _band(e_base, m0 - n0 - (BLOCK - 1), R, D, BLOCK)
                _, e_hi = _band(e_base, m0 - n0 + 1, R, D, BLOCK)
                s = tl.dot(q, tl.trans(k), input_precision=PREC) + _shift(
                    tl.dot(q, tl.trans(e_lo), input_precision=PREC),
                    tl.dot(q, tl.trans(e_hi), input_precision=PREC), BLOCK)
                visible = (offs_m[:, None] >= cols[None, :]) & col_ok[None, :] & row_ok[:, None]
            p, ds = _probs_and_grad(s, visible, v, do, lse, delta, scale, PREC)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
        tl.store(DK + grads + cols[:, None] * D + offs_d[None, :],
                 (dk * scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
        tl.store(DV + grads + cols[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty),
                 mask=col_ok[:, None])


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get fp32 products (tl.dot would round them to TF32); bf16/fp16 use tensor cores.
    return "ieee" if dtype == torch.float32 else "tf32"


def num_warps_for(block: int) -> int:
    """Warps per program for a tile size, chosen by register spills as compiled for sm_90
    (scripts/compile_triton_kernels.py; figures in BENCHMARKS.md): at block 64, 4 warps spill in
    every kernel and 8 far less, while 16 would cap a thread at 128 registers."""
    return 8 if block >= 64 else 4


def _head_major(q: Tensor) -> Tensor:
    """An empty [B, H, T, D] tensor laid out as [B, T, H, D], as the projection after attention
    reads it (its transpose is then a view, not a copy), like flash attention's output."""
    B, H, T, D = q.shape
    return q.new_empty(B, T, H, D).transpose(1, 2)


def _grads(q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(q.new_empty(q.shape) for _ in range(3))  # contiguous, whatever q's layout


# The kernels enter PyTorch as two custom operators with shape-only "fake" versions, so that
# torch.compile (fullgraph) and meta / fake-tensor runs see opaque ops instead of tracing into
# Triton's launcher, and autograd knows the backward operator. q, k and v are read in place
# (e.g. as views of one qkv projection, sharing strides); the output is written token-major.
if triton is not None and hasattr(torch.library, "custom_op"):

    @torch.library.custom_op("musicgpt::relative_attention", mutates_args=())
    def _attention_op(q: Tensor, k: Tensor, v: Tensor, e: Tensor, block: int
                      ) -> tuple[Tensor, Tensor]:
        B, H, T, D = q.shape
        o = _head_major(q)
        lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
        forward_kernel[(triton.cdiv(T, block), B * H)](
            q, k, v, e.to(q.dtype), o, lse, H, T, e.size(1), D ** -0.5, *q.stride()[:3],
            *o.stride()[:3], D=D, BLOCK=block, PREC=_precision(q.dtype), num_warps=num_warps_for(block))
        return o, lse

    @_attention_op.register_fake
    def _(q, k, v, e, block):
        B, H, T, _ = q.shape
        return _head_major(q), q.new_empty(B, H, T, dtype=torch.float32)

    @torch.library.custom_op("musicgpt::relative_attention_backward", mutates_args=())
    def _attention_backward_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, e: Tensor, o: Tensor,
                               lse: Tensor, block: int
                               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        B, H, T, D = q.shape
        if do.stride() != o.stride():  # the kernels read dO in the output's layout
            do = torch.empty_like(o).copy_(do)
        de_dtype = e.dtype
        delta = (do.float() * o.float()).sum(-1)  # rowsum(dO * O), the softmax backward's term
        dq, dk, dv = _grads(q)  # the layout the fake version promises
        de = torch.zeros(e.shape, device=e.device, dtype=torch.float32)
        e = e.to(q.dtype)  # tl.dot wants both operands in one dtype; dE_r stays in fp32
        grid = (triton.cdiv(T, block), B * H)
        args = (H, T, e.size(1), D ** -0.5, *q.stride()[:3], *o.stride()[:3])
        meta = dict(D=D, BLOCK=block, PREC=_precision(q.dtype), num_warps=num_warps_for(block))
        if ONE_PASS_BACKWARD:  # dk, dv added per tile into fp32 buffers by the dq / dE_r pass
            dk32, dv32 = (torch.zeros(q.shape, device=q.device, dtype=torch.float32)
                          for _ in range(2))
            backward_dq_de_kernel[grid](q, k, v, do, lse, delta, e, dq, de, dk32, dv32, *args,
                                  KV=True, **meta)
            dk.copy_(dk32 * D ** -0.5)
            dv.copy_(dv32)
        else:
            backward_dq_de_kernel[grid](q, k, v, do, lse, delta, e, dq, de, dk, dv, *args, KV=False,
                                  **meta)
            backward_dk_dv_kernel[grid](q, k, v, do, lse, delta, e, dk, dv, *args, **meta)
        return dq, dk, dv, de.to(de_dtype)

    @_attention_backward_op.register_fake
    def _(do, q, k, v, e, o, lse, block):
        return *_grads(q), torch.empty_like(e)

    def _setup_context(ctx, inputs, output):
        q, k, v, e, block = inputs
        ctx.save_for_backward(q, k, v, e, *output)  # what flash saves, plus E_r: no L x L tensor
        ctx.block = block

    def _backward(ctx, do, _dlse):
        q, k, v, e, o, lse = ctx.saved_tensors
        return (*_attention_backward_op(do, q, k, v, e, o, lse, ctx.block), None)

    _attention_op.register_autograd(_backward, setup_context=_setup_context)


def relative_triton_attention(q: Tensor, k: Tensor, v: Tensor, rel_emb: Tensor,
                              block: int | None = None) -> Tensor:
    """Causal softmax((q k^T + S_rel) / sqrt(D)) v with S_rel[i, j] = q_i . E_r[min(i - j, R - 1)].

    q, k, v: [B, H, T, D]; rel_emb: [H, R, D]. Differentiable in all four; D and `block` must be
    powers of two of at least 16 (block: tile size, default the module's BLOCK).
    """
    if not available():
        raise RuntimeError("the fused relative-attention kernel needs Triton >= 3.2 (tl.gather) "
                           "and torch >= 2.4 (torch.library.custom_op)")
    # The kernels take one set of strides for q, k and v, and unit stride along D. E_r goes in
    # as it is (fp32 under autocast): its gradient, summed in fp32, comes back in fp32.
    if not (q.stride() == k.stride() == v.stride() and q.stride(-1) == 1):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _attention_op(q, k, v, rel_emb.contiguous(), block or BLOCK)[0]
