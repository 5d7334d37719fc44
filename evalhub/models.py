"""Model registry and eval-run tables. The platform tables (jobs, API tokens) are in
``core/models.py``, under this app's label."""

from django.conf import settings
from django.db import models
from django.utils import timezone

from core.models import Job


class ModelVersion(models.Model):
    """A registered model: where it lives, how to run it, and where it came from (lineage)."""

    POLICY, REWARD, ADAPTER, JUDGE = "policy", "reward", "adapter", "judge"
    KIND_CHOICES = [
        (POLICY, "policy"),
        (REWARD, "reward model"),
        (ADAPTER, "adapter"),
        (JUDGE, "safety judge"),
    ]
    BACKEND_CHOICES = [
        ("builtin", "EvalHub checkpoint"),
        ("hf", "Hugging Face dir or GGUF"),
        ("openai_http", "OpenAI-compatible HTTP endpoint"),
        ("reward", "EvalHub reward model"),
        ("safety_judge", "EvalHub learned safety judge"),
    ]
    IMPORTED, TRAINED, COMPRESSED, ADAPTED = (
        "imported",
        "trained_from",
        "compressed_from",
        "adapter_of",
    )
    RELATION_CHOICES = [
        (IMPORTED, "imported"),
        (TRAINED, "trained from"),
        (COMPRESSED, "compressed from"),
        (ADAPTED, "adapter of"),
    ]

    name = models.SlugField(max_length=100, unique=True)
    kind = models.CharField(max_length=10, choices=KIND_CHOICES, default=POLICY)
    backend = models.CharField(max_length=20, choices=BACKEND_CHOICES)
    location = models.CharField(max_length=1000, help_text="checkpoint dir, file path or base URL")
    params = models.JSONField(default=dict, blank=True, help_text="backend parameters")
    description = models.TextField(blank=True)
    n_params = models.BigIntegerField(null=True, blank=True)
    size_bytes = models.BigIntegerField(null=True, blank=True)
    bits_per_weight = models.FloatField(null=True, blank=True)
    info = models.JSONField(default=dict, blank=True, help_text="config and provenance")
    relation = models.CharField(max_length=16, choices=RELATION_CHOICES, blank=True)
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="children"
    )
    source = models.CharField(max_length=1000, blank=True, help_text="imported from")
    tracked = models.BooleanField(default=False, help_text="evaluated by the nightly jobs")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def lineage(self) -> list["ModelVersion"]:
        """This model and its ancestors, nearest first."""
        chain, node, seen = [], self, set()
        while node is not None and node.pk not in seen:
            chain.append(node)
            seen.add(node.pk)
            node = node.parent
        return chain


class EvalRun(models.Model):
    """A model × suite × settings evaluation, executed by a Job; samples are kept one by one."""

    model = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="runs")
    suite = models.CharField(max_length=50, db_index=True)
    settings = models.JSONField(default=dict, blank=True)  # limit, batch_size, seed
    # Set when the job starts: the examples it scores (a seeded stratified sample when limited)
    # out of the suite's; `complete` once every example of the suite has a stored score.
    planned = models.PositiveIntegerField(null=True, blank=True)
    suite_size = models.PositiveIntegerField(null=True, blank=True)
    complete = models.BooleanField(default=False, db_index=True)
    job = models.OneToOneField(
        Job, null=True, blank=True, on_delete=models.SET_NULL, related_name="eval_run"
    )
    metrics = models.JSONField(null=True, blank=True)  # aggregates with 95% intervals
    manifest = models.JSONField(default=dict, blank=True)  # everything needed to reproduce it
    nightly = models.BooleanField(default=False)
    regressions = models.JSONField(default=list, blank=True)  # metrics flagged vs previous run
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.model} on {self.suite} (run {self.pk})"

    @property
    def is_partial(self) -> bool:
        """Finished on a sample of the suite: its score must not rank beside full runs."""
        return self.metrics is not None and not self.complete

    @property
    def total(self) -> int | None:
        """Examples the run will score: known once the job starts, or from its limit."""
        return self.planned if self.planned is not None else self.settings.get("limit")


class EvalSample(models.Model):
    """One scored example of a run: what was asked, what came back, how it scored."""

    run = models.ForeignKey(EvalRun, on_delete=models.CASCADE, related_name="samples")
    example_id = models.CharField(max_length=200)
    metrics = models.JSONField(default=dict)
    extracted = models.JSONField(default=dict, blank=True)
    details = models.JSONField(default=dict, blank=True)  # prompt, raw output, reference…
    passed = models.BooleanField(null=True, db_index=True)  # the suite's headline metric > 0
    category = models.CharField(max_length=100, blank=True, db_index=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["run", "example_id"], name="uniq_eval_sample")
        ]


class PromptSet(models.Model):
    """A registered, versioned list of prompts and conversations (``evalhub/promptsets.py``
    describes a record). Importing changed content under the same name makes the next version;
    ``content_hash`` identifies the content in every job, campaign and run that used it."""

    name = models.SlugField(max_length=100)
    version = models.PositiveIntegerField(default=1)
    description = models.TextField(blank=True)
    source = models.CharField(max_length=1000, blank=True, help_text="file name or builtin:NAME")
    content_hash = models.CharField(max_length=64)
    records = models.JSONField(default=list)
    n_records = models.PositiveIntegerField(default=0)
    max_turns = models.PositiveSmallIntegerField(default=1)
    categories = models.JSONField(default=dict, blank=True)  # category → count
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name", "-version"]
        constraints = [
            models.UniqueConstraint(fields=["name", "version"], name="uniq_prompt_set_version")
        ]

    def __str__(self) -> str:
        return f"{self.name} v{self.version}"

    @property
    def reference(self) -> dict:
        """What a job, campaign or run records about the set it used."""
        return {
            "id": self.pk,
            "name": self.name,
            "version": self.version,
            "hash": self.content_hash,
        }


class JudgeVerdict(models.Model):
    """An LLM judge's verdict on one grading item, made by a ``judge`` job (evalhub/judging.py).
    Researchers only: raters never see judge prompts, outputs or verdicts."""

    SINGLE, PAIRWISE = "single", "pairwise"

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="judge_verdicts")
    item = models.ForeignKey("grading.Item", on_delete=models.CASCADE, related_name="+")
    mode = models.CharField(max_length=10, choices=[(SINGLE, SINGLE), (PAIRWISE, PAIRWISE)])
    prompt = models.CharField(max_length=40)  # suites.llm_judge.PROMPTS name
    # Pairwise, by uploaded position (A = response 0): "A", "B", "tie"; "" when unparseable.
    winner = models.CharField(max_length=4, blank=True)
    consistent = models.BooleanField(null=True)  # the swapped order gave the same verdict
    rating = models.FloatField(null=True, blank=True)  # single: 1–10; null when unparseable
    outputs = models.JSONField(default=list)  # the judge's raw output per order

    class Meta:
        ordering = ["item_id"]
        constraints = [models.UniqueConstraint(fields=["job", "item"], name="uniq_judge_verdict")]

    @property
    def parsed(self) -> bool:
        return bool(self.winner) if self.mode == self.PAIRWISE else self.rating is not None
