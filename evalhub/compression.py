"""Compression jobs: palettize a registered model (k-means tables per 16 output channels, AFM
2024 §5), calibrated on real text, measured against its parent on held-out text, saved as a
small checkpoint and registered as a model compressed from its parent, with the suites queued
on it. The maths is in ``models/palettize.py``; this module picks the text, calls it, stores
the per-layer table and the quality figures the compression page shows. Then the adapters
AFM puts on a compressed model: ``adapter.recovery`` (distilled from the original) and
``adapter.train`` (a task adapter by SFT, started from the recovery adapter or fresh), both
served on their base through ``evalhub.registry.backend_for``.

Text: AlpacaEval's GPT-4 answers in the chat template (real, varied, and none of them an
evaluation prompt of ours); the first ``calib_seqs`` rows calibrate, rows from the end of
the file measure, so the two never overlap.
"""

import hashlib
import json
import shutil
import time
from pathlib import Path

from django.conf import settings

from core.jobs import JobError
from core.models import Job
from evalhub.models import ModelVersion
from evalhub.posttrain import Curves, policy_param, queue_suites, suites_param

DEFAULTS = {"bits": 4, "embedding_bits": 4, "calib_seqs": 16, "eval_seqs": 8, "max_len": 384}


def text_sequences(tokenizer, rows: list[dict], max_len: int) -> list[tuple[list[int], int]]:
    """(token ids, index of the first answer token) per row: the instruction as one user
    turn in the chat template, then the answer, cut at ``max_len`` tokens."""
    out = []
    for row in rows:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}])
        ids = tokenizer.encode(prompt)
        out.append(((ids + tokenizer.encode(row["response"]))[:max_len], len(ids)))
    return out


def run_compress(job: Job) -> dict:
    """The body of the ``compress`` job: uniform ``bits`` (with ``layer_bits`` overrides), or
    with ``target_bpw`` AFM's mixed 2/4-bit allocation by measured sensitivity."""
    import torch

    from models.checkpoint import load_checkpoint, save_palettized
    from models.compress import calibrate, distribution_gap
    from models.palettize import palettize_model, scheme
    from models.tokenizer import load_tokenizer
    from models.train import pack_completions
    from suites.prompts import alpaca_eval_singles

    p = {**DEFAULTS, **job.params}
    parent = policy_param(p, "model_id")
    suites = suites_param(p)
    bits, emb_bits = int(p["bits"]), p["embedding_bits"]
    layer_bits = p.get("layer_bits") or {}
    target = p.get("target_bpw")
    if bits not in (2, 4) or (emb_bits is not None and int(emb_bits) not in (2, 4, 8)):
        raise JobError("'bits' must be 2 or 4 and 'embedding_bits' 2, 4, 8 or null")
    if not isinstance(layer_bits, dict) or any(v not in (2, 4) for v in layer_bits.values()):
        raise JobError("'layer_bits' must map projection names to 2 or 4")
    if target is not None and not 2.0 <= float(target) <= 4.5:
        raise JobError("'target_bpw' must be between 2 and 4.5 bits per weight")
    tokenizer = load_tokenizer(parent.location)
    rows = list(alpaca_eval_singles())
    n_calib, n_eval = int(p["calib_seqs"]), int(p["eval_seqs"])
    if n_calib < 1 or n_eval < 1 or n_calib + n_eval > len(rows):
        raise JobError(f"'calib_seqs' + 'eval_seqs' must be between 2 and {len(rows)}")
    model = load_checkpoint(parent.location)
    max_len = min(int(p["max_len"]), model.cfg.max_seq_len)
    calib = text_sequences(tokenizer, rows[:n_calib], max_len)
    held_out = [
        pack_completions([(t[:start], t[start:])])[:2]
        for t, start in text_sequences(tokenizer, rows[-n_eval:], max_len)
    ]
    calib_hash = hashlib.sha256(json.dumps([t for t, _ in calib]).encode()).hexdigest()

    job.report(0.05, f"calibrating on {len(calib)} sequences")
    start = time.perf_counter()
    # the head's statistics only palettize a tied embedding: skip them when it stays dense
    head = target is not None or emb_bits is not None
    calibration = calibrate(model, [torch.tensor([t]) for t, _ in calib], head=head)
    sensitivity = None
    if target is None:
        job.report(0.2, "palettizing")
        try:
            reports = palettize_model(
                model,
                {name: int(b) for name, b in layer_bits.items()},
                default_bits=bits,
                embedding_bits=int(emb_bits) if emb_bits is not None else None,
                calibration=calibration,
            )
        except KeyError as exc:
            raise JobError(f"'layer_bits': {exc.args[0]}") from None
    else:
        model, reports, sensitivity = _mixed(job, model, calib, calibration, float(target))
    seconds = time.perf_counter() - start
    job.report(0.85, "measuring against the original on held-out text")
    gap = distribution_gap(load_checkpoint(parent.location), model, held_out)
    quality = {k: round(v, 5) for k, v in gap.items()}
    weights = {**scheme(reports), "calibration_sha256": calib_hash}
    name = p.get("name") or f"{parent.name}-pal{weights['bpw']:.2f}-job{job.pk}"
    dst = Path(settings.MEDIA_ROOT) / "checkpoints" / name
    save_palettized(dst, model, weights, parent.location)
    info = {
        "compression": {
            "scheme": {k: v for k, v in weights.items() if k != "layers"},
            "layers": [r.to_dict() for r in reports],
            "sensitivity": sensitivity,
            "target_bpw": target,
            "quality": quality,
            "seconds": round(seconds, 2),
            "calibration": {"source": "alpaca-eval answers", "sequences": len(calib)},
            "job_id": job.pk,
        },
        "config": parent.info.get("config"),
    }
    version = _register(job, parent, name, dst, info)
    runs = queue_suites(version, suites, p.get("eval_limit"), job)
    return {
        "model_id": version.pk,
        "name": name,
        "bits_per_weight": weights["bpw"],
        "quality": quality,
        "eval_runs": runs,
    }


def _mixed(job: Job, model, calib, calibration, target: float):
    """AFM's allocation: every palettizable tensor (embedding included) at 4 and 2 bits, the
    KL cost of each one alone at 2 bits, and the cheapest set of 2-bit layers reaching
    ``target`` bits per weight (an exact knapsack). Returns (model, reports, table rows)."""
    import torch

    from models.compress import assemble, choose_bits, layer_sensitivity, palettize_variants

    job.report(0.15, "palettizing at 4 and 2 bits")
    variants = palettize_variants(model, (4, 2), embedding=True, calibration=calibration)
    length = min(128, *(len(t) for t, _ in calib))
    ids = torch.tensor([t[:length] for t, _ in calib[:8]])

    def progress(done: int, total: int, row) -> None:
        job.report(0.2 + 0.6 * done / max(total, 1), f"sensitivity {done}/{total}: {row.name}")

    table = layer_sensitivity(model, ids, embedding=True, variants=variants, progress=progress)
    allocation = choose_bits(table, target)
    mixed = assemble(variants, allocation.bits)
    reports = [variants[allocation.bits.get(r.name, 4)].reports[r.name] for r in table]
    rows = [{**r.to_dict(), "chosen": allocation.bits.get(r.name, 4)} for r in table]
    return mixed, reports, {"layers": rows, "predicted_kl": allocation.kl}


def _register(job: Job, parent: ModelVersion, name: str, path: Path, info: dict):
    from evalhub.registry import checkpoint_stats, model_register_child

    stats = checkpoint_stats(path)
    stats["bits_per_weight"] = info["compression"]["scheme"]["bpw"]  # tables counted exactly
    return model_register_child(
        parent=parent,
        name=name,
        location=path,
        relation=ModelVersion.COMPRESSED,
        info=info,
        description=f"{parent.name} palettized (job {job.pk})",
        user=job.created_by,
        **stats,
    )


def compression_table(model: ModelVersion) -> list[dict]:
    """The page's comparison: the model and every model compressed from it, with bits per
    weight, size, quality against the original and the suites' headline scores."""
    from evalhub.leaderboard import latest_scores

    rows = [
        model,
        *model.children.filter(relation=ModelVersion.COMPRESSED).order_by("bits_per_weight"),
    ]
    scores = latest_scores([m.pk for m in rows])
    return [
        {
            "model": m,
            "bpw": m.bits_per_weight,
            "size": m.size_bytes,
            "quality": (m.info.get("compression") or {}).get("quality"),
            "scores": scores.get(m.pk, {}),
        }
        for m in rows
    ]


# lr 1e-3 and the error init: benchmarks/palettize_recovery.py (1e-4 barely moved the KL)
RECOVERY_DEFAULTS = {
    "rank": 16,
    "steps": 50,
    "lr": 1e-3,
    "batch_size": 4,
    "train_seqs": 64,
    "init": "error",
}


def run_recovery(job: Job) -> dict:
    """The body of ``adapter.recovery``: a rank-16 LoRA adapter on a compressed model, trained
    by distillation from the model it was compressed from (AFM §5), registered as an adapter
    of it and served as the compressed base plus the adapter (``BuiltinBackend(adapter=)``)."""
    from models.checkpoint import load_checkpoint
    from models.compress import calibrate, distribution_gap
    from models.lora import save_adapter
    from models.recovery import train_recovery_adapter
    from models.tokenizer import load_tokenizer
    from models.train import TrainConfig, pack_completions
    from suites.prompts import alpaca_eval_singles

    p = {**DEFAULTS, **RECOVERY_DEFAULTS, **job.params}
    base = policy_param(p, "model_id")
    original = base.parent
    if base.relation != ModelVersion.COMPRESSED or original is None:
        raise JobError("'model_id' must name a compressed model (its parent is the teacher)")
    suites = suites_param(p)
    rank, steps = int(p["rank"]), int(p["steps"])
    if rank not in (8, 16, 32, 64) or steps < 1:
        raise JobError("'rank' must be 8, 16, 32 or 64 and 'steps' at least 1")
    tokenizer = load_tokenizer(base.location)
    compressed, teacher = load_checkpoint(base.location), load_checkpoint(original.location)
    max_len = min(int(p["max_len"]), compressed.cfg.max_seq_len)
    rows = list(alpaca_eval_singles())
    n_train, n_eval = int(p["train_seqs"]), int(p["eval_seqs"])
    if n_train < 1 or n_eval < 1 or n_train + n_eval > len(rows):
        raise JobError(f"'train_seqs' + 'eval_seqs' must be between 2 and {len(rows)}")

    def batches(part: list[dict]):
        return [
            pack_completions([(t[:start], t[start:])])[:2]
            for t, start in text_sequences(tokenizer, part, max_len)
        ]

    train_text, held_out = batches(rows[:n_train]), batches(rows[-n_eval:])
    before = distribution_gap(teacher, compressed, held_out)
    curves = Curves(job)
    config = TrainConfig(
        lr=float(p["lr"]),
        batch_size=int(p["batch_size"]),
        epochs=max(1, -(-steps * int(p["batch_size"]) // len(train_text))),
        max_steps=steps,
        warmup_ratio=0.05,
        weight_decay=0.0,
        seed=int(p.get("seed", 0)),
        device=p.get("device"),
    )
    init = p["init"]
    if init not in ("error", "zero"):
        raise JobError("'init' must be 'error' or 'zero'")
    # the error init weighs each layer's error by its inputs on the training text
    calibration = (
        calibrate(teacher, [ids for ids, _ in train_text], gradients=False, head=False)
        if init == "error"
        else None
    )
    recovery = train_recovery_adapter(
        compressed,
        teacher,
        train_text,
        config,
        rank,
        init=init,
        calibration=calibration,
        progress=curves.update,
    )
    curves.flush()
    after = distribution_gap(teacher, compressed, held_out)
    name = p.get("name") or f"{base.name}-recovery-r{rank}-job{job.pk}"
    dst = Path(settings.MEDIA_ROOT) / "adapters" / name
    save_adapter(compressed, dst, base_model_name_or_path=original.name)
    quality = {
        "before": {k: round(v, 5) for k, v in before.items()},
        "after": {k: round(v, 5) for k, v in after.items()},
        "recovered": round(1 - after["kl"] / before["kl"], 4) if before["kl"] else None,
    }
    info = {
        "adapter": {
            "kind": "recovery",
            "rank": rank,
            "init": init,
            "bytes_16bit": recovery.adapter_bytes,
            "steps": recovery.state.step,
            "teacher": original.name,
            "quality": quality,
            "job_id": job.pk,
        },
        "config": base.info.get("config"),
    }
    from evalhub.registry import model_register_child

    version = model_register_child(
        parent=base,
        name=name,
        location=base.location,
        relation=ModelVersion.ADAPTED,
        info=info,
        description=f"rank-{rank} recovery adapter of {base.name} (job {job.pk})",
        user=job.created_by,
        kind=ModelVersion.ADAPTER,
        params={"adapter": str(dst)},
        size_bytes=recovery.adapter_bytes,
    )
    runs = queue_suites(version, suites, p.get("eval_limit"), job)
    return {"model_id": version.pk, "name": name, "quality": quality, "eval_runs": runs}


TASK_DEFAULTS = {"rank": 16, "max_len": 512, "batch_size": 4}


def run_task_adapter(job: Job) -> dict:
    """The body of ``adapter.train``: a task adapter fine-tuned by SFT (the post-training
    jobs' data: campaigns' chosen responses, a JSONL file or a prompt set), starting from an
    adapter (``model_id`` names one: its weights, rank and base) or fresh on a policy
    (``model_id`` names one: rank ``rank``, α 2·rank), as AFM starts product adapters from
    the recovery adapter (arXiv:2407.21075 §5). Saved adapter-only in PEFT's layout at 16
    bits, registered as an adapter served on its base, with the adapter it started from as
    its parent."""
    import torch

    from evalhub.posttrain import Session, _default_lr, _hash, conversations_from, training_params
    from models.lora import apply_lora, load_adapter, save_adapter
    from models.posttrain.sft import train_sft
    from models.recovery import ADAPTER_DTYPE, adapter_bytes
    from models.train import TrainConfig

    p = {**TASK_DEFAULTS, **job.params}
    init, base = _task_start(p.get("model_id"))
    hp, suites = training_params({**p, "lora_rank": 0}), suites_param(p)
    rank = int(p["rank"])
    if init is None and rank not in (8, 16, 32, 64):
        raise JobError("'rank' must be 8, 16, 32 or 64")
    data, source = conversations_from(p)
    if len(data) < 2:
        raise JobError(f"only {len(data)} training examples; at least 2 are needed")
    session = Session(job, base, hp)
    if init is not None:
        wrappers = load_adapter(session.model, init.params["adapter"])
    else:
        wrappers = apply_lora(session.model, rank, 2.0 * rank, seed=hp["seed"])
    rank = max(w.rank for w in wrappers)
    config = TrainConfig(
        lr=hp["lr"] if hp["lr"] is not None else _default_lr("sft", rank),
        epochs=hp["epochs"],
        batch_size=hp["batch_size"],
        accumulation=hp["accumulation"],
        max_steps=hp["max_steps"],
        seed=hp["seed"],
        checkpoint_every=int(p.get("checkpoint_every", 50)),
        checkpoint_dir=str(session.work / "state"),
        device=p.get("device"),
    )
    try:
        result = train_sft(
            session.model,
            data,
            session.tokenizer,
            config,
            session.curves.update,
            max_len=min(hp["max_len"], session.model.cfg.max_seq_len),
            resume_from=session.resume_from(),
        )
    except ValueError as exc:  # e.g. every assistant turn cut away by max_len
        raise JobError(str(exc)) from exc
    session.curves.flush()
    session.model.cpu()
    with torch.no_grad():
        for m in wrappers:  # 16-bit adapters, as AFM ships them
            m.lora_A.copy_(m.lora_A.to(ADAPTER_DTYPE))
            m.lora_B.copy_(m.lora_B.to(ADAPTER_DTYPE))
    name = p.get("name") or f"{base.name}-task-r{rank}-job{job.pk}"
    dst = Path(settings.MEDIA_ROOT) / "adapters" / name
    save_adapter(session.model, dst, base_model_name_or_path=base.name)
    info = {
        "adapter": {
            "kind": "task",
            "rank": rank,
            "bytes_16bit": adapter_bytes(wrappers),
            "steps": result.step,
            "base": base.name,
            "init_from": init.name if init is not None else None,
            "data": source,
            "data_hash": _hash(data),
            "n_examples": len(data),
            "hyperparameters": {**hp, "lr": config.lr, "rank": rank},
            "metrics": result.metrics,
            "job_id": job.pk,
        },
        "config": base.info.get("config"),
    }
    version = _register_adapter(job, base, init, name, dst, info)
    runs = queue_suites(version, suites, p.get("eval_limit"), job)
    shutil.rmtree(session.work, ignore_errors=True)
    return {"model_id": version.pk, "name": name, "steps": result.step, "eval_runs": runs}


def _task_start(model_id) -> tuple[ModelVersion | None, ModelVersion]:
    """(adapter to start from or None, base policy) for an ``adapter.train`` job's model."""
    start = ModelVersion.objects.filter(pk=model_id).first()
    if start is not None and start.kind == ModelVersion.ADAPTER and start.params.get("adapter"):
        base = start.parent
        while base is not None and base.kind == ModelVersion.ADAPTER:
            base = base.parent  # a task adapter trained from a task adapter, and so on
        if base is not None and base.backend == "builtin" and base.location == start.location:
            return start, base
    return None, policy_param({"model_id": model_id}, "model_id")


def _register_adapter(job: Job, base, init, name: str, path: Path, info: dict) -> ModelVersion:
    from evalhub.registry import model_register_child

    started = f", from {init.name}" if init is not None else ""
    return model_register_child(
        parent=init or base,
        name=name,
        location=base.location,
        relation=ModelVersion.TRAINED if init is not None else ModelVersion.ADAPTED,
        info=info,
        description=f"rank-{info['adapter']['rank']} task adapter of {base.name}{started} "
        f"(job {job.pk})",
        user=job.created_by,
        kind=ModelVersion.ADAPTER,
        params={"adapter": str(path)},
        size_bytes=info["adapter"]["bytes_16bit"],
    )
