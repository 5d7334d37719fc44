"""Platform tables: background jobs and API tokens.

They belong to the ``evalhub`` Django app (``app_label``), whose migrations and table names
they keep; they live here so that ``grading`` can use them without importing ``evalhub``.
``evalhub.models`` imports this module, which registers them when the app loads."""

import hashlib
import secrets
import uuid
from datetime import timedelta
from functools import cache

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection, models, transaction
from django.db.models import Case, F, Q, Value, When
from django.db.models.functions import Coalesce
from django.utils import timezone

from core import rows

LOG_TAIL_LINES = 200


class JobCancelled(Exception):
    """Raised inside a running job when a researcher has cancelled it."""


class JobError(Exception):
    """A job failed for a reason worth showing to the user without a traceback."""


def stalled_after() -> timedelta:
    """How long a running job's worker may go without a heartbeat before the job is stalled."""
    return timedelta(seconds=settings.JOB_HEARTBEAT_SECONDS * settings.JOB_STALLED_AFTER_BEATS)


class JobQuerySet(models.QuerySet):
    def active(self):
        return self.filter(status__in=Job.ACTIVE)

    def stalled(self):
        """Running jobs whose worker stopped beating. A running job without any heartbeat (one
        split into shards, or run in-process by ``manage.py evaluate``) is never stalled."""
        return self.filter(status=Job.RUNNING, heartbeat_at__lt=timezone.now() - stalled_after())


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
    # Written by the running attempt's worker every JOB_HEARTBEAT_SECONDS (core.jobs.Heartbeat);
    # NULL while queued and once a job hands its work to others (shards).
    heartbeat_at = models.DateTimeField(null=True, blank=True)
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
        app_label = "evalhub"
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"Job {self.pk} {self.kind} ({self.status})"

    @property
    def is_active(self) -> bool:
        return self.status in self.ACTIVE

    @property
    def percent(self) -> int:
        return round(100 * max(0.0, min(1.0, self.progress)))

    @property
    def is_stalled(self) -> bool:
        """Running, but its worker has missed JOB_STALLED_AFTER_BEATS heartbeats in a row."""
        return (
            self.status == self.RUNNING
            and self.heartbeat_at is not None
            and timezone.now() - self.heartbeat_at > stalled_after()
        )

    @property
    def heartbeat_age(self) -> int | None:
        """Whole seconds since the running attempt's last heartbeat, if it keeps one."""
        if self.heartbeat_at is None:
            return None
        return int((timezone.now() - self.heartbeat_at).total_seconds())

    def _update(self, **fields) -> int:
        fields["updated_at"] = timezone.now()
        return Job.objects.filter(pk=self.pk).update(**fields)

    def claim(self) -> bool:
        """Start one more attempt at this job if no live worker holds it; True if this one did.

        One conditional UPDATE, so of two deliveries racing for the job (an acks_late redelivery
        and the sweep's re-queue, say) exactly one wins: a job is claimable while queued, or while
        running with a heartbeat older than the stalled window (its worker died). A finished job
        is never claimed, which makes every job task idempotent. On success ``attempts`` is this
        attempt's number; every later write of the attempt is conditional on it.
        """
        now = timezone.now()
        orphaned = Q(status=self.RUNNING) & (
            Q(heartbeat_at__isnull=True) | Q(heartbeat_at__lt=now - stalled_after())
        )
        claimed = Job.objects.filter(Q(pk=self.pk) & (Q(status=self.QUEUED) | orphaned)).update(
            status=self.RUNNING,
            attempts=F("attempts") + 1,
            heartbeat_at=now,
            started_at=Coalesce("started_at", now),
            updated_at=now,
        )
        self.refresh_from_db()
        return bool(claimed)

    def beat(self) -> bool:
        """Record that this attempt's worker is alive; False once the attempt no longer holds
        the job (finished, cancelled, or taken over after it was found stalled)."""
        now = timezone.now()
        return bool(self._mine().update(heartbeat_at=now))

    def _mine(self, statuses=(RUNNING,)):
        """This row while it is in one of ``statuses`` and no later attempt has claimed it."""
        return Job.objects.filter(pk=self.pk, status__in=statuses, attempts=self.attempts)

    def report(self, progress: float | None = None, message: str | None = None) -> None:
        """Record progress (a heartbeat too); raises JobCancelled if the job was cancelled
        meanwhile or another attempt took it over."""
        fields = {}
        if progress is not None:
            fields["progress"] = max(0.0, min(1.0, float(progress)))
        if message is not None:
            fields["message"] = message[:500]
        now = timezone.now()
        # A beat only where one is kept: a detached job (shards report) stays without one.
        beat = Case(When(heartbeat_at__isnull=False, then=Value(now)), default=None)
        if not self._mine().update(updated_at=now, heartbeat_at=beat, **fields):
            raise JobCancelled(f"job {self.pk} attempt {self.attempts} no longer holds the job")
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

    def succeed(self, result) -> bool:
        """Finish with ``result``, unless another attempt has taken the job over."""
        return self._finish(self._mine(self.ACTIVE), self.SUCCEEDED, result=result, progress=1.0)

    def fail(self, error: str, traceback: str = "") -> bool:
        """Fail with ``error``, unless another attempt has taken the job over."""
        return self._finish(
            self._mine(self.ACTIVE), self.FAILED, error=error[:5000], traceback=traceback
        )

    def cancel(self) -> bool:
        """Cancel a queued or running job; True if it was still active."""
        active = Job.objects.filter(pk=self.pk, status__in=self.ACTIVE)
        return self._finish(active, self.CANCELLED, message="cancelled")

    def detach(self) -> None:
        """Hand the job's completion to others (shards): no heartbeat, so it is never stalled."""
        self._mine().update(heartbeat_at=None, updated_at=timezone.now())
        self.heartbeat_at = None

    def _finish(self, rows, status: str, **fields) -> bool:
        now = timezone.now()
        updated = rows.update(
            status=status, finished_at=now, updated_at=now, heartbeat_at=None, **fields
        )
        if updated:  # else this object stays as its own attempt saw it
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
        app_label = "evalhub"
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

        Every API call starts here, so it is one plain query (see core/rows.py): the user,
        its token and its group names, one row per group. The names are left on
        ``user.group_names`` for core.access.has_role.
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

    class Meta:
        app_label = "evalhub"

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
