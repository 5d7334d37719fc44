"""The weight seam: every projection in the model library goes through one small interface.

A ``Projection`` maps (..., in_features) to (..., out_features) with ``forward(x, rows=None)``;
``rows`` (a slice of output features) computes only those outputs, which is how the decoder
block asks for queries at a few tokens and keys/values at all of them. Implementations:

- ``Linear``: a dense weight (fp32 or bf16), optionally with a oneDNN-prepacked copy for fast
  CPU inference (``Dense.pack``);
- ``TiedHead``: the same for the output head that shares the input embedding's table;
- ``Int4Linear``: weight-only int4 (group 32, llama.cpp's Q4_1 grid), CPU only; the speculative
  draft's projections (``models.draft``);
- palettized weights (k-means tables per 16 output channels) and LoRA wrappers plug in here as
  further implementations: a subclass of ``Projection`` with the same three members.

Nothing outside this module reads a projection's ``.weight``: code that needs the matrix
itself (a quantizer, a merge, an export) asks for ``effective_weight()``, which a LoRA wrapper
answers with W + BA and a palettized weight with its dequantized table lookup.

Derived copies (oneDNN packs, int4 tables, the bf16 head of ``models.kernels.BoundedGreedy``)
record the ``version()`` of the weight they were made from and are rebuilt when it changes
(an optimizer step, ``load_state_dict``, a module swap), never used stale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Projection(nn.Module):
    """The seam. Subclasses set ``in_features``/``out_features`` and implement the three
    members below."""

    in_features: int
    out_features: int

    def forward(self, x: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """(..., in_features) -> (..., out_features), or (..., len(rows)) for a slice of the
        output features."""
        raise NotImplementedError

    def effective_weight(self) -> torch.Tensor:
        """The (out_features, in_features) matrix this projection applies, detached."""
        raise NotImplementedError

    def version(self) -> tuple:
        """Changes whenever ``effective_weight()`` would: a derived copy made at one version is
        stale at any other."""
        raise NotImplementedError


def tensor_version(t: torch.Tensor) -> tuple:
    """Identity and in-place-write counter of a tensor: an optimizer step, ``copy_`` or
    ``load_state_dict`` bumps the counter, assigning a new Parameter changes the identity."""
    return (id(t), t._version)


class Packed:
    """A oneDNN-packed copy of a projection's fp32 weight (``pack_weight``) and the version it
    was made from; ``linear`` repacks first when the weight changed since."""

    def __init__(self, source: Projection, rows: int):
        self.source, self.rows = source, rows
        self.made_from: tuple | None = None
        self.packed: torch.Tensor | None = None

    def linear(self, x: torch.Tensor) -> torch.Tensor | None:
        """``x @ W^T`` through the pack; None where oneDNN can't take the weight."""
        if self.made_from != self.source.version():
            self.packed = pack_weight(self.source.effective_weight(), self.rows)
            self.made_from = self.source.version()
        if self.packed is None:
            return None
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


class Dense(Projection):
    """A projection that applies a plain matrix (``matrix()``, fp32 or bf16), optionally
    through a oneDNN-packed copy of it for inference (``pack``; the copy costs the matrix's
    memory again). Anything that wants gradients uses the matrix itself: the packed kernel has
    no backward. ``Linear`` owns its matrix, ``TiedHead`` borrows the embedding's."""

    _packed: Packed | None = None

    def matrix(self) -> torch.Tensor:
        """The (out_features, in_features) tensor, as trained (not detached)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        w = self.matrix()
        if rows is not None:
            return F.linear(x, w[rows])
        # The packed kernel has no backward: not where a gradient flows to the weight or
        # through the input (a frozen base under a LoRA adapter, a frozen head).
        wants_grad = torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)
        if self._packed is not None and not wants_grad:
            y = self._packed.linear(x)
            if y is not None:
                return y
        return F.linear(x, w)

    def effective_weight(self) -> torch.Tensor:
        return self.matrix().detach()

    def version(self) -> tuple:
        return tensor_version(self.matrix())

    def pack(self, rows: int | None) -> None:
        """Keep a oneDNN copy tuned for inputs of about ``rows`` rows, or drop it (None)."""
        self._packed = Packed(self, rows) if rows else None

    def extra_repr(self) -> str:
        packed = f", packed={self._packed.rows}" if self._packed is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}{packed}"


class Linear(Dense):
    """Dense y = x W^T without bias; W (out_features, in_features) is its own Parameter."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, device=device, dtype=dtype)
        )
        if self.weight.device.type != "meta":
            # nn.Linear's default initialisation (Kaiming-uniform, a = sqrt(5)).
            nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def matrix(self) -> torch.Tensor:
        return self.weight


class TiedHead(Dense):
    """The output head of a model whose input and output embeddings are tied (Press & Wolf
    2017, arXiv:1608.05859): it projects onto the rows of ``embedding``'s table. It owns no
    parameter (the table is the embedding's, saved once under its name) and is not registered
    as a submodule of the embedding, so state dicts and optimizers see the table once."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self._embedding = (embedding,)  # a tuple: not a registered submodule
        self.out_features, self.in_features = embedding.weight.shape

    def matrix(self) -> torch.Tensor:
        return self._embedding[0].weight

    def forward(self, x: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        # A palettized embedding (models.palettize) carries its table as a projection whose
        # lookup-table kernel reads the packed indices instead of the dense copy: 1.7 against
        # 9 ms for SmolLM2's head on one row.
        palette = getattr(self._embedding[0], "palette", None)
        if rows is None and palette is not None:
            y = palette.table_lookup(x)
            if y is not None:
                return y
        return super().forward(x, rows)


def pack_weight(weight: torch.Tensor, rows: int) -> torch.Tensor | None:
    """oneDNN's copy of a CPU fp32 ``weight`` in its own blocked layout, tuned for inputs of
    about ``rows`` rows but good for any; None where oneDNN can't take it.

    Why: torch's fp32 ``F.linear`` calls MKL, which on the AMD EPYC (Zen 4) CPUs this was
    measured on runs decoding's few-row matmuls 2-3x slower than oneDNN on a prepacked weight
    (SmolLM2-135M's block matmuls: 8 rows 152 against 48 ms, 32 rows 132 against 70 ms,
    one row 102 against 46 ms, on a slow day of the 2-core machine). oneDNN accumulates in
    fp32 like MKL; only the summation order differs, as between batch sizes.
    """
    cpu_fp32 = weight.device.type == "cpu" and weight.dtype == torch.float32
    if not (cpu_fp32 and torch.backends.mkldnn.is_available()):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest asymmetric int4 of ``w`` (N, K), one scale and offset per group of
    ``group_size`` input columns: w ~ (q - 8) * scale + zero, q in [0, 15].

    Returns q (N, K) int32 and scales_and_zeros (K / group_size, N, 2) bf16, the layout of
    ``torch.ops.aten._weight_int4pack_mm_for_cpu``. Group 32 with min/max range is the grid
    of llama.cpp's Q4_1, so weights imported from a Q4_1 GGUF file come back up to the bf16
    rounding of their scales.
    """
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"input width {K} is not a multiple of the int4 group size {group_size}")
    groups = w.detach().float().reshape(N, K // group_size, group_size)  # (N, K/g, g)
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)  # (N, K/g, 1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = ((groups - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(N, K)
    zeros = torch.cat((scale, lo + 8 * scale), dim=-1)  # (N, K/g, 2)
    return q, zeros.transpose(0, 1).contiguous().to(torch.bfloat16)  # (K/g, N, 2)


class Int4Linear(Projection):
    """Weight-only int4 copy of a ``source`` projection (``quantize_int4``), CPU only. It
    reads ~7x fewer weight bytes than fp32 and is not exact: the speculative draft's
    projections (``models.draft``). Rows in any float dtype; the output is bf16 (the kernel's).
    ``forward`` rebuilds it from the source first when the source's weight changed."""

    def __init__(self, source: Projection, group_size: int = 32):
        super().__init__()
        self._source = (source,)  # a tuple: the source is not a submodule of its copy
        self.in_features, self.out_features = source.in_features, source.out_features
        self.group_size = group_size
        self.made_from: tuple | None = None
        self._build()

    def _build(self) -> None:
        source = self._source[0]
        q, self.scales_zeros = quantize_int4(source.effective_weight(), self.group_size)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)  # (N, K/2) uint8
        self.made_from = source.version()

    def refresh(self) -> None:
        """Rebuild from the source if its weight changed since the last build."""
        if self.made_from != self._source[0].version():
            self._build()

    def forward(self, x: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        if rows is not None:
            raise NotImplementedError("Int4Linear computes all output features")
        self.refresh()
        y = self.multiply(x.reshape(-1, self.in_features))  # (N, out)
        return y.view(*x.shape[:-1], self.out_features)

    def multiply(self, rows: torch.Tensor) -> torch.Tensor:
        """(N, in) rows -> (N, out) bf16: ``forward`` without the staleness check, for a caller
        that ran ``refresh()`` since the source last changed (``models.draft.Int4Draft``, once
        per generation: the check costs ~2 us, 121 times a SmolLM2 draft step)."""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            rows.to(torch.bfloat16), self.packed, self.group_size, self.scales_zeros
        )

    def effective_weight(self) -> torch.Tensor:
        """The dequantized matrix (what the int4 kernel multiplies by), fp32."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        return self.forward(eye).float().T.contiguous()

    def version(self) -> tuple:
        return self.made_from or ()
