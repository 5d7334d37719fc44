"""Palettization: k-means lookup tables shared by every 16 output channels, as AFM ships its
on-device model (Gunter et al. 2024, arXiv:2407.21075 §5: 2- and 4-bit palettes, "16 columns/
rows share the same quantization constants"); plain PyTorch, in gpt-fast's three layers.

1. Tensor primitives. ``kmeans_tables``: a weighted 1-D k-means per group of ``group_size``
   output channels (rows), vectorised over every group at once (weighted-quantile
   initialisation, Lloyd iterations, empty clusters re-seeded at the worst-served point),
   weighted by per-input-column importance, the mean squared activation of that input on
   calibration text (the diagonal of the layer's Hessian; SqueezeLLM, Kim et al. 2023,
   arXiv:2306.07629, and coremltools' SKM weight k-means by a diagonal sensitivity the same
   way, theirs from squared gradients). ``assign_with_feedback``: with the full input second
   moment H = E[x xᵀ], indices are chosen column by column and each column's rounding error is
   pushed onto the columns not yet chosen, as GPTQ does for a uniform grid (Frantar et al.
   2022, arXiv:2210.17323; with codebooks, GPTVQ, van Baalen et al. 2024, arXiv:2402.15319);
   the tables are then refitted to the targets the pass chose for, and the pass repeated.
   ``pack_indices``/``unpack_indices`` (2 per byte at 4 bits, 4 at 2 bits), ``dequantize``,
   ``palette_bits`` (indices and fp16 tables counted exactly). A row count that is not a
   multiple of ``group_size`` gives a short last group, compressed like the others.
2. Runtime and handler. ``PalettizedLinear``: a ``models.linear.Projection`` holding packed
   indices and fp16 tables, so every layout of ``models.afm`` runs on it unchanged;
   ``PalettizedEmbedding`` for the input embedding (and through ``TiedHead`` the tied output
   head). ``Calibration`` collects input statistics with forward hooks on the projections;
   ``palettize_model`` converts a loaded AFM in place and reports every layer;
   ``palettize_shells`` rebuilds empty modules for ``models.checkpoint.load_checkpoint``.
3. The command is ``benchmarks/palettize_quality.py`` (and the platform's compress job).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from models.afm import AFM
from models.linear import Linear, Packed, Projection, TiedHead, tensor_version

GROUP_SIZE = 16  # output channels per table: AFM (arXiv:2407.21075 §5), coremltools group_size
TABLE_DTYPE = torch.float16  # table entries are stored and counted as 16-bit floats
KMEANS_ITERS = 12  # Lloyd iterations; the weighted error changes < 0.1% after ~8 on SmolLM2
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


def _quantile_init(x: torch.Tensor, w: torch.Tensor, C: int) -> torch.Tensor:
    """Centroids (G, C) at the weighted (c + 0.5)/C quantiles of each group's points (G, P):
    deterministic, and already close to the 1-D k-means optimum for bell-shaped weights."""
    order = x.argsort(dim=1)
    xs, cum = x.gather(1, order), w.gather(1, order).cumsum(1)  # (G, P)
    targets = (torch.arange(C, device=x.device) + 0.5) / C * cum[:, -1:]  # (G, C)
    at = torch.searchsorted(cum, targets).clamp(max=x.shape[1] - 1)
    return xs.gather(1, at)


def _assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid (G, P) for points x (G, P), centroids sorted along dim 1 (G, C): a
    batched binary search among the midpoints (faster here than C-1 comparison passes or an
    argmin over (G, P, C) distances)."""
    mids = (centroids[:, 1:] + centroids[:, :-1]) / 2  # (G, C-1)
    return torch.searchsorted(mids.contiguous(), x.contiguous())


def _lloyd_step(
    x: torch.Tensor, w: torch.Tensor, wx: torch.Tensor, c: torch.Tensor
) -> torch.Tensor:
    """One weighted Lloyd update of sorted centroids c (G, C) for points x (G, P) of weights
    w (wx = w·x); an empty cluster takes the point with the largest weighted error in its
    group (the next largest for a second empty one), so no table entry is wasted."""
    G, C = c.shape
    a = _assign(x, c)  # (G, P)
    slot = a.add_(torch.arange(0, G * C, C, device=x.device)[:, None]).view(-1)
    mass = torch.zeros(G * C, device=x.device).index_add_(0, slot, w.view(-1)).view(G, C)
    total = torch.zeros(G * C, device=x.device).index_add_(0, slot, wx.view(-1)).view(G, C)
    empty = mass <= 0
    c = torch.where(empty, c, total / mass.clamp(min=1e-30))
    if bool(empty.any()):
        err = w * (x - c.flatten()[slot].view_as(x)) ** 2  # (G, P)
        k = min(C, x.shape[1])
        worst = x.gather(1, err.topk(k, dim=1).indices)  # (G, k): worst-served points first
        rank = (empty.cumsum(1) - 1).clamp(0, k - 1)  # which of the group's empties this is
        c = torch.where(empty, worst.gather(1, rank), c)
    return c.sort(dim=1).values


def kmeans_tables(
    w: torch.Tensor,
    bits: int,
    importance: torch.Tensor | None = None,
    *,
    group_size: int = GROUP_SIZE,
    iters: int = KMEANS_ITERS,
) -> Palette:
    """Weighted k-means of the (N, K) matrix ``w``, one table of 2**bits entries per group of
    ``group_size`` rows, minimising Σ importance[k] (w[n, k] - table[n // g][index])².

    importance: (K,) per input column (e.g. mean squared activation) or (N, K) per weight
    (e.g. squared gradients); uniform when None. Deterministic: the same inputs give the same
    tables bit for bit (quantile initialisation, no sampling). Tables come back sorted, fp16;
    indices refer to the fp16 entries (nearest after rounding).
    """
    N, K = w.shape
    C = 2**bits
    imp = torch.ones(K) if importance is None else importance.detach().float().cpu()
    imp = imp.expand(N, K).clamp(min=0) + 1e-8 * imp.mean().clamp(min=1e-30)
    x = _grouped(w.detach().float().cpu(), group_size)  # (G, P)
    weights = _grouped(imp, group_size)  # (G, P): padded rows weigh 0
    c, wx = _quantile_init(x, weights, C), weights * x
    for _ in range(iters):
        c = _lloyd_step(x, weights, wx, c)
    tables = c.to(TABLE_DTYPE).sort(dim=1).values
    indices = _assign(x, tables.float()).view(-1, K)[:N]  # (N, K)
    return Palette(indices.to(torch.uint8), tables)


def _feedback_pass(
    w: torch.Tensor, row_tables: torch.Tensor, hinv: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One GPTQ pass over the columns of w (N, K) (already in processing order) with a
    per-row table row_tables (N, C), hinv the upper Cholesky factor of H⁻¹ (K, K).

    Returns indices (N, K), the targets each column was rounded from (N, K) and each column's
    weight 1 / hinv[k, k]² in the objective (K,)."""
    W = w.clone()
    N, K = W.shape
    indices = torch.empty(N, K, dtype=torch.long)
    targets = torch.empty_like(W)
    for i1 in range(0, K, FEEDBACK_BLOCK):
        i2 = min(i1 + FEEDBACK_BLOCK, K)
        W1, H1 = W[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        E1 = torch.empty_like(W1)
        for i in range(i2 - i1):
            col = W1[:, i]
            j = (row_tables - col[:, None]).abs().argmin(dim=1)  # (N,)
            err = (col - row_tables.gather(1, j[:, None]).squeeze(1)) / H1[i, i]
            indices[:, i1 + i], targets[:, i1 + i] = j, col
            W1[:, i:].sub_(err[:, None] * H1[i, i:][None])
            E1[:, i] = err
        W[:, i2:].sub_(E1 @ hinv[i1:i2, i2:])
    return indices, targets, hinv.diagonal().pow(-2)


def _flushing_denormals(fn, *args):
    """``fn(*args)`` with subnormal floats flushed to zero (torch's default is not to, and
    this function restores that). The error feedback multiplies ever smaller corrections into
    far columns; on SmolLM2's layers the subnormal results made a pass ~100x slower (13 ms
    against 0.1 ms a column) for no difference in the result above 1e-38."""
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
    rounds: int = 2,
) -> Palette:
    """Re-choose a palette's indices (and refit its tables) for the layer's output error
    tr(ΔW H ΔWᵀ) under the input second moment ``hessian`` (K, K), instead of each weight's
    own error: GPTQ's column-by-column rounding with error feedback, onto the tables instead
    of a uniform grid, columns in decreasing H[k, k] ("act order"). After each pass but the
    last, every table entry becomes the weighted mean of the targets rounded to it, each
    weighted by its column's GPTQ weight and its row's ``row_importance`` (N,) if given
    (rows are independent in the objective, so that weight only matters here)."""
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
        indices, targets, col_weight = _flushing_denormals(_feedback_pass, W, tables[groups], hinv)
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
    group_size: int = GROUP_SIZE,
) -> Palette:
    """k-means tables weighted by the diagonal of ``hessian`` (K,) times ``row_importance``
    (N,) where given, then, with a ``hessian``, indices and tables re-chosen for the layer's
    output error (``assign_with_feedback``)."""
    importance = None if hessian is None else hessian.diagonal()
    if row_importance is not None:
        cols = torch.ones(w.shape[1]) if importance is None else importance
        importance = row_importance.float()[:, None] * cols.float()[None, :]  # (N, K)
    palette = kmeans_tables(w, bits, importance, group_size=group_size)
    if hessian is None:
        return palette
    return assign_with_feedback(
        w, palette, hessian, row_importance=row_importance, group_size=group_size
    )


# -------------------------------------------------------------------------------- runtime
class _Scratch(threading.local):
    """One dequantization buffer per thread, shared by every palettized layer: the matrix
    being multiplied lives only for one call, so the model's memory stays the packed indices
    plus one largest layer."""

    buffer: torch.Tensor | None = None

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        b = self.buffer
        # a buffer made under inference_mode cannot be written where autograd is on (LoRA
        # training after an evaluation), nor the other way round: remake it when that changes
        if (
            b is None
            or b.numel() < numel
            or b.dtype != dtype
            or b.device != device
            or b.is_inference() != torch.is_inference_mode_enabled()
        ):
            b = self.buffer = torch.empty(numel, dtype=dtype, device=device)
        return b[:numel]


_scratch = _Scratch()


class PalettizedLinear(Projection):
    """A projection whose (out_features, in_features) weight is ``bits``-bit indices into fp16
    tables, one per ``group_size`` output channels (buffers ``packed`` and ``tables``: its
    state dict is the compressed weight).

    ``forward`` dequantizes into a per-thread buffer reused across layers and calls, then
    multiplies in the input's dtype: exact (x @ effective_weight()ᵀ), in the packed memory
    footprint. After ``pack(rows)`` (``AFM.prepack``, which the builtin backend calls) it
    keeps a oneDNN-packed dequantized copy instead, rebuilt when the buffers change: fp32
    memory again, the dense engine's decoding speed. Measured on SmolLM2's shapes, one row,
    2 threads: dequantizing per call costs 0.2-0.7 ms a matrix against 0.03-0.1 ms for the
    packed copy's matmul (dequantizing in chunks of 128 rows into a cache-sized buffer was
    slower still, 0.26-0.82 ms). Frozen: its buffers have no gradient (LoRA wraps it).
    """

    packed: torch.Tensor
    tables: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int = GROUP_SIZE,
        *,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        n_bytes = math.ceil(in_features * bits / 8)
        C = 2**bits
        G = row_groups(out_features, group_size)
        self.register_buffer(
            "packed", torch.zeros(out_features, n_bytes, dtype=torch.uint8, device=device)
        )
        self.register_buffer("tables", torch.zeros(G, C, dtype=TABLE_DTYPE, device=device))
        self._packed: Packed | None = None

    @classmethod
    def from_palette(cls, palette: Palette, bits: int, group_size: int = GROUP_SIZE):
        N, K = palette.indices.shape
        layer = cls(K, N, bits, group_size, device=palette.indices.device)
        layer.packed.copy_(pack_indices(palette.indices, bits))
        layer.tables.copy_(palette.tables)
        return layer

    def indices(self) -> torch.Tensor:
        return unpack_indices(self.packed, self.bits, self.in_features)

    def dequantized(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        return dequantize(self.indices(), self.tables, self.group_size, dtype=dtype, out=out)

    def forward(self, x: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        if rows is None and self._packed is not None:
            y = self._packed.linear(x)
            if y is not None:
                return y
        if torch.is_grad_enabled() and x.requires_grad:
            w = self.dequantized(x.dtype)  # autograd keeps it for the backward: not shared
        else:
            n = self.out_features * self.in_features
            w = self.dequantized(x.dtype, out=_scratch.take(n, x.dtype, x.device))
        return F.linear(x, w if rows is None else w[rows])

    def effective_weight(self) -> torch.Tensor:
        return self.dequantized(torch.float32)

    def version(self) -> tuple:
        return tensor_version(self.packed) + tensor_version(self.tables)

    def pack(self, rows: int | None) -> None:
        """Keep a oneDNN-packed dequantized copy for inputs of about ``rows`` rows, or drop it."""
        self._packed = Packed(self, rows) if rows else None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}"
        )


class PalettizedEmbedding(nn.Module):
    """The input embedding palettized like a projection's weight, one table per
    ``group_size`` vocabulary rows (``palette``, a ``PalettizedLinear`` of shape (V, dim)).
    A lookup dequantizes only the rows asked for. ``weight`` is the dense (V, dim) fp32 table,
    dequantized on first use and kept until the palette changes: ``TiedHead`` projects onto it
    (AFM's tied output head), and ``AFM.new_cache`` reads its dtype and device."""

    def __init__(self, num_embeddings: int, dim: int, bits: int, group_size: int = GROUP_SIZE):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, dim
        self.palette = PalettizedLinear(dim, num_embeddings, bits, group_size)
        self._dense: tuple[tuple, torch.Tensor] | None = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        p = self.palette
        idx = unpack_indices(p.packed[tokens], p.bits, p.in_features).long()  # (..., dim)
        table = p.tables[tokens // p.group_size].float()  # (..., C)
        return table.gather(-1, idx)

    @property
    def weight(self) -> torch.Tensor:
        version = self.palette.version()
        if self._dense is None or self._dense[0] != version:
            self._dense = (version, self.palette.effective_weight())
        return self._dense[1]


# ------------------------------------------------------------------------- handler
class Calibration:
    """Input second moments E[x xᵀ] of named projections, collected by forward hooks while
    the caller runs the model on calibration text inside ``with``, and, where the caller also
    runs a backward pass of a loss (gradients need reach the activations only, e.g. through
    the embedding), the mean squared gradient at each output channel. Together they give a
    Kronecker-factored diagonal of the Fisher information, E[g²]·E[x²] per weight, the
    sensitivity SqueezeLLM and coremltools' SKM weight k-means by (theirs from squared weight
    gradients, at the cost of the weight-gradient matmuls). The model's own projections are
    called as modules in prompt passes (``AFM.trunk``, ``AFM.head``), so every call is seen;
    the int4 draft's hot path bypasses hooks and is not."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = dict.fromkeys(modules, 0)
        self.grad_sums: dict[str, torch.Tensor] = {}
        self.grad_counts: dict[str, int] = dict.fromkeys(modules, 0)
        self._handles: list = []

    @classmethod
    def of(cls, model: AFM) -> Calibration:
        """Every block projection and the output head."""
        return cls({n: m for n, m in model.named_modules() if isinstance(m, Projection)})

    def __enter__(self) -> Calibration:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (n, K)
            xtx = (x.T @ x).double()  # an fp32 matmul per call, summed across calls in fp64
            s = self.sums.get(name)
            self.sums[name] = xtx if s is None else s.add_(xtx)
            self.counts[name] += x.shape[0]
            if output.requires_grad:
                output.register_hook(self._grad_hook(name))

        return record

    def _grad_hook(self, name: str):
        def record(grad: torch.Tensor) -> None:
            g = grad.detach().reshape(-1, grad.shape[-1]).float()  # (n, N)
            s, g2 = self.grad_sums.get(name), g.square().sum(0).double()
            self.grad_sums[name] = g2 if s is None else s.add_(g2)
            self.grad_counts[name] += g.shape[0]

        return record

    def hessian(self, name: str) -> torch.Tensor | None:
        """E[x xᵀ] (K, K) fp32 of the projection's inputs; None if it never ran."""
        if not self.counts.get(name):
            return None
        return (self.sums[name] / self.counts[name]).float()

    def row_importance(self, name: str) -> torch.Tensor | None:
        """E[g²] (N,) fp32 of the loss gradient at each output channel, from the backward
        passes the caller ran inside ``with`` (None without any): how much an error in that
        channel's output costs downstream."""
        if not self.grad_counts.get(name):
            return None
        return (self.grad_sums[name] / self.grad_counts[name]).float()


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    bits: int
    groups: int  # tables; the last covers out_features % group_size rows when that is not 0
    bytes: int  # packed indices + fp16 tables
    bpw: float
    seconds: float
    error: float  # ‖ΔW‖/‖W‖, or with calibration the output error √(tr ΔW H ΔWᵀ / tr W H Wᵀ)

    def to_dict(self) -> dict:
        return asdict(self)


def _relative_error(w: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor | None) -> float:
    d = approx - w
    if hessian is None:
        return float(d.norm() / w.norm().clamp(min=1e-30))
    num = ((d @ hessian) * d).sum()
    return float((num / ((w @ hessian) * w).sum().clamp(min=1e-30)).clamp(min=0).sqrt())


def _palettize_one(
    name: str,
    w: torch.Tensor,
    bits: int,
    calibration: Calibration | None,
    stats: str,
    group_size: int,
) -> tuple[Palette, LayerReport]:
    """Palettize ``w`` with the calibration statistics recorded under the name ``stats``."""
    w = w.detach()
    hessian = calibration.hessian(stats) if calibration else None
    rows = calibration.row_importance(stats) if calibration else None
    start = time.perf_counter()
    palette = palettize_weight(w, bits, hessian=hessian, row_importance=rows, group_size=group_size)
    seconds = time.perf_counter() - start
    approx = dequantize(palette.indices, palette.tables, group_size)
    shape = (w.shape[0], w.shape[1])
    report = LayerReport(
        name=name,
        shape=shape,
        bits=bits,
        groups=row_groups(shape[0], group_size),
        bytes=palette_bits(shape, bits, group_size) // 8,
        bpw=bits_per_weight(shape, bits, group_size),
        seconds=seconds,
        error=_relative_error(w.float().cpu(), approx, hessian),
    )
    return palette, report


def palettize_model(
    model: AFM,
    bits: dict[str, int] | None = None,
    *,
    default_bits: int = 4,
    embedding_bits: int | None = None,
    calibration: Calibration | None = None,
    group_size: int = GROUP_SIZE,
) -> list[LayerReport]:
    """Replace, in place, every block projection (and an untied output head) by a
    ``PalettizedLinear`` with ``bits.get(name, default_bits)`` bits, and with
    ``embedding_bits`` the input embedding (and so a tied head) by a ``PalettizedEmbedding``.
    Names are module paths (``blocks.3.mlp.w2``, ``lm_head``, ``tok_emb``). With a
    ``calibration`` each layer is fitted to its output error on that text (a tied embedding
    to the head's inputs). Returns one report per layer, in model order. CPU tensors only."""
    bits = dict(bits or {})
    names = {n for n, m in model.named_modules() if isinstance(m, Linear)}
    unknown = sorted(set(bits) - names - {"tok_emb"})
    if unknown:
        raise KeyError(f"no palettizable projection named {unknown[:5]}")
    reports = []
    for name in sorted(names, key=list(dict(model.named_modules())).index):
        module = model.get_submodule(name)
        assert isinstance(module, Linear)
        b = bits.get(name, default_bits)
        w = module.effective_weight()
        palette, report = _palettize_one(name, w, b, calibration, name, group_size)
        _replace(model, name, PalettizedLinear.from_palette(palette, b, group_size))
        reports.append(report)
    emb_bits = bits.get("tok_emb", embedding_bits)
    if emb_bits is not None:
        stats = "lm_head" if model.cfg.tie_embeddings else "tok_emb"  # no stats: plain k-means
        w = model.tok_emb.weight
        palette, report = _palettize_one("tok_emb", w, emb_bits, calibration, stats, group_size)
        embedding = PalettizedEmbedding(w.shape[0], w.shape[1], emb_bits, group_size)
        embedding.palette = PalettizedLinear.from_palette(palette, emb_bits, group_size)
        _set_embedding(model, embedding)
        reports.append(report)
    return reports


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _set_embedding(model: AFM, embedding: nn.Module) -> None:
    model.tok_emb = embedding  # type: ignore[assignment]
    if model.cfg.tie_embeddings:
        model.lm_head = TiedHead(embedding)  # type: ignore[arg-type]
    model._greedy = None  # BoundedGreedy's copy was made from the old table


def scheme(reports: list[LayerReport], group_size: int = GROUP_SIZE) -> dict:
    """The checkpoint's ``weights`` fields for a model palettized as ``reports`` say:
    bits per layer, group size, table dtype, and the bits-per-weight of what was palettized
    (indices and tables counted)."""
    total_bits = sum(r.bytes * 8 for r in reports)
    total_weights = sum(r.shape[0] * r.shape[1] for r in reports)
    return {
        "kind": "palettized",
        "group_size": group_size,
        "table_dtype": "float16",
        "bits": {r.name: r.bits for r in reports},
        "bpw": total_bits / max(total_weights, 1),
    }


def palettize_shells(model: AFM, weights: dict) -> None:
    """Swap in empty palettized modules where a checkpoint's ``weights`` scheme (``scheme``)
    has them, so its state dict loads into ``model``. Under ``torch.device("meta")`` the
    shells allocate nothing."""
    group_size = int(weights["group_size"])
    for name, b in weights["bits"].items():
        if name == "tok_emb":
            V, dim = model.cfg.vocab_size, model.cfg.dim
            _set_embedding(model, PalettizedEmbedding(V, dim, b, group_size))
            continue
        old = model.get_submodule(name)
        assert isinstance(old, Projection), name
        _replace(model, name, PalettizedLinear(old.in_features, old.out_features, b, group_size))
