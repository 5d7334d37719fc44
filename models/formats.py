"""Foreign weight formats: GGUF files and Hugging Face Llama directories, read into AFM state
dicts and imported as EvalHub checkpoints (``import_checkpoint``), and AFM written back as a
Llama directory.

GGUF weights are read with the ``gguf`` package (``GGUFReader`` memory-maps the file and
``gguf.quants.dequantize`` expands Q4_0/Q4_1/Q8_0/K-quants to fp32): about a second for
SmolLM2-135M, against ~16 s for transformers' GGUF path, which also needs ``accelerate`` and
builds a whole model we would throw away.

A GGUF file's tokenizer goes through transformers' GGUF tokenizer converter: rebuilding a
byte-level BPE (pre-tokenizer regexes, added tokens, chat template) by hand is where subtle
bugs live, and it needs no model.

llama.cpp's converter permutes the rows of q and k so that RoPE rotates interleaved pairs;
this model rotates halves (Hugging Face layout), so ``unpermute_qk`` undoes it. The SmolLM2
parity test against transformers checks this on real weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from models.afm import AFM, AFMConfig
from models.checkpoint import (
    CONFIG,
    FORMAT,
    WEIGHTS,
    CheckpointError,
    copy_tokenizer,
    load_checkpoint,
    read_safetensors,
    save_checkpoint,
    sha256_file,
    utc_now,
)


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


def read_gguf(src: Path, progress: bool):
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
def read_hf_config(src: Path) -> AFMConfig:
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


def read_hf_state_dict(src: Path, cfg: AFMConfig) -> dict[str, torch.Tensor]:
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
    """transformers' ``LlamaConfig`` fields for an AFM without q/k norms (what ``read_hf_config``
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
    projections split: the inverse of ``read_hf_state_dict``. With it, a model we trained or an
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


# ------------------------------------------------------------------------------ import
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
            cfg, sd = read_gguf(src, progress)
            digest = sha256_file(src)
        else:
            cfg = read_hf_config(src)
            sd = read_hf_state_dict(src, cfg)
            # A directory's digest: sha256 over the sorted per-file digests of its weights.
            digest = hashlib.sha256(
                b"".join(sha256_file(f).encode() for f in sorted(src.glob("*.safetensors")))
            ).hexdigest()
        steps.update()
        provenance = {
            "source": str(src),
            "source_format": kind,
            "source_sha256": digest,
            "imported_at": utc_now(),
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
