"""Post-train a registered model from the command line: SFT, DPO or IPO, online RL, or a task
adapter (``--algorithm adapter``: SFT of a LoRA adapter, fresh on a policy or from the adapter
``--model`` names), in this process (with a progress bar) or queued for the workers
(``--submit``). Stored like any job: the job page shows its curves and the result is
registered with lineage."""

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from core.jobs import KINDS, JobError, execute, job_params, job_submit
from core.models import Job
from evalhub.models import ModelVersion

RL = ("mdloo", "rloo_clip", "reinforce")


class Command(BaseCommand):
    help = (
        "SFT, DPO or IPO (from campaigns or a JSONL file), online RL (MDLOO and its "
        "baselines, on constrained prompts) or a task adapter on a registered model."
    )

    def add_arguments(self, parser):
        parser.add_argument("--model", required=True, help="registered model name")
        parser.add_argument(
            "--algorithm", required=True, choices=RL + ("sft", "dpo", "ipo", "adapter")
        )
        parser.add_argument("--campaign", type=int, action="append", dest="campaign_ids")
        parser.add_argument("--jsonl", help="conversations (SFT) or preference pairs (DPO/IPO)")
        parser.add_argument("--source", choices=["alpaca-eval"], help="SFT/adapter: prompt set")
        parser.add_argument("--name", help="name of the result (default: derived)")
        parser.add_argument("--lr", type=float)
        parser.add_argument("--epochs", type=int, default=1)
        parser.add_argument("--batch-size", type=int, default=8)
        parser.add_argument("--max-steps", type=int)
        parser.add_argument(
            "--lora-rank", type=int, default=0, help="0: full fine-tune; adapter: its rank"
        )
        parser.add_argument("--beta", type=float, default=0.1)
        parser.add_argument("--hard-labels", action="store_true", help="DPO/IPO baseline")
        parser.add_argument("--iterations", type=int, help="RL: outer iterations")
        parser.add_argument("--k", type=int, help="RL: samples per prompt")
        parser.add_argument("--limit", type=int, help="RL prompts; prompt set rows (--source)")
        parser.add_argument("--max-new-tokens", type=int, help="RL: response length cap")
        parser.add_argument("--reward-model", type=int, help="RL: a reward model's id")
        parser.add_argument("--suites", default="ifeval,gsm8k,mmlu", help="'' for none")
        parser.add_argument("--eval-limit", type=int, help="examples per suite")
        parser.add_argument("--submit", action="store_true", help="queue for the workers")

    def handle(self, *args, model: str, algorithm: str, submit: bool, **o):
        version = ModelVersion.objects.filter(name=model).first()
        if version is None:
            raise CommandError(f"no registered model named {model!r}")
        params = {
            "model_id": version.pk,
            "suites": [s for s in o["suites"].split(",") if s],
            "level_aware": not o["hard_labels"],
            **{
                k: o[k]
                for k in ("campaign_ids", "jsonl", "source", "name", "lr", "epochs", "batch_size")
                + ("max_steps", "lora_rank", "beta", "eval_limit")
                + ("iterations", "k", "limit", "reward_model", "max_new_tokens")
                if o[k] is not None
            },
        }
        kinds = {"sft": "posttrain.sft", "dpo": "posttrain.dpo", "ipo": "posttrain.dpo"}
        kind = {**kinds, "adapter": "adapter.train"}.get(algorithm, "posttrain.rl")
        if kind == "adapter.train" and params.pop("lora_rank", 0):
            params["rank"] = o["lora_rank"]
        if kind == "posttrain.dpo":
            params["loss"] = algorithm
        elif kind == "posttrain.rl":
            params["algorithm"] = algorithm
        if submit:
            try:
                job = job_submit(kind=kind, params=params)
            except JobError as exc:
                raise CommandError(str(exc)) from exc
            self.stdout.write(f"queued job {job.pk}")
            return
        try:
            params = job_params(kind=kind, params=params)  # as job_submit checks them
        except JobError as exc:
            raise CommandError(str(exc)) from exc
        job = Job.objects.create(kind=kind, params=params)
        bar = tqdm(desc=f"{model} · {algorithm}", unit="step", total=100)
        execute(job.pk, _fn(kind, job, bar))
        bar.close()
        job.refresh_from_db()
        if job.status != Job.SUCCEEDED:
            raise CommandError(f"job {job.pk} {job.status}: {job.error}")
        result = job.result
        self.stdout.write(
            f"registered {result['name']} (model {result['model_id']}) after {result['steps']}"
            f" steps; eval runs queued: {result['eval_runs']}"
        )


def _fn(kind: str, job: Job, bar):
    """The job function, with progress mirrored to the terminal's bar."""
    fn = KINDS[kind].job_fn

    def run(row: Job) -> dict:
        original = row.report

        def report(progress: float | None = None, message: str | None = None) -> None:
            original(progress, message)
            if progress is not None:
                bar.n = round(100 * progress)
            bar.set_postfix_str(message or "")
            bar.refresh()

        row.report = report
        return fn(row)

    return run
