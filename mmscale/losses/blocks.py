"""The logits one tile x tile block at a time: the autograd functions behind `loss.tile` and the
ring forms, each block recomputed from the embeddings in the backward, so no B x B matrix (of
logits or of positives) is ever held.

Several positives per row (loss.positives) enter as `Positives`: the keys and sample numbers of
the rows and of the columns, from which each block's pairs of other positives (same key, not the
same sample) are compared where the block is, never stored. With `Positives` an InfoNCE function
also returns c_i = sum of S_ij over row i's other positives (linear in S: its gradient is the
block's mask); a SigLIP sum subtracts S_ij + bias over them (softplus(x) - x = softplus(-x), the
z_ij = +1 terms). With every key unique the masks are empty and every value and gradient is the
one computed without them, bit for bit: the extra terms only ever add exact zeros.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..dist import rank_and_world, ring_pass


class Positives(NamedTuple):
    """The pairs (row i, column j) that are positives besides a row's own pair: same key, another
    sample. ids number the samples of the global batch, so a row meets itself only where its id does."""
    row_keys: torch.Tensor
    row_ids: torch.Tensor
    col_keys: torch.Tensor
    col_ids: torch.Tensor

    def mask(self, i: slice = slice(None), j: slice = slice(None)) -> torch.Tensor:
        """[rows i, columns j] booleans: the block's other positives."""
        return (self.row_keys[i, None] == self.col_keys[None, j]) & (self.row_ids[i, None] != self.col_ids[None, j])

    def rows(self, i: slice) -> "Positives":
        return self._replace(row_keys=self.row_keys[i], row_ids=self.row_ids[i])

    def columns(self, j: slice) -> "Positives":
        return self._replace(col_keys=self.col_keys[j], col_ids=self.col_ids[j])


def _blocks(n: int, tile: int) -> list[slice]:
    return [slice(i, min(i + tile, n)) for i in range(0, n, tile)]


class _TiledLogSumExp(torch.autograd.Function):
    """The row log-sum-exps of S = scale * a @ b.T ([m]), and with `columns` its column
    log-sum-exps too ([k]), computed one tile x tile block of S at a time; with `pos`, followed by
    the rows' sums of S over their other positives ([m]) and with `columns` the columns' ([k]).

    Forward: per block, logaddexp of the running value and the block's own log-sum-exp (an online
    log-sum-exp: exact, and never more than one block of S). Backward: with g the incoming
    gradient, dS_ij = g_i softmax_j(S_i.) + g'_j softmax_i(S_.j) (+ (h_i + h'_j) M_ij, M the
    block's other positives) is formed block by block from the recomputed block and the saved
    log-sum-exps, and pushed into a, b and scale."""

    @staticmethod
    def forward(ctx, a, b, scale, tile: int, columns: bool, pos: Positives | None):
        m, k = a.shape[0], b.shape[0]
        rows = a.new_full((m,), -math.inf)
        cols = a.new_full((k,), -math.inf) if columns else a.new_empty(0)
        hit_rows = a.new_zeros(m) if pos is not None else a.new_empty(0)
        hit_cols = a.new_zeros(k) if pos is not None and columns else a.new_empty(0)
        for i in _blocks(m, tile):
            for j in _blocks(k, tile):
                s = scale * (a[i] @ b[j].T)
                rows[i] = torch.logaddexp(rows[i], s.logsumexp(1))
                if columns:
                    cols[j] = torch.logaddexp(cols[j], s.logsumexp(0))
                if pos is not None:
                    hit = s * pos.mask(i, j)
                    hit_rows[i] += hit.sum(1)
                    if columns:
                        hit_cols[j] += hit.sum(0)
        ctx.tile, ctx.columns, ctx.pos = tile, columns, pos
        ctx.save_for_backward(a, b, scale, rows, cols)
        return torch.cat([rows, cols, hit_rows, hit_cols])

    @staticmethod
    def backward(ctx, grad):
        a, b, scale, rows, cols = ctx.saved_tensors
        m, k, pos = a.shape[0], b.shape[0], ctx.pos
        g_rows, g_cols, g_hit_rows, g_hit_cols = grad.split([m, cols.shape[0], m if pos is not None else 0,
                                                            k if pos is not None and ctx.columns else 0])
        da, db, dscale = torch.zeros_like(a), torch.zeros_like(b), torch.zeros_like(scale)
        for i in _blocks(m, ctx.tile):
            for j in _blocks(k, ctx.tile):
                dots = a[i] @ b[j].T
                s = scale * dots
                ds = g_rows[i, None] * (s - rows[i, None]).exp()
                if ctx.columns:
                    ds += g_cols[None, j] * (s - cols[None, j]).exp()
                if pos is not None:
                    g_hit = g_hit_rows[i, None] + g_hit_cols[None, j] if ctx.columns else g_hit_rows[i, None]
                    ds += pos.mask(i, j) * g_hit
                da[i] += scale * (ds @ b[j])
                db[j] += scale * (ds.T @ a[i])
                dscale += (ds * dots).sum()
        return da, db, dscale, None, None, None


# One block of pairs, a's rows against b's, in tiles, without autograd: the value and the
# gradients (added into da, db) of either the rows' log-sum-exps ("lse"; with pos followed by the
# rows' sums of S over their other positives) or the sum of softplus(S + bias) ("softplus",
# SigLIP; with pos less the sum of S + bias over the other positives). The tiled and ring
# functions below are built on these.

def _block_value(kind: str, a, b, scale, bias, tile: int, pos: Positives | None = None) -> torch.Tensor:
    m = a.shape[0]
    out = a.new_full((m,), -math.inf) if kind == "lse" else a.new_zeros(())
    hits = a.new_zeros(m) if kind == "lse" and pos is not None else None
    for i in _blocks(m, tile):
        for j in _blocks(b.shape[0], tile):
            s = scale * (a[i] @ b[j].T)
            if kind == "lse":
                out[i] = torch.logaddexp(out[i], s.logsumexp(1))
                if pos is not None:
                    hits[i] += (s * pos.mask(i, j)).sum(1)
            else:
                out += F.softplus(s + bias).sum()
                if pos is not None:
                    out -= ((s + bias) * pos.mask(i, j)).sum()
    return out if hits is None else torch.cat([out, hits])


def _block_grads(kind: str, a, b, scale, bias, value, grad, tile: int, da, db, pos: Positives | None = None) -> tuple:
    """Adds the block's gradients into da and db; returns those of scale and bias. value: the
    rows' log-sum-exps (lse); grad: the gradient of _block_value's output."""
    dscale, dbias = torch.zeros_like(scale), torch.zeros_like(bias)
    m = a.shape[0]
    for i in _blocks(m, tile):
        for j in _blocks(b.shape[0], tile):
            dots = a[i] @ b[j].T
            if kind == "lse":  # d logsumexp_j(S_ij) / dS_ij = softmax_j(S_i.)
                ds = grad[i, None] * (scale * dots - value[i, None]).exp()
                if pos is not None:
                    ds += pos.mask(i, j) * grad[m:][i, None]
            else:
                ds = grad * torch.sigmoid(scale * dots + bias)
                if pos is not None:
                    ds -= grad * pos.mask(i, j)
                dbias += ds.sum()
            da[i] += scale * (ds @ b[j])
            db[j] += scale * (ds.T @ a[i])
            dscale += (ds * dots).sum()
    return dscale, dbias


class _TiledSoftplusSum(torch.autograd.Function):
    """sum_ij softplus(scale * a_i . b_j + bias), one tile x tile block at a time (SigLIP's sum
    over all pairs taken as negatives; with pos, less S_ij + bias over the other positives); the
    backward recomputes each block, dS = sigmoid(S) (- M)."""

    @staticmethod
    def forward(ctx, a, b, scale, bias, tile: int, pos: Positives | None):
        ctx.tile, ctx.pos = tile, pos
        ctx.save_for_backward(a, b, scale, bias)
        return _block_value("softplus", a, b, scale, bias, tile, pos)

    @staticmethod
    def backward(ctx, grad):
        a, b, scale, bias = ctx.saved_tensors
        da, db = torch.zeros_like(a), torch.zeros_like(b)
        dscale, dbias = _block_grads("softplus", a, b, scale, bias, None, grad, ctx.tile, da, db, ctx.pos)
        return da, db, dscale, dbias, None, None


def _accumulate(kind: str, acc, part, m: int):
    """The running value of the blocks seen so far and one more block's."""
    if acc is None:
        return part
    if kind != "lse":
        return acc + part
    if acc.shape[0] == m:
        return torch.logaddexp(acc, part)
    return torch.cat([torch.logaddexp(acc[:m], part[:m]), acc[m:] + part[m:]])


class _RingRows(torch.autograd.Function):
    """This rank's rows a against every rank's columns c, with only one other rank's block of c
    held at a time: the blocks travel round the ring (dist.ring_pass), and in the backward they
    travel round again with a gradient accumulator each rank adds its share to, then go home.
    kind "lse": the rows' log-sum-exps over all columns ([n]); "softplus": SigLIP's
    sum_ij softplus(S_ij + bias) (a scalar). pos: this rank's rows against every rank's columns
    (the keys are B integers, gathered; the block from rank r is pos.columns(r's rows)). W - 1
    passes forward, W backward, each block in tiles; nothing gathered, nothing saved but this
    rank's own a, c and the result."""

    @staticmethod
    def forward(ctx, kind: str, a, c, scale, bias, tile: int, pos: Positives | None):
        rank, world = rank_and_world()
        tile = tile or max(a.shape[0], c.shape[0])
        block, acc = c, None
        for step in range(world):
            if step:
                block = ring_pass(block)
            part = _block_value(kind, a, block, scale, bias, tile, columns_of(pos, (rank - step) % world, c.shape[0]))
            acc = _accumulate(kind, acc, part, a.shape[0])
        ctx.kind, ctx.tile, ctx.pos = kind, tile, pos
        ctx.save_for_backward(a, c, scale, bias, acc)
        return acc

    @staticmethod
    def backward(ctx, grad):
        a, c, scale, bias, acc = ctx.saved_tensors
        rank, world = rank_and_world()
        da = torch.zeros_like(a)
        dscale, dbias = torch.zeros_like(scale), torch.zeros_like(bias)
        block, dblock = c, torch.zeros_like(c)
        for step in range(world):
            if step:  # rank r now holds rank r - step's block and the shares of ranks r - step .. r - 1
                both = ring_pass(torch.cat([block, dblock]))
                block, dblock = both[:c.shape[0]], both[c.shape[0]:]
            pos = columns_of(ctx.pos, (rank - step) % world, c.shape[0])
            g_scale, g_bias = _block_grads(ctx.kind, a, block, scale, bias, acc, grad, ctx.tile, da, dblock, pos)
            dscale, dbias = dscale + g_scale, dbias + g_bias
        # the block last held is rank r + 1's, with every rank's share: one more pass takes each home
        return None, da, ring_pass(dblock), dscale, dbias, None, None


def columns_of(pos: Positives | None, rank: int, n: int) -> Positives | None:
    """pos against the n columns that rank `rank` holds (None stays None)."""
    return None if pos is None else pos.columns(slice(rank * n, (rank + 1) * n))


def tiled_logsumexp(a, b, scale, tile: int, columns: bool, pos: Positives | None = None) -> list[torch.Tensor]:
    """[row log-sum-exps of scale * a @ b.T, (column ones), (rows' sums over their other
    positives, (columns' sums))], from tile x tile blocks."""
    out = _TiledLogSumExp.apply(a, b, scale, tile, columns, pos)
    m, k = a.shape[0], b.shape[0]
    sizes = [m] + [k] * columns + ([m] + [k] * columns if pos is not None else [])
    return list(out.split(sizes))


def softplus_sum(a, b, scale, bias, tile: int, pos: Positives | None = None) -> torch.Tensor:
    """sum_ij softplus(scale * a_i . b_j + bias), less S_ij + bias over the other positives:
    whole (tile 0) or tiled."""
    if tile:
        return _TiledSoftplusSum.apply(a, b, scale, bias, tile, pos)
    x = scale * a @ b.T + bias
    total = F.softplus(x).sum()
    return total if pos is None else total - (x * pos.mask()).sum()


def ring_rows(kind: str, a, c, scale, bias, tile: int, pos: Positives | None = None) -> torch.Tensor:
    return _RingRows.apply(kind, a, c, scale, bias, tile, pos)
