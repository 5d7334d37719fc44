"""Reward models from grading labels: build the preference data, train as a job, register the
result with lineage, and load registered reward models for scoring and reranking.
The maths is in ``models/reward.py``."""

from pathlib import Path

from django.conf import settings
from django.db import transaction

from core.jobs import JobError
from core.models import Job
from evalhub.models import ModelVersion
from evalhub.registry import LOADED
from grading.exports import preferences_from_campaigns


def train_reward_job(job: Job, params: dict | None = None) -> dict:
    """Train and register a reward model; ``params`` default to the job's own (an iTeC round
    passes its retraining parameters instead)."""
    from models.preferences import labels_hash, load_preferences_jsonl, split_by_prompt
    from models.reward import evaluate_reward_model, save_reward_model, train_reward_model
    from models.reward_backbones import decoder_backbone, minilm_backbone

    p = job.params if params is None else params
    if p.get("campaign_ids"):
        prefs = preferences_from_campaigns([int(i) for i in p["campaign_ids"]])
    elif p.get("jsonl"):
        prefs = load_preferences_jsonl(p["jsonl"])
    else:
        raise JobError("give 'campaign_ids' or a 'jsonl' path of preference pairs")
    if len(prefs) < 10:
        raise JobError(f"only {len(prefs)} preference pairs; at least 10 are needed")
    train, held_out = split_by_prompt(
        prefs, held_out=float(p.get("held_out", 0.2)), seed=int(p.get("seed", 0))
    )
    parent = None
    if p.get("backbone_model"):
        parent = ModelVersion.objects.get(pk=p["backbone_model"])
        backbone = decoder_backbone(parent.location, **p.get("backbone_params", {}))
    else:
        backbone = minilm_backbone()
    curve = {"step": [], "loss": []}

    def progress(step: int, total: int, loss: float) -> None:
        curve["step"].append(step)
        curve["loss"].append(round(float(loss), 5))
        if step % max(1, total // 50) == 0 or step == total:
            job.set_data(loss_curve=curve)
            job.report(step / max(total, 1), f"step {step}/{total} loss {loss:.4f}")

    model, report = train_reward_model(
        train,
        held_out,
        backbone,
        loss=p.get("loss", "soft"),
        epochs=int(p.get("epochs", 3)),
        lr=float(p["lr"]) if p.get("lr") is not None else None,  # None: by backbone
        batch_size=int(p.get("batch_size", 32)),
        aspect_weight=float(p.get("aspect_weight", 0.1)),
        seed=int(p.get("seed", 0)),
        progress=progress,
    )
    metrics = evaluate_reward_model(model, held_out) if held_out else {}
    name = p.get("name") or f"reward-job{job.pk}"
    path = Path(settings.MEDIA_ROOT) / "checkpoints" / name
    save_reward_model(model, path, report)
    with transaction.atomic():
        version, _ = ModelVersion.objects.update_or_create(
            name=name,
            defaults=dict(
                kind=ModelVersion.REWARD,
                backend="reward",
                location=str(path),
                relation=ModelVersion.TRAINED if parent else "",
                parent=parent,
                created_by=job.created_by,
                info={
                    "metrics": metrics,
                    "labels_hash": labels_hash(prefs),
                    "n_train": len(train),
                    "n_held_out": len(held_out),
                    "soft_targets": model.soft_targets,
                    "loss": report.loss,
                    "campaign_ids": p.get("campaign_ids", []),
                    "backbone": backbone.reference(),
                },
            ),
        )
    return {
        "model_id": version.pk,
        "name": name,
        "metrics": metrics,
        "labels_hash": version.info["labels_hash"],
    }


def reward_model_for(version: ModelVersion):
    """A loaded reward model for a registered one, from the process's model cache."""
    from models.reward import load_reward_model

    if version.kind != ModelVersion.REWARD:
        raise ValueError(f"{version.name} is not a reward model")
    return LOADED.get(
        ("reward", version.pk, version.location), lambda: load_reward_model(version.location)
    )
