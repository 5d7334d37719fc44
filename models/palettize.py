"""Palettization of a model: the layers that run on palettes and the conversion of a loaded
AFM, AFM's on-device compression (Gunter et al. 2024, arXiv:2407.21075 §5); plain PyTorch, in
gpt-fast's layers. The tensor maths (k-means tables, error feedback, packing, exact bit
accounting) is ``models.palette``.

- Runtime. ``PalettizedLinear``: a ``models.linear.Projection`` holding packed indices and
  fp16 tables, so every layout of ``models.afm`` runs on it unchanged, decoding through the
  lookup-table kernel of ``models.lut``; ``PalettizedEmbedding`` for the input embedding (and
  through ``TiedHead`` the tied output head).
- Handler. ``Calibration`` collects input statistics with forward hooks on the projections
  (and output-gradient statistics when the caller runs a backward pass); ``palettize_model``
  converts a loaded AFM in place and reports every layer; ``palettize_shells`` rebuilds empty
  modules for ``models.checkpoint.load_checkpoint``.
- The commands are ``benchmarks/palettize_quality.py`` and the platform's compress job; the
  AFM recipe on top (mixed bits by sensitivity, recovery adapters) is ``models.compress``.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models import lut
from models.afm import AFM
from models.linear import Linear, Packed, Projection, TiedHead, tensor_version
from models.palette import (
    GROUP_SIZE,
    TABLE_DTYPE,
    Palette,
    bits_per_weight,
    dequantize,
    flushing_denormals,
    pack_indices,
    palette_bits,
    palettize_weight,
    row_groups,
    unpack_indices,
)

# -------------------------------------------------------------------------------- runtime
# Rows up to which a palettized projection multiplies through the lookup-table kernel instead
# of dequantizing (see PalettizedLinear; decoding batches, speculative verification).
LUT_ROWS = 32


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

    ``forward`` on up to ``LUT_ROWS`` fp32 CPU rows without a gradient multiplies straight from
    the packed indices (``models.lut``: decoding reads 1/8 of the fp32 matrix's bytes at
    4 bits). Otherwise it dequantizes into a per-thread buffer reused across layers and calls,
    then multiplies in the input's dtype: exact (x @ effective_weight()ᵀ, up to summation
    order), in the packed memory footprint. After ``pack(rows)`` (``AFM.prepack``, which the
    builtin backend calls) a machine without the kernel keeps a oneDNN-packed dequantized copy
    instead, rebuilt when the buffers change: fp32 memory again, the dense engine's speed.
    Measured on SmolLM2's shapes, one row, 2 threads: dequantizing per call costs 0.2-0.7 ms
    a matrix against 0.03-0.1 ms for the packed copy's matmul (dequantizing in chunks of 128
    rows into a cache-sized buffer was slower still, 0.26-0.82 ms); the kernel, one thread,
    0.024-0.13 ms against 0.05-0.21 ms for the packed copy with the matrix in cache, and
    1.7 against 9.0 ms for the 49,152-row head, which is not. Frozen: its buffers have no
    gradient (LoRA wraps it).
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
        self._lut: tuple[tuple, torch.Tensor] | None = None  # (version, kernel_tables)

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

    def table_lookup(self, x: torch.Tensor) -> torch.Tensor | None:
        """x @ Wᵀ through the lookup-table kernel, or None where it does not apply (more than
        ``LUT_ROWS`` rows, not fp32 on the CPU, a gradient wanted, no kernel built)."""
        n = x.numel() // self.in_features
        if (
            n > LUT_ROWS
            or x.dtype != torch.float32
            or x.device.type != "cpu"
            or self.bits not in lut.WIDTHS
            or self.group_size % 2
            or (torch.is_grad_enabled() and x.requires_grad)
            or not lut.available()
        ):
            return None
        version = self.version()
        if self._lut is None or self._lut[0] != version:
            self._lut = (version, lut.kernel_tables(self.tables))
        y = lut.lut_linear(
            x.reshape(n, self.in_features), self.packed, self._lut[1], self.bits, self.group_size
        )
        return y.view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        if rows is None:
            y = self.table_lookup(x)
            if y is not None:
                return y
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
        """Keep a oneDNN-packed dequantized copy for inputs of about ``rows`` rows, or drop it;
        never where the lookup-table kernel serves such inputs (the model stays small)."""
        kernel = rows is not None and rows <= LUT_ROWS and lut.available()
        self._packed = Packed(self, rows) if rows and not kernel else None

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
    the embedding), the diagonal of the empirical Fisher information per weight, E[(g x)²]
    over tokens (g the loss gradient at the output channel, x the input): the sensitivity
    SqueezeLLM (Kim et al. 2023, arXiv:2306.07629) and coremltools' SKM weight k-means by,
    here from one (N, T)ᵀ(T, K) matmul per call instead of the weight gradients, plus the mean
    squared gradient per output channel E[g²]. On SmolLM2 (32 AlpacaEval sequences, 4-bit,
    exact 1-D k-means) the per-weight Fisher gave KL 0.26 nats/token where the factorised
    E[g²]·E[x²] gave 0.38. The model's own projections are called as modules in prompt
    passes (``AFM.trunk``, ``AFM.head``), so every call is seen; the int4 draft's hot path
    bypasses hooks and is not."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = dict.fromkeys(modules, 0)
        self.grad_sums: dict[str, torch.Tensor] = {}
        self.grad_counts: dict[str, int] = dict.fromkeys(modules, 0)
        self.fisher_sums: dict[str, torch.Tensor] = {}
        self._inputs: dict[str, torch.Tensor] = {}  # a call's input, until its backward
        self._handles: list = []

    @classmethod
    def of(cls, model: AFM, *, head: bool = True) -> Calibration:
        """Every block projection and, with ``head``, the output head."""
        return cls(
            {
                n: m
                for n, m in model.named_modules()
                if isinstance(m, Projection) and (head or m is not model.lm_head)
            }
        )

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
                self._inputs[name] = x
                output.register_hook(self._grad_hook(name))

        return record

    def _grad_hook(self, name: str):
        def record(grad: torch.Tensor) -> None:
            g = grad.detach().reshape(-1, grad.shape[-1]).float()  # (n, N)
            s, g2 = self.grad_sums.get(name), g.square().sum(0).double()
            self.grad_sums[name] = g2 if s is None else s.add_(g2)
            self.grad_counts[name] += g.shape[0]
            x = self._inputs.pop(name)  # (n, K): the same call's input
            fisher = flushing_denormals(torch.mm, g.square().T, x.square())  # (N, K)
            f = self.fisher_sums.get(name)
            self.fisher_sums[name] = fisher if f is None else f.add_(fisher)

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

    def fisher(self, name: str) -> torch.Tensor | None:
        """E[(g x)²] (N, K) fp32 per weight over the tokens of the backward passes (None
        without any): the loss increase, to second order, of an error in that weight."""
        if not self.grad_counts.get(name):
            return None
        return self.fisher_sums[name] / self.grad_counts[name]


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
    fisher = calibration.fisher(stats) if calibration else None
    start = time.perf_counter()
    palette = palettize_weight(
        w, bits, hessian=hessian, row_importance=rows, fisher=fisher, group_size=group_size
    )
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
