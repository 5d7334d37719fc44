"""Platform tables: background jobs and API tokens."""

import hashlib
import secrets
import uuid
from datetime import timedelta
from functools import cache

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection, models, transaction
from django.utils import timezone

from evalhub import rows

LOG_TAIL_LINES = 200


class JobCancelled(Exception):
    """Raised inside a running job when a researcher has cancelled it."""


class JobQuerySet(models.QuerySet):
    def active(self):
        return self.filter(status__in=Job.ACTIVE)


class Job(models.Model):
    """One long piece of work (generate, evaluate, train, compress, export) and its live state.

    The row is the source of truth for the UI: Celery only carries the job id. Workers write
    progress with queryset ``update()`` calls so they never overwrite a concurrent cancel.
    """

    QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
        "queued",
        "running",
        "succeeded",
        "failed",
        "cancelled",
    )
    STATUS_CHOICES = [(s, s) for s in (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)]
    ACTIVE = (QUEUED, RUNNING)
    FINISHED = (SUCCEEDED, FAILED, CANCELLED)

    kind = models.CharField(max_length=64, db_index=True)
    params = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=16, choices=STATUS_CHOICES, default=QUEUED, db_index=True)
    progress = models.FloatField(default=0.0)  # 0..1
    message = models.CharField(max_length=500, blank=True)
    log_tail = models.TextField(blank=True)
    result = models.JSONField(null=True, blank=True)
    data = models.JSONField(default=dict, blank=True)  # live structured progress (loss curves)
    error = models.TextField(blank=True)
    traceback = models.TextField(blank=True)
    attempts = models.PositiveIntegerField(default=0)  # deliveries to a worker; >1 after a crash
    queue = models.CharField(max_length=32, default="default")
    celery_task_id = models.CharField(max_length=64, default="", blank=True, db_index=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = JobQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"Job {self.pk} {self.kind} ({self.status})"

    @property
    def is_active(self) -> bool:
        return self.status in self.ACTIVE

    @property
    def percent(self) -> int:
        return round(100 * max(0.0, min(1.0, self.progress)))

    def _update(self, **fields) -> int:
        fields["updated_at"] = timezone.now()
        return Job.objects.filter(pk=self.pk).update(**fields)

    def begin_attempt(self) -> bool:
        """Mark the job running for one more delivery; False if it already finished.

        A redelivered message (worker killed, broker retry) must not redo a finished job: this
        is what makes every job task idempotent.
        """
        with transaction.atomic():
            job = Job.objects.select_for_update().get(pk=self.pk)
            if job.status in self.FINISHED:
                return False
            job.status = self.RUNNING
            job.attempts += 1
            job.started_at = job.started_at or timezone.now()
            job.save(update_fields=["status", "attempts", "started_at", "updated_at"])
        self.refresh_from_db()
        return True

    def report(self, progress: float | None = None, message: str | None = None) -> None:
        """Record progress; raises JobCancelled if the job was cancelled meanwhile."""
        fields = {}
        if progress is not None:
            fields["progress"] = max(0.0, min(1.0, float(progress)))
        if message is not None:
            fields["message"] = message[:500]
        updated = Job.objects.filter(pk=self.pk, status=self.RUNNING).update(
            updated_at=timezone.now(), **fields
        )
        if not updated:
            raise JobCancelled(f"job {self.pk} is no longer running")
        for name, value in fields.items():
            setattr(self, name, value)

    def log(self, line: str) -> None:
        with transaction.atomic():
            job = Job.objects.select_for_update().only("log_tail").get(pk=self.pk)
            lines = (job.log_tail.splitlines() + [line.rstrip()])[-LOG_TAIL_LINES:]
            self.log_tail = "\n".join(lines)
            self._update(log_tail=self.log_tail)

    def set_data(self, **values) -> None:
        """Merge live values (e.g. a loss curve) into ``data`` for the job page to draw."""
        self.data = {**self.data, **values}
        self._update(data=self.data)

    def succeed(self, result) -> None:
        self._finish(self.SUCCEEDED, result=result, progress=1.0)

    def fail(self, error: str, traceback: str = "") -> None:
        self._finish(self.FAILED, error=error[:5000], traceback=traceback)

    def cancel(self) -> bool:
        """Cancel a queued or running job; True if it was still active."""
        return self._finish(self.CANCELLED, message="cancelled")

    def _finish(self, status: str, **fields) -> bool:
        updated = Job.objects.filter(pk=self.pk, status__in=self.ACTIVE).update(
            status=status, finished_at=timezone.now(), updated_at=timezone.now(), **fields
        )
        self.refresh_from_db()
        return bool(updated)


class JobStep(models.Model):
    """A finished unit of a job (a prompt generated, a shard scored): the job's resume ledger.

    Unique per (job, key), so a redelivered job skips what is done and can never record a unit
    twice.
    """

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="steps")
    key = models.CharField(max_length=200)
    output = models.JSONField(null=True, blank=True)
    attempt = models.PositiveIntegerField(default=1)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["job", "key"], name="uniq_job_step")]
        ordering = ["id"]


def _hash_token(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


@cache
def _token_sql() -> str:
    """ApiTokenQuerySet.authenticate's query, built once (the user model is known only after
    start-up)."""
    User = get_user_model()
    groups, Group = User.groups.through, User.groups.field.related_model
    return (
        f"SELECT {rows.columns(User, 'u')}, {rows.columns(ApiToken, 't')}, g.name "
        f"FROM {ApiToken._meta.db_table} t JOIN {User._meta.db_table} u ON u.id = t.user_id "
        f"LEFT JOIN {groups._meta.db_table} ug ON ug.user_id = u.id "
        f"LEFT JOIN {Group._meta.db_table} g ON g.id = ug.group_id "
        f"WHERE t.key_hash = %s AND t.revoked_at IS NULL AND u.is_active"
    )


class ApiTokenQuerySet(models.QuerySet):
    def authenticate(self, raw: str):
        """The active token's user for a raw bearer token, or None.

        Every API call starts here, so it is one plain query (see evalhub/rows.py): the user,
        its token and its group names, one row per group. The names are left on
        ``user.group_names`` for evalhub.access.has_role.
        """
        User = get_user_model()
        with connection.cursor() as cursor:
            cursor.execute(_token_sql(), [_hash_token(raw)])
            found = cursor.fetchall()
        if not found:
            return None
        values = iter(found[0])
        user, token = rows.instance(User, values), rows.instance(ApiToken, values)
        user.group_names = {row[-1] for row in found if row[-1]}
        now = timezone.now()
        if token.last_used_at is None or now - token.last_used_at > timedelta(minutes=1):
            # At most one write a minute per token: a busy client should not turn every read
            # into a write.
            ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        return user


class ApiToken(models.Model):
    """A bearer token for the JSON API and the OpenAI-compatible endpoints. Only a hash is kept."""

    PREFIX = "evh_"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    name = models.CharField(max_length=100)
    key_hash = models.CharField(max_length=64, unique=True)
    key_prefix = models.CharField(max_length=12)  # shown in lists so a user can tell tokens apart
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = ApiTokenQuerySet.as_manager()

    def __str__(self) -> str:
        return f"{self.name} ({self.key_prefix}…)"

    @classmethod
    def issue(cls, *, user, name: str) -> tuple["ApiToken", str]:
        """Create a token; the raw value is returned once and never stored."""
        raw = cls.PREFIX + secrets.token_urlsafe(32)
        token = cls.objects.create(
            user=user, name=name, key_hash=_hash_token(raw), key_prefix=raw[:12]
        )
        return token, raw


def new_task_id() -> str:
    return str(uuid.uuid4())


class ModelVersion(models.Model):
    """A registered model: where it lives, how to run it, and where it came from (lineage)."""

    POLICY, REWARD, ADAPTER = "policy", "reward", "adapter"
    KIND_CHOICES = [(POLICY, "policy"), (REWARD, "reward model"), (ADAPTER, "adapter")]
    BACKEND_CHOICES = [("builtin", "EvalHub checkpoint"), ("hf", "Hugging Face dir or GGUF"),
                       ("openai_http", "OpenAI-compatible HTTP endpoint"),
                       ("reward", "EvalHub reward model")]
    IMPORTED, TRAINED, COMPRESSED, ADAPTED = "imported", "trained_from", "compressed_from", "adapter_of"
    RELATION_CHOICES = [(IMPORTED, "imported"), (TRAINED, "trained from"),
                        (COMPRESSED, "compressed from"), (ADAPTED, "adapter of")]

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
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.PROTECT,
                               related_name="children")
    source = models.CharField(max_length=1000, blank=True, help_text="imported from")
    tracked = models.BooleanField(default=False, help_text="evaluated by the nightly jobs")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                                   on_delete=models.SET_NULL, related_name="+")
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
    job = models.OneToOneField(Job, null=True, blank=True, on_delete=models.SET_NULL,
                               related_name="eval_run")
    metrics = models.JSONField(null=True, blank=True)  # aggregates with 95% intervals
    manifest = models.JSONField(default=dict, blank=True)  # everything needed to reproduce it
    nightly = models.BooleanField(default=False)
    regressions = models.JSONField(default=list, blank=True)  # metrics flagged vs previous run
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.model} on {self.suite} (run {self.pk})"


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
        constraints = [models.UniqueConstraint(fields=["run", "example_id"],
                                               name="uniq_eval_sample")]
