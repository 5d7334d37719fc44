"""Run one evaluation from the command line, with a progress bar, and print the result table."""

from django.core.management.base import BaseCommand, CommandError
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from core.jobs import JobError
from core.models import Job
from evalhub.evaluation import evaluate_run
from evalhub.models import EvalRun, ModelVersion
from suites import REGISTRY


class Command(BaseCommand):
    help = "Evaluate a registered model on a suite (runs in this process, stored like a job)."

    def add_arguments(self, parser):
        parser.add_argument("--model", required=True)
        parser.add_argument("--suite", required=True, choices=sorted(REGISTRY))
        parser.add_argument(
            "--limit",
            type=int,
            default=None,
            help="score a seeded sample of this many examples, stratified by subject/category "
            "(the run is marked partial); default: the whole suite",
        )
        parser.add_argument("--seed", type=int, default=0, help="seed of the --limit sample")
        parser.add_argument("--batch-size", type=int, default=8)

    def handle(self, *args, model: str, suite: str, limit, seed: int, batch_size: int, **options):
        version = ModelVersion.objects.filter(name=model).first()
        if version is None:
            raise CommandError(f"no registered model named {model!r}")
        job = Job.objects.create(
            kind="evaluate", status=Job.RUNNING, attempts=1, params={"source": "manage.py evaluate"}
        )
        run = EvalRun.objects.create(
            model=version,
            suite=suite,
            job=job,
            settings={"limit": limit, "seed": seed, "batch_size": batch_size},
        )
        job.params["run_id"] = run.pk
        job.save(update_fields=["params"])
        bar = tqdm(desc=f"{model} · {suite}", unit="sample")

        def on_batch(new: int, done: int, total: int) -> None:
            bar.total = total
            bar.update(new)

        try:
            result = evaluate_run(run, job, on_batch=on_batch)
        except JobError as exc:
            job.fail(str(exc))
            raise CommandError(str(exc)) from exc
        finally:
            bar.close()
        job.succeed(result)
        self._table(run)

    def _table(self, run: EvalRun) -> None:
        scope = (
            "complete"
            if run.complete
            else f"PARTIAL: {run.metrics.get('n')} of {run.suite_size} examples, "
            f"seed {run.settings.get('seed', 0)}"
        )
        table = Table(title=f"{run.model.name} on {run.suite} (run {run.pk}, {scope})")
        for column in ("metric", "mean", "95% interval", "n"):
            table.add_column(column)
        for name, value in run.metrics.items():
            if isinstance(value, dict) and "mean" in value:
                table.add_row(
                    name,
                    f"{value['mean']:.4f}",
                    f"[{value['ci_low']:.4f}, {value['ci_high']:.4f}]",
                    str(value["n"]),
                )
        Console().print(table)
