"""Post-training jobs: SFT and level-aware DPO/IPO on a registered model, from grading
campaigns or uploaded JSONL files. Each run resumes after a worker crash (the training loop's
checkpoints live in the job's own directory), draws its curves live on the job page, registers
the result as a ``ModelVersion`` trained from its parent with full lineage (algorithm,
hyper-parameters, data and label hashes), and queues the suites on it. The maths is in
``models/posttrain/``; this module loads rows, calls it and stores what it returns.
"""

import hashlib
import json
import shutil
from pathlib import Path

from django.conf import settings

from core.jobs import JobError
from core.models import Job
from evalhub.models import ModelVersion
from grading.exports import preferences_from_campaigns

ALGORITHMS = ("sft", "dpo", "ipo")
DEFAULT_SUITES = ("ifeval", "gsm8k", "mmlu")
# Job parameters that shape training, with their defaults; anything else in params is ignored
# by training (and kept on the job row as given).
TRAIN_DEFAULTS = {
    "lr": None,  # None: the algorithm's default (SFT 2e-5, DPO/IPO 5e-7 full / 5e-5 LoRA)
    "epochs": 1,
    "batch_size": 8,
    "accumulation": 1,
    "max_steps": None,
    "seed": 0,
    "lora_rank": 0,  # 0: full fine-tune
    "lora_alpha": None,  # None: twice the rank
    "beta": 0.1,  # DPO/IPO
    "level_aware": True,  # DPO/IPO: the level's soft target (False: hard labels, the baseline)
    "max_len": 1024,
}
BOOLS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False}


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def training_params(params: dict) -> dict:
    """The training hyper-parameters of a job: defaults overridden by params, type-checked.
    Raises JobError naming the bad field."""
    out = {}
    for name, default in TRAIN_DEFAULTS.items():
        value = params.get(name, default)
        kind = {"lr": float, "lora_alpha": float, "max_steps": int}.get(name, type(default))
        if value is None:
            out[name] = None
        elif kind is bool:
            if not isinstance(value, bool) and str(value).lower() not in BOOLS:
                raise JobError(f"parameter {name!r}: {value!r} is not true or false")
            out[name] = value if isinstance(value, bool) else BOOLS[str(value).lower()]
        else:
            try:
                out[name] = kind(value)
            except (TypeError, ValueError):
                raise JobError(f"parameter {name!r}: {value!r} is not a {kind.__name__}") from None
    for name in ("epochs", "batch_size", "accumulation", "max_len"):
        if out[name] < 1:
            raise JobError(f"parameter {name!r} must be at least 1")
    if out["lora_rank"] < 0:
        raise JobError("parameter 'lora_rank' must be 0 (full fine-tune) or positive")
    if out["lr"] is not None and not 0 < out["lr"] < 1:
        raise JobError("parameter 'lr' must be between 0 and 1")
    return out


def suites_param(params: dict) -> list[str]:
    """The suites to run on the result (default IFEval, GSM8K, MMLU; ``[]`` for none)."""
    from suites import REGISTRY

    names = params.get("suites", list(DEFAULT_SUITES))
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise JobError("parameter 'suites' must be a list of suite names")
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise JobError(f"unknown suites {unknown}; known: {', '.join(sorted(REGISTRY))}")
    return names


def conversations_from(params: dict) -> tuple[list[list[dict]], dict]:
    """SFT demonstrations: conversations from a JSONL file ({"messages": [...]} or TRL's
    prompt/completion per line), the chosen responses of side-by-side campaigns after each
    item's conversation (ties left out) or the prompt set "alpaca-eval"
    with its GPT-4 answers (the first ``limit``), and a description of the source for the
    lineage."""
    from models.posttrain.sft import demonstration, load_conversations_jsonl

    if params.get("jsonl"):
        conversations = load_conversations_jsonl(params["jsonl"])
        return conversations, {"jsonl": str(params["jsonl"])}
    if params.get("campaign_ids"):
        from models.preferences import labels_hash

        prefs = preferences_from_campaigns([int(i) for i in params["campaign_ids"]])
        seen, conversations = set(), []
        for p in prefs:  # the chosen response, trained after the conversation it answered
            chat = demonstration(p.context, p.prompt, p.chosen)
            key = json.dumps(chat)
            if p.tie or key in seen:
                continue
            seen.add(key)
            conversations.append(chat)
        source = {"campaign_ids": params["campaign_ids"], "labels_hash": labels_hash(prefs)}
        return conversations, source
    if params.get("source") == "alpaca-eval":
        from suites.prompts import alpaca_eval_singles

        limit = int(params.get("limit") or 256)
        conversations = [
            [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["response"]},
            ]
            for r in alpaca_eval_singles(limit)
        ]
        return conversations, {"source": "alpaca-eval", "limit": limit}
    raise JobError(
        "give 'campaign_ids' (side-by-side campaigns), a 'jsonl' path or 'source': 'alpaca-eval'"
    )


def preferences_from(params: dict) -> tuple[list, dict]:
    """DPO/IPO pairs with their levels, from campaigns or a preference JSONL file."""
    from models.preferences import labels_hash, load_preferences_jsonl

    if params.get("campaign_ids"):
        prefs = preferences_from_campaigns([int(i) for i in params["campaign_ids"]])
        source = {"campaign_ids": params["campaign_ids"]}
    elif params.get("jsonl"):
        prefs = load_preferences_jsonl(params["jsonl"])
        source = {"jsonl": str(params["jsonl"])}
    else:
        raise JobError("give 'campaign_ids' (side-by-side campaigns) or a 'jsonl' path")
    source["labels_hash"] = labels_hash(prefs)
    return prefs, source


def run_posttrain(job: Job, algorithm: str) -> dict:
    """The body of the ``posttrain.<algorithm>`` jobs."""
    p = job.params
    parent = policy_param(p, "model_id")
    hp, suites = training_params(p), suites_param(p)
    if algorithm == "sft":
        data, source = conversations_from(p)
    else:
        data, source = preferences_from(p)
    return train_and_register(job, parent, algorithm, data, source, hp, suites)


def policy_param(params: dict, key: str) -> ModelVersion:
    """The registered builtin policy model that ``params[key]`` names, or a JobError."""
    model = ModelVersion.objects.filter(pk=params.get(key)).first()
    if model is None or model.backend != "builtin" or model.kind != ModelVersion.POLICY:
        raise JobError(f"{key!r} must name a registered policy model with the builtin backend")
    return model


def train_and_register(
    job: Job,
    parent: ModelVersion,
    algorithm: str,
    data: list,
    source: dict,
    hp: dict,
    suites: list[str],
    *,
    label: str | None = None,
) -> dict:
    """Train ``parent`` on ``data`` (conversations for "sft", preferences for "dpo"/"ipo"),
    save the result next to the other checkpoints, register it with its lineage and queue
    ``suites`` on it. ``label`` names the recipe in the lineage when it is not the algorithm
    itself (an iTeC round trains by SFT)."""
    from models.train import TrainConfig

    if len(data) < 2:
        raise JobError(f"only {len(data)} training examples; at least 2 are needed")
    session = Session(job, parent, hp)
    config = TrainConfig(
        lr=hp["lr"] if hp["lr"] is not None else _default_lr(algorithm, hp["lora_rank"]),
        epochs=hp["epochs"],
        batch_size=hp["batch_size"],
        accumulation=hp["accumulation"],
        max_steps=hp["max_steps"],
        seed=hp["seed"],
        checkpoint_every=int(job.params.get("checkpoint_every", 50)),
        checkpoint_dir=str(session.work / "state"),
        device=job.params.get("device"),
    )
    if algorithm == "sft":
        from models.posttrain.sft import train_sft

        result = train_sft(
            session.model,
            data,
            session.tokenizer,
            config,
            max_len=hp["max_len"],
            progress=session.curves.update,
            resume_from=session.resume_from(),
        )
    else:
        from models.posttrain.dpo import DPOConfig, train_dpo

        dpo = DPOConfig(
            loss=algorithm,
            beta=hp["beta"],
            level_aware=hp["level_aware"],
            cache_dir=str(session.work / "reference"),
        )
        result = train_dpo(
            session.model,
            None,  # the reference: a frozen copy (full) or the base without adapters (LoRA)
            session.tokenizer,
            data,
            config,
            dpo,
            max_len=hp["max_len"],
            progress=session.curves.update,
            resume_from=session.resume_from(),
        )
    info = {
        "algorithm": label or algorithm,
        "trained_by": algorithm,
        "hyperparameters": {**hp, "lr": config.lr},
        "data": source,
        "data_hash": _hash(data if algorithm == "sft" else [vars(x) for x in data]),
        "n_examples": len(data),
    }
    return session.finish(result, info, suites)


class Session:
    """One training job's model and files: the parent loaded for training (with LoRA
    adapters when asked), its tokenizer, the job's work directory (resume state, caches), the
    live curves; ``finish`` saves, registers and queues the suites."""

    def __init__(self, job: Job, parent: ModelVersion, hp: dict):
        from models.checkpoint import CheckpointError, load_checkpoint, read_config

        self.job, self.parent, self.hp = job, parent, hp
        self.work = Path(settings.MEDIA_ROOT) / "train" / f"job{job.pk}"
        try:
            self.model = load_checkpoint(parent.location)
            _, self.parent_meta = read_config(parent.location)
        except CheckpointError as exc:
            raise JobError(str(exc)) from exc
        self.tokenizer = _tokenizer(parent.location)
        self.curves = Curves(job)
        if hp["lora_rank"]:
            from models.lora import apply_lora

            rank = hp["lora_rank"]
            apply_lora(self.model, rank=rank, alpha=hp["lora_alpha"] or 2 * rank)

    def resume_from(self):
        """The last checkpoint an earlier attempt of this job wrote, if any."""
        from models.train import latest_checkpoint

        state = self.work / "state"
        return latest_checkpoint(state) if state.exists() else None

    def finish(self, result, info: dict, suites: list[str]) -> dict:
        from models.checkpoint import copy_tokenizer, save_checkpoint

        self.curves.flush()
        if self.hp["lora_rank"]:
            from models.lora import merge_lora

            merge_lora(self.model)
        job, parent = self.job, self.parent
        name = job.params.get("name") or f"{parent.name}-{info['algorithm']}-job{job.pk}"
        dst = Path(settings.MEDIA_ROOT) / "checkpoints" / name
        info = {**info, "steps": result.step, "metrics": result.metrics, "job_id": job.pk}
        save_checkpoint(
            dst,
            self.model.cfg,
            self.model.state_dict(),
            {**self.parent_meta.get("provenance", {}), "posttrain": info},
            step=result.step,
            metrics=result.metrics,
            parent=parent.location,
        )
        copy_tokenizer(parent.location, dst)
        version = _register(job, parent, name, dst, info)
        runs = queue_suites(version, suites, job.params.get("eval_limit"), job)
        shutil.rmtree(self.work, ignore_errors=True)  # resume state is only needed until now
        return {"model_id": version.pk, "name": name, "steps": result.step, "eval_runs": runs}


class Curves:
    """Per-step training metrics kept on the job (``job.data["curves"]``: metric → {"step",
    "value"}) and the headline ``loss_curve``, written about 50 times a run so the job page's
    plots move while it trains without a database write per step."""

    def __init__(self, job: Job):
        self.job = job
        self.curves: dict[str, dict[str, list]] = dict(job.data.get("curves") or {})

    def update(self, step: int, total: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if key in ("examples",):
                continue
            curve = self.curves.setdefault(key, {"step": [], "value": []})
            curve["step"].append(step)
            curve["value"].append(round(float(value), 6))
        if step % max(1, total // 50) == 0 or step == total:
            loss = metrics.get("loss", float("nan"))
            self.flush()
            self.job.report(step / max(total, 1), f"step {step}/{total} loss {loss:.4f}")

    def flush(self) -> None:
        loss = self.curves.get("loss", {"step": [], "value": []})
        self.job.set_data(
            curves=self.curves, loss_curve={"step": loss["step"], "loss": loss["value"]}
        )


def _default_lr(algorithm: str, lora_rank: int) -> float:
    """Published defaults: SFT 2e-5 (Llama 2 §3.1); DPO 5e-7 for a full fine-tune (Rafailov et
    al. 2023, arXiv:2305.18290, App. B; Zephyr uses 5e-7 too); LoRA ranks take ~100× larger
    steps (Hu et al. 2021 use 2e-4 for GPT-2; 5e-5 for DPO adapters is TRL's example)."""
    if algorithm == "sft":
        return 2e-4 if lora_rank else 2e-5
    return 5e-5 if lora_rank else 5e-7


def _tokenizer(location: str):
    from models.tokenizer import load_tokenizer

    try:
        return load_tokenizer(location)
    except FileNotFoundError as exc:
        raise JobError(str(exc)) from exc


def _register(job: Job, parent: ModelVersion, name: str, path: Path, info: dict) -> ModelVersion:
    from evalhub.registry import model_register_child

    return model_register_child(
        parent=parent,
        name=name,
        location=path,
        relation=ModelVersion.TRAINED,
        info={"config": parent.info.get("config"), "posttrain": info},
        description=f"{info['algorithm'].upper()} of {parent.name} (job {job.pk})",
        user=job.created_by,
    )


def queue_suites(version: ModelVersion, names: list[str], limit, job: Job) -> list[int]:
    """Eval runs on the new model, each with the suite's nightly sample size unless
    ``eval_limit`` says otherwise."""
    from evalhub.evaluation import eval_submit
    from suites import REGISTRY

    return [
        eval_submit(
            model=version,
            suite=name,
            limit=int(limit) if limit else REGISTRY[name].nightly_limit,
            user=job.created_by,
        ).pk
        for name in names
    ]


RL_DEFAULTS = {
    "algorithm": "mdloo",
    "k": 4,
    "prompts_per_step": 8,
    "iterations": 50,
    "inner_steps": 4,
    "max_new_tokens": 256,
    "temperature": 1.0,
    "md_t": 1.0,
    "beta": 0.05,
    "lr": None,  # None: 1e-6 full, 2e-5 LoRA
}


def run_rl(job: Job) -> dict:
    """The body of ``posttrain.rl``: MDLOO (or the RLOO-with-clipping and REINFORCE
    baselines) on constrained training prompts, rewarded by IFEval's checkers and, when given,
    a registered reward model, combined by weights."""
    from models.posttrain.rl import RLConfig, train_mdloo

    p = job.params
    parent = policy_param(p, "model_id")
    hp, suites = training_params(p), suites_param(p)
    prompts, reward_fn, source = rl_rewards(p)
    rl = {k: p.get(k, v) for k, v in RL_DEFAULTS.items()}
    session = Session(job, parent, hp)
    try:
        config = RLConfig(
            algorithm=str(rl["algorithm"]),
            k=int(rl["k"]),
            prompts_per_step=int(rl["prompts_per_step"]),
            iterations=int(rl["iterations"]),
            inner_steps=int(rl["inner_steps"]),
            max_new_tokens=int(rl["max_new_tokens"]),
            temperature=float(rl["temperature"]),
            md_t=float(rl["md_t"]),
            beta=float(rl["beta"]),
            lr=float(rl["lr"]) if rl["lr"] is not None else (2e-5 if hp["lora_rank"] else 1e-6),
            seed=hp["seed"],
            checkpoint_every=int(p.get("checkpoint_every", 10)),
            checkpoint_dir=str(session.work / "state"),
            device=p.get("device"),
        )
    except (TypeError, ValueError) as exc:
        raise JobError(f"RL parameters: {exc}") from exc
    result = train_mdloo(
        session.model,
        session.tokenizer,
        [c.prompt for c in prompts],
        reward_fn,
        config,
        progress=session.curves.update,
        resume_from=session.resume_from(),
    )
    info = {
        "algorithm": config.algorithm,
        "trained_by": "rl",
        "hyperparameters": {**hp, **rl, "lr": config.lr},
        "data": source,
        "data_hash": _hash([vars(c) for c in prompts]),
        "n_examples": len(prompts),
    }
    return session.finish(result, info, suites)


def rl_rewards(p: dict):
    """(constrained prompts, reward_fn, source description) for an RL job: AlpacaEval
    instructions with IFEval-style constraints attached (never IFEval's own prompts), scored
    by the checkers (``ifeval_weight``, default 1) plus a registered reward model
    (``reward_model`` id, ``reward_weight``, default 1)."""
    from suites.verifiers import (
        IFEvalVerifier,
        RewardModelScorer,
        alpaca_eval_instructions,
        build_constrained_prompts,
        combine,
        ifeval_prompts,
    )

    limit = int(p.get("limit", 256))
    prompts = build_constrained_prompts(
        alpaca_eval_instructions(limit), seed=int(p.get("seed", 0)), exclude=ifeval_prompts()
    )
    terms = []
    if float(p.get("ifeval_weight", 1.0)):
        verifier = IFEvalVerifier(prompts, all_or_nothing=bool(p.get("all_or_nothing", False)))
        terms.append((float(p.get("ifeval_weight", 1.0)), verifier))
    source = {"prompts": "alpaca-eval + constraints", "limit": limit, "terms": []}
    if p.get("reward_model"):
        from evalhub.rewards import reward_model_for

        version = ModelVersion.objects.filter(
            pk=p["reward_model"], kind=ModelVersion.REWARD
        ).first()
        if version is None:
            raise JobError("'reward_model' must be the id of a registered reward model")
        terms.append(
            (float(p.get("reward_weight", 1.0)), RewardModelScorer(reward_model_for(version)))
        )
        source.update(reward_model=version.name, reward_model_id=version.pk)
    if not terms:
        raise JobError("no reward: give an ifeval_weight above 0 or a reward_model")
    source["terms"] = [{"weight": w, "kind": type(fn).__name__} for w, fn in terms]
    return prompts, combine(terms), source
