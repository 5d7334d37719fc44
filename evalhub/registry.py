"""The model registry's writes and the process's one cache of loaded models (``LOADED``:
generation backends here, reward models in ``evalhub/rewards.py``), with its sibling for
LoRA adapters served on those models (``ADAPTERS``).

Views, tasks and commands call these; the model code itself lives in ``models/``.
"""

from pathlib import Path

from django.conf import settings
from django.db import transaction

from evalhub.models import ModelVersion
from models.adapters import AdapterCache
from models.backends import Backend, load_backend
from models.cache import ModelCache
from models.checkpoint import SMOLLM2_NAME, smollm2_gguf  # noqa: F401 (bootstrap's imports)

LOADED = ModelCache(settings.MODEL_CACHE_BYTES)
ADAPTERS = AdapterCache(settings.ADAPTER_CACHE_BYTES)


def checkpoint_stats(path: Path) -> dict:
    """Parameter count, bytes on disk and bits per weight of a checkpoint directory."""
    from safetensors import safe_open

    weights = path / "model.safetensors"
    n = 0
    with safe_open(weights, framework="pt") as f:
        for key in f.keys():
            shape = f.get_slice(key).get_shape()
            count = 1
            for dim in shape:
                count *= dim
            n += count
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return {
        "n_params": n,
        "size_bytes": size,
        "bits_per_weight": round(weights.stat().st_size * 8 / n, 3) if n else None,
    }


def model_import(
    *, src: str | Path, name: str, user=None, progress: bool = False, description: str = ""
) -> ModelVersion:
    """Import a GGUF file or Hugging Face directory as an EvalHub checkpoint and register it."""
    from models.checkpoint import read_config
    from models.formats import import_checkpoint

    if ModelVersion.objects.filter(name=name).exists():
        raise ValueError(f"a model named {name!r} is already registered")
    dst = Path(settings.MEDIA_ROOT) / "checkpoints" / name
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not (dst / "config.json").exists():
        # import_checkpoint publishes by renaming a finished directory, so one that exists is
        # complete: a job redelivered after a crash registers it instead of importing again.
        import_checkpoint(src, dst, progress=progress)
    _, meta = read_config(dst)
    with transaction.atomic():
        return ModelVersion.objects.create(
            name=name,
            backend="builtin",
            location=str(dst),
            relation=ModelVersion.IMPORTED,
            source=str(src),
            info={"config": meta.get("model"), "provenance": meta.get("provenance")},
            created_by=user,
            description=description,
            **checkpoint_stats(dst),
        )


def model_register_child(
    *,
    parent: ModelVersion | None,
    name: str,
    location: str | Path,
    relation: str,
    info: dict,
    description: str,
    user=None,
    kind: str = ModelVersion.POLICY,
    backend: str = "builtin",
    params: dict | None = None,
    **stats,
) -> ModelVersion:
    """Register what a job made from ``parent`` (trained, compressed, an adapter, a reward
    model) under ``name``; a redelivered job updates its own row instead of failing.
    ``stats``: n_params, size_bytes, bits_per_weight (default: read from a checkpoint
    directory at ``location`` when it has model.safetensors)."""
    if not stats and (Path(location) / "model.safetensors").is_file():
        stats = checkpoint_stats(Path(location))
    with transaction.atomic():
        version, _ = ModelVersion.objects.update_or_create(
            name=name,
            defaults=dict(
                kind=kind,
                backend=backend,
                location=str(location),
                params=params or {},
                relation=relation if parent is not None else "",
                parent=parent,
                created_by=user,
                description=description,
                info=info,
                **stats,
            ),
        )
    return version


def backend_for(model: ModelVersion) -> Backend:
    """A loaded backend for a registered model, from the process's model cache. A builtin
    model with an ``adapter`` parameter (kind adapter) is a view over its base's backend,
    the adapter taken from ``ADAPTERS`` per call: every adapter of one base, and the base
    itself, share one loaded copy of it.

    With ``settings.JOBS_USE_INFERENCE_SERVER``, built-in models are not loaded here at all:
    the backend sends every call to the inference server (``evalhub.inference``)."""
    if settings.JOBS_USE_INFERENCE_SERVER and model.backend == "builtin":
        from evalhub.inference import server_backend

        return server_backend(model)
    params = dict(model.params)
    builtin = model.backend == "builtin"
    adapter = params.pop("adapter", None) if builtin else None
    extra = {"adapter_cache": ADAPTERS} if builtin else {}
    key = ("backend", model.backend, model.location, repr(sorted(params.items())))
    backend = LOADED.get(
        key, lambda: load_backend(model.backend, model.location, **params, **extra)
    )
    return backend.with_adapter(adapter) if adapter else backend  # type: ignore[attr-defined]
