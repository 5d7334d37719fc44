"""Checkpoint import/load: round trips, self-describing configs (v2; v1 still loads), Hugging
Face parity on a tiny Llama, damaged files."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from models.afm import AFM, config_from_preset
from models.checkpoint import (
    CheckpointError,
    load_checkpoint,
    privatize_,
    read_config,
    save_checkpoint,
    sha256_file,
    source_commit,
)
from models.formats import import_checkpoint, unpermute_qk
from models.linear import TiedHead


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_model):
    return save_checkpoint(
        tmp_path / "tiny", tiny_model.cfg, tiny_model.state_dict(), {"source": "test"}
    )


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (LlamaModel.permute)."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.random.default_rng(0).standard_normal((3 * 64, 40)).astype(np.float32)
    back = unpermute_qk(llama_cpp_permute(w, 3), 3)
    np.testing.assert_array_equal(back, w)
    assert not np.array_equal(llama_cpp_permute(w, 3), w)


def test_saved_checkpoint_loads_back_to_the_same_model(tiny_checkpoint, tiny_model):
    loaded = load_checkpoint(tiny_checkpoint)
    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), tiny_model(x), rtol=0, atol=0)


def test_a_saved_checkpoint_says_what_it_is_and_where_it_came_from(tiny_checkpoint, tmp_path):
    meta = json.loads((tiny_checkpoint / "config.json").read_text())
    assert meta["version"] == 2 and meta["provenance"] == {"source": "test"}
    digest = sha256_file(tiny_checkpoint / "model.safetensors")
    assert meta["weights"] == {"kind": "dense", "sha256": digest}
    assert (meta["step"], meta["metrics"], meta["parent"]) == (None, {}, None)
    assert meta["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert set(meta["packages"]) == {"torch", "transformers", "evalhub"}
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True
    )
    assert meta["source_commit"] == (head.stdout.strip() if head.returncode == 0 else None)

    cfg, _ = read_config(tiny_checkpoint)
    trained = load_checkpoint(tiny_checkpoint).state_dict()
    child = save_checkpoint(
        tmp_path / "child",
        cfg,
        trained,
        {"source": "sft"},
        step=120,
        metrics={"loss": 1.25},
        parent=tiny_checkpoint,
    )
    _, child_meta = read_config(child)
    assert child_meta["step"] == 120 and child_meta["metrics"] == {"loss": 1.25}
    assert child_meta["parent"] == {"path": str(tiny_checkpoint.resolve()), "sha256": digest}


def test_the_source_commit_is_none_without_git(monkeypatch):
    monkeypatch.setenv("PATH", "")
    assert source_commit() is None


def test_a_version_1_checkpoint_still_loads(tiny_checkpoint, tiny_model, tmp_path):
    config = tiny_checkpoint / "config.json"
    v1 = {
        "format": "evalhub-afm",
        "version": 1,
        "model": tiny_model.cfg.to_dict(),
        "provenance": {"source": "old.gguf", "source_format": "gguf"},
    }
    config.write_text(json.dumps(v1))
    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(tiny_checkpoint)(x), tiny_model(x))
    _, meta = read_config(tiny_checkpoint)
    assert meta["version"] == 1 and meta["weights"] == {"kind": "dense"}
    assert meta["parent"] is None and meta["provenance"]["source"] == "old.gguf"
    # A v1 parent records no weights hash: the child's config hashes the parent's file.
    child = save_checkpoint(
        tmp_path / "child", tiny_model.cfg, tiny_model.state_dict(), {}, parent=tiny_checkpoint
    )
    digest = sha256_file(tiny_checkpoint / "model.safetensors")
    assert read_config(child)[1]["parent"]["sha256"] == digest


def test_unknown_versions_and_weight_schemes_raise_checkpoint_errors(tiny_checkpoint):
    config = tiny_checkpoint / "config.json"
    meta = json.loads(config.read_text())
    config.write_text(json.dumps({**meta, "version": 3}))
    with pytest.raises(CheckpointError, match="unsupported checkpoint version 3"):
        load_checkpoint(tiny_checkpoint)
    palettized = {"kind": "palettized", "bits": 4, "group": 16}
    config.write_text(json.dumps({**meta, "weights": palettized}))
    with pytest.raises(CheckpointError, match="weight scheme"):
        load_checkpoint(tiny_checkpoint)


def test_truncated_weights_raise_a_checkpoint_error_naming_the_file(tiny_checkpoint):
    weights = tiny_checkpoint / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        load_checkpoint(tiny_checkpoint)
    weights.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tiny_checkpoint)


def test_garbage_weights_raise_a_checkpoint_error(tiny_checkpoint):
    weights = tiny_checkpoint / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(
        b"\x20\x00\x00\x00\x00\x00\x00\x00" + b"{not json at all}".ljust(size, b"!")
    )
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_checkpoint(tiny_checkpoint)


def test_corrupt_or_mismatched_config_raises_a_checkpoint_error(tiny_checkpoint):
    config = tiny_checkpoint / "config.json"
    meta = json.loads(config.read_text())
    config.write_text("{ broken")
    with pytest.raises(CheckpointError, match=r"config\.json.*corrupt JSON"):
        load_checkpoint(tiny_checkpoint)
    config.write_text(json.dumps({**meta, "model": {**meta["model"], "dim": 128}}))
    with pytest.raises(CheckpointError, match="does not match config.json"):
        load_checkpoint(tiny_checkpoint)
    config.write_text(json.dumps({**meta, "model": {**meta["model"], "n_experts": 2}}))
    with pytest.raises(CheckpointError, match="invalid model config"):
        load_checkpoint(tiny_checkpoint)


def test_missing_checkpoint_and_unknown_sources_raise_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "nowhere")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="neither a GGUF"):
        import_checkpoint(junk, tmp_path / "out", progress=False)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF" + b"\x00" * 7)
    with pytest.raises(CheckpointError, match="fake.gguf"):
        import_checkpoint(fake, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.fixture
def tiny_hf_llama(tmp_path):
    """A random tiny transformers Llama saved as a Hugging Face directory, with a word-level
    tokenizer (no download needed)."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=10_000.0,
        tie_word_embeddings=False,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config).eval()
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(61)])}
    raw = RawTokenizer(WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", model


def test_hugging_face_llama_imports_with_identical_logits(tiny_hf_llama, tmp_path):
    src, reference = tiny_hf_llama
    dst = import_checkpoint(src, tmp_path / "ours", progress=False)
    meta = json.loads((dst / "config.json").read_text())
    assert meta["provenance"]["source_format"] == "hf"
    assert len(meta["provenance"]["source_sha256"]) == 64
    assert (dst / "tokenizer.json").is_file()
    ours = load_checkpoint(dst)
    assert not isinstance(ours.lm_head, TiedHead)  # the tiny Llama has untied embeddings
    x = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(CheckpointError, match="already exists"):
        import_checkpoint(src, dst, progress=False)


def test_checkpoint_for_a_trained_from_scratch_model_has_no_head_when_tied(tmp_path):
    model = AFM(config_from_preset("tiny")).init_weights(seed=1)
    path = save_checkpoint(tmp_path / "new", model.cfg, model.state_dict(), {"source": "scratch"})
    assert "lm_head.weight" not in load_checkpoint(path).state_dict()


def test_an_exported_hugging_face_directory_reads_back_to_the_same_weights(tmp_path):
    """export_hf writes the Llama layout the importer reads: config and every tensor."""
    from models.formats import export_hf, read_hf_config, read_hf_state_dict

    model = AFM(config_from_preset("tiny", qk_norm=False)).init_weights(seed=3)
    exported = export_hf(model, tmp_path / "hf")
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 2
    assert read_hf_config(exported) == model.cfg
    back = read_hf_state_dict(exported, model.cfg)
    assert back.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(back[name], tensor), name


def test_privatize_copies_mapped_weights_once_leaving_the_file(tiny_checkpoint, tiny_model):
    model = load_checkpoint(tiny_checkpoint)
    weights = (tiny_checkpoint / "model.safetensors").read_bytes()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    assert privatize_(params) == len(params)  # every fp32 weight was mapped from the file
    assert privatize_(params) == 0  # now private: nothing left to copy
    assert privatize_(tiny_model.parameters()) == 0  # built in memory: never mapped
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    assert (tiny_checkpoint / "model.safetensors").read_bytes() == weights
    fresh = load_checkpoint(tiny_checkpoint)
    assert all(torch.equal(p, b) for p, b in zip(fresh.parameters(), before, strict=True))
