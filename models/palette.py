"""Palette maths: k-means lookup tables shared by every 16 output channels, as AFM ships its
on-device model (Gunter et al. 2024, arXiv:2407.21075 §5: 2- and 4-bit palettes, "16 columns/
rows share the same quantization constants"); plain tensor functions, no modules. The layers
that run on palettes and the conversion of a whole model are ``models.palettize``.

``kmeans_tables``: a weighted 1-D k-means per group of ``group_size`` output channels (rows)
(weighted-quantile initialisation, Lloyd iterations on sorted points, then split/merge rounds
that bring it within a few percent of the exact 1-D optimum), in C one group at a time
(``palette.c`` through ``models.native``) or, where no compiler is, vectorised over every
group at once in torch, weighted by per-weight importance: the Fisher diagonal from
calibration gradients (SqueezeLLM, Kim et al. 2023, arXiv:2306.07629, and coremltools' SKM
weight k-means the same way), or without gradients the mean squared activation of each input
column (the diagonal of the layer's Hessian). ``assign_with_feedback``:
with the full input second moment H = E[x xᵀ], indices are chosen column by column and each
column's rounding error is pushed onto the columns not yet chosen, as GPTQ does for a uniform
grid (Frantar et al. 2022, arXiv:2210.17323; with codebooks, GPTVQ, van Baalen et al. 2024,
arXiv:2402.15319); the tables are then refitted to the targets the pass chose for, and the
pass repeated. ``pack_indices``/``unpack_indices`` (2 per byte at 4 bits, 4 at 2 bits),
``dequantize``, ``palette_bits`` (indices and fp16 tables counted exactly). A row count that
is not a multiple of ``group_size`` gives a short last group, compressed like the others.
"""

from __future__ import annotations

import ctypes
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from models import native

GROUP_SIZE = 16  # output channels per table: AFM (arXiv:2407.21075 §5), coremltools group_size
TABLE_DTYPE = torch.float16  # table entries are stored and counted as 16-bit floats
KMEANS_ITERS = 12  # Lloyd iterations; the weighted error changes < 0.1% after ~8 on SmolLM2
SPLIT_MERGE_ROUNDS = 8  # centroid moves per group after Lloyd (``_split_merge``)
FEEDBACK_ROUNDS = 1  # error feedback on SmolLM2 4-bit: KL 0.198 after 1 pass, 0.194 after 2
DAMP = 0.01  # GPTQ's dampening of H: 1% of its mean diagonal (arXiv:2210.17323 §4)
FEEDBACK_BLOCK = 128  # GPTQ's lazy-batch width: columns updated together (§4 "Lazy Batch")


class Palette(NamedTuple):
    """One matrix palettized: ``indices`` (N, K) uint8 into ``tables`` (ceil(N/g), 2**bits)."""

    indices: torch.Tensor
    tables: torch.Tensor


# ------------------------------------------------------------------------------ primitives
def row_groups(n_rows: int, group_size: int = GROUP_SIZE) -> int:
    """Number of tables for ``n_rows`` output channels: the last group may be short."""
    return -(-n_rows // group_size)


def palette_bits(shape: tuple[int, int], bits: int, group_size: int = GROUP_SIZE) -> int:
    """Exact storage of a palettized (N, K) matrix in bits: packed indices (each row padded to
    whole bytes, as ``pack_indices`` stores it) plus 16-bit table entries."""
    N, K = shape
    return 8 * N * math.ceil(K * bits / 8) + 16 * row_groups(N, group_size) * 2**bits


def bits_per_weight(shape: tuple[int, int], bits: int, group_size: int = GROUP_SIZE) -> float:
    return palette_bits(shape, bits, group_size) / (shape[0] * shape[1])


def pack_indices(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, K) uint8 indices < 2**bits -> (N, ceil(K·bits/8)) uint8, 8/bits per byte, the first
    index in the low bits. Rows are padded with zero indices to whole bytes."""
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"bits must divide 8, got {bits}")
    per = 8 // bits
    N, K = indices.shape
    padded = F.pad(indices.to(torch.uint8), (0, -K % per))  # (N, K')
    parts = padded.view(N, -1, per).to(torch.int32)  # (N, K'/per, per)
    shifts = torch.arange(per, dtype=torch.int32, device=indices.device) * bits
    return (parts << shifts).sum(-1).to(torch.uint8)  # (N, K'/per)


def unpack_indices(packed: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """Inverse of ``pack_indices``: (..., ceil(K·bits/8)) uint8 -> (..., K) uint8."""
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.uint8, device=packed.device) * bits
    parts = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)  # (..., bytes, per)
    return parts.flatten(-2)[..., :K]


def dequantize(
    indices: torch.Tensor,
    tables: torch.Tensor,
    group_size: int = GROUP_SIZE,
    *,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, K) matrix of table entries: row n reads table n // group_size. ``out`` (N·K
    elements of ``dtype``) is filled instead of allocating, for a caller's reused buffer."""
    N, K = indices.shape
    flat = tables.to(dtype).flatten()  # (G·C,)
    offsets = torch.arange(N, device=indices.device) // group_size * tables.shape[1]
    positions = (indices.long() + offsets[:, None]).view(-1)  # (N·K,)
    if out is None:
        return flat[positions].view(N, K)
    return torch.index_select(flat, 0, positions, out=out.view(-1)).view(N, K)


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K) -> (G, group_size·K), the last group padded with zero rows."""
    N, K = x.shape
    return F.pad(x, (0, 0, 0, -N % group_size)).reshape(-1, group_size * K)


def _assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid (G, P) for points x (G, P), centroids sorted along dim 1 (G, C): a
    batched binary search among the midpoints (faster here than C-1 comparison passes or an
    argmin over (G, P, C) distances)."""
    mids = (centroids[:, 1:] + centroids[:, :-1]) / 2  # (G, C-1)
    return torch.searchsorted(mids.contiguous(), x.contiguous())


class _Sorted(NamedTuple):
    """Each group's points in increasing order (G, P) and prefix sums (G, P+1), fp64, of
    their weights w, w·x and w·x²: any run of consecutive points, a cluster of a 1-D k-means,
    has its weight, mean and squared error in O(1)."""

    x: torch.Tensor
    W: torch.Tensor
    S: torch.Tensor
    Q: torch.Tensor

    @classmethod
    def of(cls, x: torch.Tensor, w: torch.Tensor) -> _Sorted:
        order = x.argsort(dim=1)
        xs, ws = x.gather(1, order).double(), w.gather(1, order).double()
        zero = torch.zeros(x.shape[0], 1, dtype=torch.float64)
        W, S, Q = (torch.cat([zero, t.cumsum(1)], 1) for t in (ws, ws * xs, ws * xs * xs))
        return cls(xs, W, S, Q)

    def bounds(self, c: torch.Tensor) -> torch.Tensor:
        """(G, C+1) start of each cluster of sorted centroids c (G, C), then P."""
        G, P = self.x.shape
        mids = ((c[:, 1:] + c[:, :-1]) / 2).contiguous()  # (G, C-1)
        inner = torch.searchsorted(self.x, mids)
        return torch.cat([inner.new_zeros(G, 1), inner, inner.new_full((G, 1), P)], 1)

    def sums(self, i: torch.Tensor, j: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Weight, w·x and w·x² of points i..j-1 (any matching shapes (G, n) of positions)."""
        return tuple(t.gather(1, j) - t.gather(1, i) for t in (self.W, self.S, self.Q))

    def error(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Weighted squared error of points i..j-1 around their weighted mean."""
        w, s, q = self.sums(i, j)
        return (q - s * s / w.clamp(min=1e-300)).clamp(min=0)

    def quantiles(self, C: int) -> torch.Tensor:
        """Centroids (G, C) at the weighted (c + 0.5)/C quantiles of each group's points:
        deterministic, and already close to the 1-D k-means optimum for bell-shaped weights."""
        targets = (torch.arange(C, dtype=self.W.dtype) + 0.5) / C * self.W[:, -1:]  # (G, C)
        # W[j] is the weight of the first j points: the point where it reaches a target
        at = (torch.searchsorted(self.W, targets) - 1).clamp(0, self.x.shape[1] - 1)
        return self.x.gather(1, at)

    def mean(self, i: torch.Tensor, j: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        w, s, _ = self.sums(i, j)
        return torch.where(w > 0, s / w.clamp(min=1e-300), fallback)


def _lloyd(points: _Sorted, c: torch.Tensor, iters: int) -> torch.Tensor:
    """Weighted Lloyd iterations on sorted centroids c (G, C) (fp64): each cluster is a run of
    sorted points, so an update costs a binary search per centroid, not a pass over the
    points. An empty cluster keeps its centroid (``_split_merge`` puts it to use)."""
    for _ in range(iters):
        b = points.bounds(c)
        c = points.mean(b[:, :-1], b[:, 1:], c).sort(dim=1).values
    return c


def _split_merge(points: _Sorted, c: torch.Tensor, rounds: int, iters: int) -> torch.Tensor:
    """Lloyd stops at a local optimum, and with heavy-tailed importance (squared gradients
    span 10+ orders of magnitude) a poor one: on SmolLM2's layers its weighted error was up to
    ~2x that of the exact 1-D optimum (Ckmeans.1d.dp, Wang & Song 2011; coremltools' SKM
    calls such an exact solver, ~0.1 s a group). Each round moves one centroid per group from
    where it is worth least to where it is worth most: the adjacent pair whose merge costs
    least becomes one cluster, the cluster whose best split (exact in 1-D: every cut of the
    run, by prefix sums) gains most becomes two, when the gain exceeds the cost; then Lloyd
    again. A few rounds bring the error within a few percent of the optimum."""
    G, P = points.x.shape
    rows = torch.arange(G)
    cuts = torch.arange(P + 1).expand(G, P + 1)
    for _ in range(rounds):
        b = points.bounds(c)  # (G, C+1)
        err = points.error(b[:, :-1], b[:, 1:])  # (G, C)
        merge = points.error(b[:, :-2], b[:, 2:]) - err[:, :-1] - err[:, 1:]  # (G, C-1)
        cost, m = merge.min(1)  # merge clusters m and m+1
        k = torch.searchsorted(b[:, 1:-1].contiguous(), cuts.contiguous(), right=True)  # (G, P+1)
        lo, hi = b.gather(1, k), b.gather(1, k + 1)  # the run each cut falls in
        gain = err.gather(1, k) - points.error(lo, cuts) - points.error(cuts, hi)
        gain = gain.masked_fill((k == m[:, None]) | (k == m[:, None] + 1), -torch.inf)
        best, cut = gain.max(1)
        move = best > cost * (1 + 1e-9)
        if not bool(move.any()):
            break
        cut, s = cut[:, None], k.gather(1, cut[:, None]).squeeze(1)
        lo, hi = lo.gather(1, cut), hi.gather(1, cut)
        new = c.clone()
        m0, m2 = b.gather(1, m[:, None]), b.gather(1, m[:, None] + 2)
        new[rows, m] = points.mean(m0, m2, c[:, :1])[:, 0]
        new[rows, m + 1] = points.mean(lo, cut, c[:, :1])[:, 0]
        new[rows, s] = points.mean(cut, hi, c[:, :1])[:, 0]
        c = _lloyd(points, torch.where(move[:, None], new, c).sort(dim=1).values, iters)
    return c


def kmeans_tables(
    w: torch.Tensor,
    bits: int,
    importance: torch.Tensor | None = None,
    *,
    group_size: int = GROUP_SIZE,
    iters: int = KMEANS_ITERS,
    rounds: int = SPLIT_MERGE_ROUNDS,
    native_kmeans: bool = True,
) -> Palette:
    """Weighted k-means of the (N, K) matrix ``w``, one table of 2**bits entries per group of
    ``group_size`` rows, minimising Σ importance[k] (w[n, k] - table[n // g][index])².

    importance: (K,) per input column (e.g. mean squared activation) or (N, K) per weight
    (e.g. squared gradients); uniform when None. Weighted-quantile initialisation, ``iters``
    Lloyd iterations, then up to ``rounds`` split/merge rounds (``_split_merge``).
    Deterministic: the same inputs give the same tables bit for bit (no sampling). Tables
    come back sorted, fp16; indices refer to the fp16 entries (nearest after rounding).
    ``native_kmeans``: the C kernel where it builds (~10x faster on one thread; a group stops
    its rounds once it stops moving, where the torch path moves all groups until none does,
    so the two agree to within rounding, not bit for bit); False: the torch path.
    """
    N, K = w.shape
    C = 2**bits
    imp = torch.ones(K) if importance is None else importance.detach().float().cpu()
    imp = imp.expand(N, K).clamp(min=0) + 1e-8 * imp.mean().clamp(min=1e-30)
    x = _grouped(w.detach().float().cpu(), group_size)  # (G, P)
    weights = _grouped(imp, group_size)  # (G, P): padded rows weigh 0
    c = _kmeans_native(x, weights, C, iters, rounds) if native_kmeans else None
    if c is None:
        points = _Sorted.of(x, weights)
        c = _lloyd(points, points.quantiles(C), iters)
        c = _split_merge(points, c, rounds, iters)
    tables = c.to(TABLE_DTYPE).sort(dim=1).values
    indices = _assign(x, tables.float()).view(-1, K)[:N]  # (N, K)
    return Palette(indices.to(torch.uint8), tables)


_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
SIGNATURES: native.Signatures = {  # palette.c's functions
    "kmeans1d": ([_ptr, _ptr, _i64, _i64, _int, _int, _int, _ptr, _int], _int),
    "feedback_block": ([_ptr, _ptr, _i64, _i64, _int, _ptr, _ptr, _ptr, _ptr, _int], None),
}


def _kernels() -> ctypes.CDLL | None:
    """``palette.c``, built on first use; None without a compiler."""
    return native.load("palette", SIGNATURES)


def _kmeans_native(
    x: torch.Tensor, weights: torch.Tensor, C: int, iters: int, rounds: int
) -> torch.Tensor | None:
    """``palette.c``'s centroids (G, C) fp64 of points x (G, P) weighted by ``weights``;
    None where the kernel does not build."""
    lib = _kernels()
    if lib is None:
        return None
    x, weights = x.float().contiguous(), weights.float().contiguous()
    G, P = x.shape
    out = torch.empty(G, C, dtype=torch.float64)
    threads = torch.get_num_threads()
    status = lib.kmeans1d(
        x.data_ptr(), weights.data_ptr(), G, P, C, iters, rounds, out.data_ptr(), threads
    )
    if status == -2:
        raise ValueError(f"kmeans1d fits 2 to 256 entries per table, not {C}")
    if status:
        raise MemoryError(f"kmeans1d could not allocate its buffers for {P} points")
    return out


def _feedback_pass(
    w: torch.Tensor, row_tables: torch.Tensor, hinv: torch.Tensor, native_loop: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One GPTQ pass over the columns of w (N, K) (already in processing order) with a
    per-row table row_tables (N, C), hinv the upper Cholesky factor of H⁻¹ (K, K). Inside
    each lazy block the column loop runs in C (``palette.c``'s ``feedback_block``, every row
    on its own) where it builds and ``native_loop``, else column by column in torch.

    Returns indices (N, K), the targets each column was rounded from (N, K) and each column's
    weight 1 / hinv[k, k]² in the objective (K,)."""
    W = w.clone()
    N, K = W.shape
    indices = torch.empty(N, K, dtype=torch.long)
    targets = torch.empty_like(W)
    lib = _kernels() if native_loop else None
    row_tables = row_tables.float().contiguous()
    for i1 in range(0, K, FEEDBACK_BLOCK):
        i2 = min(i1 + FEEDBACK_BLOCK, K)
        W1, H1 = W[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        E1 = torch.empty_like(W1)
        if lib is not None:
            H1 = H1.contiguous()
            idx, tgt = torch.empty(N, i2 - i1, dtype=torch.long), torch.empty_like(W1)
            lib.feedback_block(
                W1.data_ptr(), row_tables.data_ptr(), N, i2 - i1, row_tables.shape[1],
                H1.data_ptr(), idx.data_ptr(), tgt.data_ptr(), E1.data_ptr(),
                torch.get_num_threads(),
            )  # fmt: skip
            indices[:, i1:i2], targets[:, i1:i2] = idx, tgt
            W[:, i2:].sub_(E1 @ hinv[i1:i2, i2:])
            continue
        for i in range(i2 - i1):
            col = W1[:, i]
            j = (row_tables - col[:, None]).abs().argmin(dim=1)  # (N,)
            err = (col - row_tables.gather(1, j[:, None]).squeeze(1)) / H1[i, i]
            indices[:, i1 + i], targets[:, i1 + i] = j, col
            W1[:, i:].sub_(err[:, None] * H1[i, i:][None])
            E1[:, i] = err
        W[:, i2:].sub_(E1 @ hinv[i1:i2, i2:])
    return indices, targets, hinv.diagonal().pow(-2)


def flushing_denormals(fn, *args):
    """``fn(*args)`` with subnormal floats flushed to zero (torch's default is not to, and
    this function restores that). The error feedback multiplies ever smaller corrections into
    far columns; on SmolLM2's layers the subnormal results made a pass ~100x slower (13 ms
    against 0.1 ms a column) for no difference in the result above 1e-38. Squared gradients
    (``models.palettize.Calibration``) fall there too."""
    torch.set_flush_denormal(True)
    try:
        return fn(*args)
    finally:
        torch.set_flush_denormal(False)


def assign_with_feedback(
    w: torch.Tensor,
    palette: Palette,
    hessian: torch.Tensor,
    *,
    row_importance: torch.Tensor | None = None,
    group_size: int = GROUP_SIZE,
    rounds: int = FEEDBACK_ROUNDS,
    native_loop: bool = True,
) -> Palette:
    """Re-choose a palette's indices (and refit its tables) for the layer's output error
    tr(ΔW H ΔWᵀ) under the input second moment ``hessian`` (K, K), instead of each weight's
    own error: GPTQ's column-by-column rounding with error feedback, onto the tables instead
    of a uniform grid, columns in decreasing H[k, k] ("act order"). After each pass but the
    last, every table entry becomes the weighted mean of the targets rounded to it, each
    weighted by its column's GPTQ weight and its row's ``row_importance`` (N,) if given
    (rows are independent in the objective, so that weight only matters here).
    ``native_loop``: each block's column loop in C where it builds (``_feedback_pass``)."""
    N, K = w.shape
    H = hessian.detach().double().cpu().clone()
    dead = H.diagonal() <= 0
    H[dead, dead] = 1.0  # an input that never fires: its column's error costs nothing
    order = H.diagonal().argsort(descending=True)
    H = H[order][:, order]
    H.diagonal().add_(DAMP * H.diagonal().mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    hinv = hinv.float()
    W = w.detach().float().cpu()[:, order]
    W[:, dead[order]] = 0
    tables = palette.tables.float()
    groups = torch.arange(N) // group_size
    rows = torch.ones(N) if row_importance is None else row_importance.float().cpu()
    rows = rows.clamp(min=0) + 1e-8 * rows.mean().clamp(min=1e-30)
    for r in range(rounds):
        indices, targets, col_weight = flushing_denormals(
            _feedback_pass, W, tables[groups], hinv, native_loop
        )
        if r == rounds - 1:
            break
        slot = (indices + groups[:, None] * tables.shape[1]).view(-1)
        weight = (rows[:, None] * col_weight).reshape(-1)  # (N·K,)
        mass = torch.zeros(tables.numel()).index_add_(0, slot, weight)
        total = torch.zeros(tables.numel()).index_add_(0, slot, targets.reshape(-1) * weight)
        refit = (total / mass.clamp(min=1e-30)).view_as(tables)
        tables = torch.where(mass.view_as(tables) > 0, refit, tables)
        tables = tables.to(TABLE_DTYPE).float()  # choose indices against the stored entries
    inverse = order.argsort()
    return Palette(indices[:, inverse].to(torch.uint8), tables.to(TABLE_DTYPE))


def palettize_weight(
    w: torch.Tensor,
    bits: int,
    *,
    hessian: torch.Tensor | None = None,
    row_importance: torch.Tensor | None = None,
    fisher: torch.Tensor | None = None,
    group_size: int = GROUP_SIZE,
    feedback_rounds: int = FEEDBACK_ROUNDS,
) -> Palette:
    """k-means tables weighted by ``fisher`` (N, K), the per-weight Fisher diagonal, where
    given, else by the diagonal of ``hessian`` (K,) times ``row_importance`` (N,); then,
    with a ``hessian``, indices (and, with more than one round, tables) re-chosen for the
    layer's output error (``assign_with_feedback``)."""
    importance = None if hessian is None else hessian.diagonal()
    if fisher is not None:
        importance = fisher
    elif row_importance is not None:
        cols = torch.ones(w.shape[1]) if importance is None else importance
        importance = row_importance.float()[:, None] * cols.float()[None, :]  # (N, K)
    palette = kmeans_tables(w, bits, importance, group_size=group_size)
    if hessian is None:
        return palette
    return assign_with_feedback(
        w,
        palette,
        hessian,
        row_importance=row_importance,
        group_size=group_size,
        rounds=feedback_rounds,
    )
