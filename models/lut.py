"""Lookup-table matmul for palettized weights on the CPU (``lut.c`` beside this file).

A palettized projection (``models.palettize.PalettizedLinear``) stores 2- or 4-bit indices
into one 16-entry table per 16 output channels. Decoding multiplies a few rows by every weight
once per token, so it is bound by the bytes it reads: the fp32 matrix is 8x (4-bit) to 16x
(2-bit) the packed indices. ``lut_linear`` multiplies straight from the packed indices: each
chunk of 16 indices becomes 16 weights in a register through one table permute (AVX-512's
``vpermps`` holds a whole table), so the weight is never written out in fp32.

Why our own kernel: no library on this machine multiplies by a k-means table. torch's int4
kernels (``_weight_int4pack_mm``) take affine groups along the input (scale and offset), not
arbitrary table entries; coremltools and PEFT dequantize to a dense matrix; llama.cpp's
non-linear IQ4_NL uses one fixed table for every block.

The C file is compiled on first use by ``models.native`` (where there is no compiler, or the
build fails, ``library()`` is None and callers keep dequantizing, ``available()``);
``EVALHUB_LUT=off`` switches this kernel off alone.
"""

from __future__ import annotations

import ctypes
import os

import torch

from models import native

WIDTHS = (2, 4)  # index widths the kernel takes
ENTRIES = 16  # table entries the kernel reads per group (narrower tables repeat)

_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
SIGNATURES: native.Signatures = {
    "lut_linear": ([_ptr, _i64, _i64, _ptr, _i64, _ptr, _i64, _i64, _int, _ptr, _int], _int),
    "lut_vectorised": ([], _int),
}
OFF = os.environ.get("EVALHUB_LUT", "on") == "off"  # read once, at import


def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None where it cannot be built or is off."""
    return None if OFF else native.load("lut", SIGNATURES)


def available() -> bool:
    """True where the kernel is built with its vector path (the scalar fallback is slower than
    dequantizing and multiplying, so callers only choose the kernel where this holds)."""
    lib = library()
    return lib is not None and bool(lib.lut_vectorised())


def kernel_tables(tables: torch.Tensor) -> torch.Tensor:
    """(G, 2**bits) stored tables -> (G, 16) fp32 contiguous, a narrower table repeated so that
    entry k is T[k mod 2**bits] (the kernel reads the low 4 bits of a wider field)."""
    G, C = tables.shape
    return tables.float().repeat(1, ENTRIES // C).contiguous()


def lut_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    tables16: torch.Tensor,
    bits: int,
    group_size: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (n, K) fp32 times the palettized (N, K) matrix transposed: (n, N) fp32.

    packed: (N, ceil(K·bits/8)) uint8 from ``models.palette.pack_indices``; tables16: (G, 16)
    from ``kernel_tables``. Needs ``library()``; every tensor on the CPU."""
    lib = library()
    if lib is None:
        raise RuntimeError("the lookup-table kernel is not built on this machine")
    if bits not in WIDTHS:
        raise ValueError(f"the kernel takes {WIDTHS}-bit indices, got {bits}")
    n, K = x.shape
    N = packed.shape[0]
    x = x.contiguous()
    if x.dtype != torch.float32 or tables16.dtype != torch.float32:
        raise TypeError("lut_linear multiplies fp32 rows by fp32 tables")
    if packed.shape[1] * 8 < K * bits or tables16.shape != (-(-N // group_size), ENTRIES):
        raise ValueError(
            f"packed {tuple(packed.shape)} / tables {tuple(tables16.shape)} "
            f"do not fit a ({N}, {K}) {bits}-bit matrix"
        )
    y = torch.empty(n, N, dtype=torch.float32) if out is None else out
    lib.lut_linear(
        x.data_ptr(), n, K, packed.data_ptr(), packed.shape[1], tables16.data_ptr(), N,
        group_size, bits, y.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return y
