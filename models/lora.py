"""LoRA: low-rank adapters behind the weight seam, with adapter-only checkpoints in PEFT's layout.

Features, with references:

- ``LoRALinear`` wraps any ``models.linear.Projection`` (dense, int4, palettized):
  y = base(x) + (α/r)·B(A·dropout(x)) with A (r, in) and B (out, r), B starting at zero so the
  wrapped model starts exactly where the base is (Hu et al. 2021, "LoRA", arXiv:2106.09685,
  §4.1; A initialised like PEFT's, Kaiming-uniform). ``effective_weight`` is W + (α/r)·BA and
  ``version`` combines the base's and the adapter's, so derived copies (oneDNN packs, the int4
  draft, a palettized table) see a trained adapter as a changed weight;
- the base is frozen and may be any implementation, also one without a backward of its own
  (the oneDNN-packed or int4 kernels): the gradient to the input goes through
  ``effective_weight()``, as QLoRA backpropagates through a dequantized frozen base (Dettmers
  et al. 2023, arXiv:2305.14314);
- ``apply_lora`` swaps wrappers in for the block projections chosen by type (attention's
  fused q/k/v and output, the feed-forward's fused gate/up and down; AFM puts adapters on all
  of them, arXiv:2407.21075 §5), ``lora_parameters``, ``merge_lora``, ``adapters_disabled``
  (the DPO reference without a second copy of the model);
- ``save_adapter`` / ``load_adapter``: ``adapter_config.json`` + ``adapter_model.safetensors``
  under PEFT's key names for the Hugging Face Llama version of the model, which ``peft``
  loads onto ``LlamaForCausalLM``; ``adapter_factors`` reads one as plain tensors;
- many adapters on one base (``routed``): inside the context, each wrapper of a model adds the
  update of the adapter its batch row asked for, the base computed once for all rows, as
  S-LoRA and Punica serve many adapters from one copy of the base (Sheng et al. 2023,
  arXiv:2311.03285; Chen et al. 2023, arXiv:2310.18547). A rank-0 ``LoRALinear`` is such a
  slot with no adapter of its own (``models.adapters`` installs them and caches adapters).

Fused projections in PEFT's layout. Our q/k/v (and gate/up) are one matrix; Hugging Face has
three (two). A fused adapter's update is B·A with one A shared by every output row, so row
block i of the update is B_i·A: exported as q_proj with (A, B_q), k_proj with (A, B_k), v_proj
with (A, B_v), each of rank r and the same α, exactly the same update (A is stored three times
in the file, 2r·in extra numbers per layer). The other way, three independent adapters
(A_q, B_q), (A_k, B_k), (A_v, B_v) are one fused adapter of rank r_q + r_k + r_v with
A = [A_q; A_k; A_v] and B block-diagonal, each block scaled by its own α/r: also exact, so
any PEFT adapter on these projections loads (a projection the adapter leaves out gets zero
rows). Adapters that share A (as ours) load back at rank r.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from models.afm import AFM, Attention, SwiGLU
from models.linear import Linear, Projection, tensor_version

TARGETS = ("wqkv", "wo", "w13", "w2")
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


class _FrozenBase(torch.autograd.Function):
    """y = base(x, rows) for a frozen base, with dL/dx = dL/dy · W_eff[rows]: a backward for
    kernels that have none (oneDNN's packed matmul silently returns no input gradient; the
    int4 kernel has no autograd)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: Projection, rows: slice | None) -> torch.Tensor:
        ctx.base, ctx.rows = base, rows
        with torch.no_grad():
            return base(x, rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w = ctx.base.effective_weight()  # (out, in)
        w = w if ctx.rows is None else w[ctx.rows]
        return grad @ w.to(grad.dtype), None, None


def _device_of(module: nn.Module) -> torch.device:
    tensors = [*module.parameters(), *module.buffers()]
    return tensors[0].device if tensors else torch.device("cpu")


class LoRALinear(Projection):
    """A ``base`` projection plus a rank-``rank`` update scaled by ``alpha / rank``.

    A and B are fp32 parameters on the base's device; their product is added in the base
    output's dtype (the int4 kernel answers in bf16). ``enabled = False`` gives the base alone
    (``adapters_disabled``). Rank 0 is a slot with no adapter of its own, for ``routed``
    serving: it computes the base and whatever update the routing gives its rows. ``site`` is
    (layer, target name) for wrappers that ``apply_lora`` / ``load_adapter`` put in."""

    def __init__(
        self,
        base: Projection,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if rank < 0:
            raise ValueError(f"LoRA rank must be positive (or 0 for a slot), not {rank}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scale = rank, float(alpha), alpha / rank if rank else 0.0
        self.site: tuple[int, str] | None = None
        device = _device_of(base)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        if rank:  # PEFT's init of A (B is zero), drawn on the CPU: a seed gives one A anywhere
            a = torch.empty(rank, self.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            with torch.no_grad():
                self.lora_A.copy_(a)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = rank > 0

    def forward(self, x: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        routes = _ROUTES.get()
        if routes is not None and id(self) in routes:  # serving: the rows' adapters, not ours
            route = routes[id(self)]
            y = self.base(x, rows)
            return y if route is None else route.add(x, y, rows)
        y = self._base(x, rows)
        if not self.enabled:
            return y
        B = self.lora_B if rows is None else self.lora_B[rows]
        h = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)  # (..., r)
        return y + (F.linear(h, B) * self.scale).to(y.dtype)

    def _base(self, x: torch.Tensor, rows: slice | None) -> torch.Tensor:
        frozen = not any(p.requires_grad for p in self.base.parameters())
        if frozen and torch.is_grad_enabled() and x.requires_grad:
            return _FrozenBase.apply(x, self.base, rows)
        return self.base(x, rows)

    def delta(self) -> torch.Tensor:
        """(α/r)·BA, (out, in) fp32, detached."""
        return (self.lora_B @ self.lora_A).detach() * self.scale

    def effective_weight(self) -> torch.Tensor:
        w = self.base.effective_weight()
        return w + self.delta().to(w.dtype) if self.enabled else w

    def version(self) -> tuple:
        adapter = (tensor_version(self.lora_A), tensor_version(self.lora_B), self.scale)
        return (self.base.version(), adapter, self.enabled)

    def merge(self) -> Projection:
        """The base with the update folded in: a ``Linear`` base in place (its weight becomes
        W + (α/r)·BA), any other base (int4, palettized) as a new dense fp32 ``Linear``, since
        re-quantizing W + BA is a compression decision, not a merge."""
        if isinstance(self.base, Linear):
            with torch.no_grad():
                w = self.base.weight
                w.add_(self.delta().to(w.device, w.dtype))
            return self.base
        dense = Linear(self.in_features, self.out_features, device="meta")
        dense.weight = nn.Parameter(self.effective_weight().float(), requires_grad=False)
        return dense

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, enabled={self.enabled}"


# ------------------------------------------------------------------------- model surgery
def sites(model: AFM) -> Iterator[tuple[int, str, nn.Module]]:
    """(layer, target name, owning module) for every block projection an adapter can go on,
    found by the owner's type: attention's wqkv and wo, the feed-forward's w13 and w2."""
    for i, block in enumerate(model.blocks):
        for owner in block.children():
            if isinstance(owner, Attention):
                yield i, "wqkv", owner
                yield i, "wo", owner
            elif isinstance(owner, SwiGLU):
                yield i, "w13", owner
                yield i, "w2", owner


def apply_lora(
    model: AFM,
    rank: int = 16,
    alpha: float = 32.0,
    targets: Sequence[str] = TARGETS,
    dropout: float = 0.0,
    seed: int = 0,
) -> list[LoRALinear]:
    """Wrap the ``targets`` projections of every block in ``LoRALinear`` and freeze every
    other parameter of ``model``; return the wrappers. Defaults: rank 16 as AFM's adapters
    (arXiv:2407.21075 §5.1), α = 2r (a common PEFT choice: scale 2). A projection that
    already has an adapter is an error (``merge_lora`` first, or ``load_adapter``). A is drawn
    from ``seed`` (the global RNG is left alone), so the same seed gives the same adapters."""
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}; known: {TARGETS}")
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    wrappers = []
    for layer, name, owner in sites(model):
        if name not in targets:
            continue
        base = getattr(owner, name)
        if isinstance(base, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter (merge_lora or load_adapter)")
        wrapper = LoRALinear(base, rank, alpha, dropout, generator)
        wrapper.site = (layer, name)
        setattr(owner, name, wrapper)
        wrappers.append(wrapper)
    return wrappers


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every adapter's A and B, chosen by module type: what an optimizer trains."""
    return [p for m in lora_layers(model) for p in (m.lora_A, m.lora_B)]


def merge_lora(model: AFM) -> AFM:
    """Fold every adapter into its base (``LoRALinear.merge``) and drop the wrappers; the
    model is a plain AFM again (its state dict has the base's keys)."""
    for _, name, owner in sites(model):
        projection = getattr(owner, name)
        if isinstance(projection, LoRALinear):
            setattr(owner, name, projection.merge())
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its base: every adapter off inside the block, back as it was after."""
    layers = lora_layers(model)
    before = [m.enabled for m in layers]
    try:
        for m in layers:
            m.enabled = False
        yield
    finally:
        for m, was in zip(layers, before, strict=True):
            m.enabled = was


# ----------------------------------------------------------------- PEFT checkpoint layout
def _hf_parts(model: AFM, name: str) -> list[tuple[str, int]]:
    """(Hugging Face Llama module, output rows) for the row blocks of our ``name``."""
    cfg = model.cfg
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {
        "wqkv": [("self_attn.q_proj", q), ("self_attn.k_proj", kv), ("self_attn.v_proj", kv)],
        "wo": [("self_attn.o_proj", cfg.dim)],
        "w13": [("mlp.gate_proj", cfg.hidden_dim), ("mlp.up_proj", cfg.hidden_dim)],
        "w2": [("mlp.down_proj", cfg.dim)],
    }[name]


def _prefix(layer: int) -> str:
    return f"base_model.model.model.layers.{layer}."


def save_adapter(
    model: AFM, path: str | os.PathLike, *, base_model_name_or_path: str | None = None
) -> Path:
    """Write ``path/adapter_config.json`` and ``path/adapter_model.safetensors`` in PEFT's
    layout (fused projections split as the module docstring says). Rank and α are per
    module: the most common pair is the config's ``r``/``lora_alpha``, any other goes to
    PEFT's ``rank_pattern``/``alpha_pattern``. Dropout is recorded; weights are fp32."""
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, float]] = {}  # HF module path -> (r, alpha)
    dropout = 0.0
    for layer, name, owner in sites(model):
        m = getattr(owner, name)
        if not isinstance(m, LoRALinear) or m.rank == 0:
            continue
        if isinstance(m.dropout, nn.Dropout):
            dropout = m.dropout.p
        A, B = m.lora_A.detach().float().cpu(), m.lora_B.detach().float().cpu()
        for (hf, _), B_i in zip(_hf_parts(model, name), B.split(_rows(model, name)), strict=True):
            key = _prefix(layer) + hf
            tensors[key + ".lora_A.weight"] = A.clone()  # one copy per HF module
            tensors[key + ".lora_B.weight"] = B_i.contiguous()
            shapes[f"model.layers.{layer}.{hf}"] = (m.rank, m.alpha)
    if not tensors:
        raise ValueError("the model has no LoRA adapters to save")
    pairs = list(shapes.values())
    r, alpha = max(set(pairs), key=pairs.count)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted({k.rsplit(".", 1)[-1] for k in shapes}),
        "rank_pattern": {k: v[0] for k, v in shapes.items() if v[0] != r},
        "alpha_pattern": {k: v[1] for k, v in shapes.items() if v[1] != alpha},
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def _rows(model: AFM, name: str) -> list[int]:
    return [rows for _, rows in _hf_parts(model, name)]


def _pattern(patterns: dict, module: str, default):
    """PEFT's rank/alpha pattern lookup: a key matches a module path ending in it."""
    for key, value in patterns.items():
        if module == key or module.endswith("." + key):
            return value
    return default


# (layer, target name) -> (A (r, in), B (out, r), scale): one adapter as plain tensors
Factors = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]


def adapter_factors(model: AFM, path: str | os.PathLike) -> tuple[Factors, float]:
    """The PEFT-layout adapter at ``path`` as fused factors per site of ``model`` (sites it
    leaves out are absent; fresh tensors, none shared between sites), and its dropout.
    Hugging Face modules of one fused projection that share A and scale keep their rank;
    others become the block-diagonal fusion of the module docstring (scale 1). ValueError
    for an adapter on modules ``model`` lacks."""
    src = Path(path)
    config = json.loads((src / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise ValueError(f"{src}: not a plain LoRA adapter ({config.get('peft_type')})")
    tensors = load_file(src / ADAPTER_WEIGHTS)
    used: set[str] = set()
    factors: Factors = {}
    for layer, name, _ in sites(model):
        parts: list[tuple[torch.Tensor, torch.Tensor, float] | None] = []  # per HF module
        for hf, _ in _hf_parts(model, name):
            key = _prefix(layer) + hf
            if key + ".lora_A.weight" not in tensors:
                parts.append(None)
                continue
            used |= {key + ".lora_A.weight", key + ".lora_B.weight"}
            A, B = tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"]
            module = f"model.layers.{layer}.{hf}"
            alpha = _pattern(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
            r = A.shape[0]
            scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
            parts.append((A.float(), B.float(), scale))
        if any(p is not None for p in parts):
            factors[(layer, name)] = _fuse(parts, _rows(model, name))
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"{src}: weights for modules this model has no site for: {unused[:4]}")
    return factors, float(config.get("lora_dropout", 0.0))


def load_adapter(model: AFM, path: str | os.PathLike) -> list[LoRALinear]:
    """Put the PEFT-layout adapter at ``path`` on ``model`` (replacing adapters it has, as
    ``adapter_factors`` reads it) and freeze everything else; return the wrappers."""
    factors, dropout = adapter_factors(model, path)
    model.requires_grad_(False)
    wrappers = []
    for layer, name, owner in sites(model):
        if (layer, name) not in factors:
            continue
        A, B, scale = factors[(layer, name)]
        base = getattr(owner, name)
        base = base.base if isinstance(base, LoRALinear) else base
        wrapper = LoRALinear(base, A.shape[0], scale * A.shape[0], dropout)
        wrapper.site = (layer, name)
        with torch.no_grad():
            wrapper.lora_A.copy_(A)
            wrapper.lora_B.copy_(B)
        setattr(owner, name, wrapper)
        wrappers.append(wrapper)
    return wrappers


def _fuse(
    parts: list[tuple[torch.Tensor, torch.Tensor, float] | None], rows: list[int]
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, scale) of one adapter equal to the HF modules' adapters ``parts`` on the row
    blocks ``rows`` of a fused projection (None: no adapter on that block)."""
    present = [p for p in parts if p is not None]
    A0, _, s0 = present[0]
    if all(torch.equal(A, A0) and s == s0 for A, _, s in present):
        r = A0.shape[0]
        blocks = [
            p[1] if p is not None else torch.zeros(n, r) for p, n in zip(parts, rows, strict=True)
        ]
        return A0, torch.cat(blocks), s0
    # block-diagonal: rank = Σ r_i, scales folded into B
    A = torch.cat([a for a, _, _ in present])
    B = torch.zeros(sum(rows), A.shape[0])
    row, col = 0, 0
    for p, n in zip(parts, rows, strict=True):
        if p is not None:
            a, b, s = p
            B[row : row + n, col : col + a.shape[0]] = b * s
            col += a.shape[0]
        row += n
    return A, B, 1.0


# ------------------------------------------------------------ many adapters on one base
class RowDeltas:
    """One projection's low-rank updates for the rows of a batch (dim 0 of its input): row i
    gets (x_i Aᵢᵀ) Bᵢᵀ, the scale folded into the factors, or nothing for None. One adapter
    for every row works on any layout (the flat one included); different ones need one
    input row per batch row.

    strategy "group": one pair of matmuls per distinct adapter over its rows' inputs, added
    back by index (``index_add_``); "gather": every row's factors stacked, zero-padded to the
    largest rank, and applied by two batched matmuls (Punica's BGMV, arXiv:2310.18547),
    which pays a copy of the factors per row. benchmarks/adapter_swap.py measures both."""

    def __init__(
        self,
        per_row: Sequence[tuple[torch.Tensor, torch.Tensor] | None],
        strategy: str = "group",
    ):
        if strategy not in ("group", "gather"):
            raise ValueError(f"unknown strategy {strategy!r}; known: 'group', 'gather'")
        self.n_rows, self.strategy = len(per_row), strategy
        self.single = per_row[0] if all(f is per_row[0] for f in per_row) else None
        if self.single is not None:  # the common case, one adapter a request: nothing to plan
            return
        distinct: dict[int, tuple[tuple[torch.Tensor, torch.Tensor], list[int]]] = {}
        for i, f in enumerate(per_row):
            if f is not None:
                distinct.setdefault(id(f[0]), (f, []))[1].append(i)
        if not distinct:
            raise ValueError("no row has an update (routes gives such a projection None)")
        if len(distinct) == 1 and all(f is not None for f in per_row):
            self.single = next(iter(distinct.values()))[0]  # equal factors, other tuples
            return
        device = next(iter(distinct.values()))[0][0].device
        self.groups = [
            (torch.tensor(rows, device=device), A, B) for (A, B), rows in distinct.values()
        ]
        if strategy == "gather":
            some = self.groups[0]
            r = max(A.shape[0] for _, A, _ in self.groups)
            A_rows = some[1].new_zeros(self.n_rows, r, some[1].shape[1])  # (n, r, in)
            B_rows = some[2].new_zeros(self.n_rows, some[2].shape[0], r)  # (n, out, r)
            for idx, A, B in self.groups:
                A_rows[idx, : A.shape[0]] = A
                B_rows[idx, :, : A.shape[0]] = B
            self.A_rows, self.B_rows = A_rows, B_rows

    def add(self, x: torch.Tensor, y: torch.Tensor, rows: slice | None) -> torch.Tensor:
        """y (the base's output for x, any dtype) plus each row's update; y may be updated
        in place (it is the base's fresh output). The add is fused into the second matmul
        (``addmm`` / ``baddbmm``) where y has the factors' dtype."""
        if self.single is not None:
            A, B = self.single
            B = B if rows is None else B[rows]
            h = F.linear(x.to(A.dtype), A)  # (..., r)
            if y.dtype != h.dtype:  # the int4 kernel answers in bf16
                return y + F.linear(h, B).to(y.dtype)
            out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), B.t())
            return out.view(y.shape)
        if x.shape[0] != self.n_rows:
            raise ValueError(
                f"a batch mixing adapters needs one input row per batch row ({self.n_rows}), "
                f"not {x.shape[0]}: run shared prompt prefixes per adapter"
            )
        if self.strategy == "gather":
            A_rows = self.A_rows.to(x.device)
            B_rows = self.B_rows if rows is None else self.B_rows[:, rows]
            h = torch.bmm(x.reshape(self.n_rows, -1, x.shape[-1]).to(A_rows.dtype), A_rows.mT)
            if y.dtype != h.dtype:
                return y + torch.bmm(h, B_rows.mT).view(y.shape).to(y.dtype)
            y3 = y.reshape(self.n_rows, -1, y.shape[-1])  # (n, tokens, out)
            return torch.baddbmm(y3, h, B_rows.mT).view(y.shape)
        for idx, A, B in self.groups:
            B = B if rows is None else B[rows]
            d = F.linear(F.linear(x.index_select(0, idx).to(A.dtype), A), B)
            y.index_add_(0, idx, d.to(y.dtype))
        return y


_ROUTES: contextvars.ContextVar[dict[int, RowDeltas | None] | None] = contextvars.ContextVar(
    "lora_routes", default=None
)


@contextlib.contextmanager
def routed(routes: dict[LoRALinear, RowDeltas | None]) -> Iterator[None]:
    """Inside the block, in this thread (or task) only, each wrapper in ``routes`` computes
    its base and the given rows' updates (None: the base alone) instead of its own adapter.
    Other threads running the same model are unaffected, so concurrent requests for
    different adapters share one base without a lock."""
    token = _ROUTES.set({id(m): deltas for m, deltas in routes.items()})
    try:
        yield
    finally:
        _ROUTES.reset(token)
