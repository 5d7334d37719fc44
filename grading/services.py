"""Writes across grading tables: imports, claiming tasks, submitting and skipping them.

Claiming is atomic under concurrency. On PostgreSQL the candidate item row is taken with
``SELECT … FOR UPDATE SKIP LOCKED``, so concurrent raters never wait on each other and never
over-fill an item. SQLite has no row locks; there every write transaction starts IMMEDIATE
(settings.py), which serialises claims on the database lock — the same guarantee, less
concurrency. A rater holds at most one lease per campaign (a unique index), and one rater's
claims run one at a time (an advisory lock on PostgreSQL), so parallel "next" calls from one
rater all get the same task.

The two hottest writes (a plain claim and a submit on a live lease) are single SQL statements
on PostgreSQL (``_CLAIM_SQL``, ``_SUBMIT_SQL``): one round trip instead of six or seven, which
is what bounds labels per second (benchmarks/grading_load.py). Every other case — gold draws,
quotas, late labels, double submits, SQLite — takes the ORM path in a transaction, and the
fast statements fall back to it whenever their guard (``status = 'leased'``) does not hold.
"""

import json
import random
from collections import Counter

from django.db import IntegrityError, connection, transaction
from django.db.models import Exists, F, OuterRef
from django.utils import timezone

from core import rows
from grading.kinds import Choice as Choice  # re-exported: callers import it from here
from grading.kinds import GradingError, rater_text
from grading.models import Assignment, Campaign, Item, Label, Response
from grading.uploads import MAX_ROWS, UploadError, parse_upload

MAX_REASON = 500  # characters in a skip reason: Assignment.skip_reason


class LeaseLost(GradingError):
    pass


def campaign_create(
    *,
    campaign: Campaign,
    created_by,
    data: bytes | None = None,
    filename: str = "",
    max_rows: int = MAX_ROWS,
) -> int:
    """Save a new (unsaved) campaign and import its first upload in one transaction: a
    rejected file raises UploadError and leaves no campaign behind. Returns the items
    imported (0 without ``data``). The file is parsed inside the transaction, because the
    import needs the saved campaign; nothing else waits on a campaign that is not yet
    committed."""
    with transaction.atomic():
        campaign.created_by = created_by
        campaign.save()
        if data is None:
            return 0
        return campaign_import(campaign=campaign, data=data, filename=filename, max_rows=max_rows)


def campaign_import(
    *, campaign: Campaign, data: bytes, filename: str, max_rows: int = MAX_ROWS
) -> int:
    """Add the items of an upload to a campaign, all or nothing; returns how many.

    ``data``: the file's bytes, JSONL or CSV as ``filename`` ends (grading/uploads.py has the
    row format). A row gives either ``prompt`` or a conversation, ``messages``: a list of
    ``{"role", "content"}`` whose last message is the user turn the responses answer; that turn
    becomes ``Item.prompt`` and the messages before it ``Item.context``. Raises UploadError,
    naming each bad row: parse_upload's checks, and ids the campaign already has."""
    rows = parse_upload(
        data,
        filename,
        kind=campaign.task_kind,
        aspects=campaign.aspect_keys,
        max_rows=max_rows,
    )
    ids = {r.external_id for r in rows if r.external_id}
    if ids:
        existing = Item.objects.filter(campaign=campaign).exclude(external_id="")
        taken = ids.intersection(existing.values_list("external_id", flat=True).iterator())
        if taken:
            raise UploadError(
                [
                    f"row {r.number}: id {r.external_id!r} is already in this campaign"
                    for r in rows
                    if r.external_id in taken
                ]
            )
    with transaction.atomic():
        items = Item.objects.bulk_create(
            [
                Item(
                    campaign=campaign,
                    prompt=r.prompt,
                    context=r.context,
                    external_id=r.external_id,
                    metadata=r.metadata,
                    is_gold=r.gold is not None,
                    gold_answer=r.gold,
                )
                for r in rows
            ],
            batch_size=2000,
        )
        Response.objects.bulk_create(
            [
                Response(item=item, position=i, text=text, model_name=row.models[i])
                for item, row in zip(items, rows, strict=True)
                for i, text in enumerate(row.responses)
            ],
            batch_size=4000,
        )
    return len(items)


def assignment_claim(*, rater, campaign: Campaign, rng: random.Random | None = None):
    """The rater's live task in this campaign, or a newly leased one; None when nothing is left.

    Raises GradingError when the rater's quota is used up or the campaign is not open.
    """
    rng = rng or random.Random()
    now = timezone.now()
    if campaign.status != Campaign.OPEN:
        raise GradingError("this campaign is not open for grading")
    if campaign.quota_per_rater is not None:
        live = Assignment.objects.filter(rater=rater, campaign=campaign).live(now).first()
        if live is not None:
            return live
        done = Label.objects.filter(campaign=campaign, rater=rater).count()
        if done >= campaign.quota_per_rater:
            raise GradingError(
                f"you have reached this campaign's quota of "
                f"{campaign.quota_per_rater} tasks — thank you!"
            )
    _expire_now_and_then(campaign, now)
    gold = campaign.gold_rate > 0 and rng.random() < campaign.gold_rate
    left = campaign.task_kind.left_position(rng)
    claim = _claim_statement if _fast_path() and not gold else _claim_orm
    assignment = claim(rater, campaign, now, left, gold=gold)
    if assignment is None:
        assignment = _claim_after_none(rater, campaign, now, left, claim)
    return assignment


def _claim_after_none(rater, campaign: Campaign, now, left: int, claim):
    """A claim that leased nothing, retried once under the rater's lock: a concurrent call of
    the same rater may have leased a task (the statement's snapshot predates it; the unique
    index made this claim insert nothing), or expired leases hold the slots — among them the
    rater's own, which blocks a new lease until it is returned."""
    with transaction.atomic():
        _serialise(rater, campaign)
        live = Assignment.objects.filter(rater=rater, campaign=campaign).live().first()
        if live is not None:
            return live
        leases_expire(campaign=campaign, now=now)
        _expire(Assignment.objects.expired(now).filter(rater=rater, campaign=campaign), now)
        return claim(rater, campaign, now, left, gold=False)


def _serialise(rater, campaign: Campaign) -> None:
    """Take the rater's claim lock for this campaign until the transaction ends (PostgreSQL;
    SQLite serialises every write transaction already)."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_lock_key(rater, campaign)])


def _lock_key(rater, campaign: Campaign) -> int:
    """The advisory-lock key of a rater's claims in a campaign: one signed 64-bit number."""
    return ((campaign.pk & 0x7FFFFFFF) << 32) | (rater.pk & 0xFFFFFFFF)


def _fast_path() -> bool:
    return connection.vendor == "postgresql"


def _claim_orm(rater, campaign: Campaign, now, left: int, *, gold: bool):
    try:
        return _claim_orm_once(rater, campaign, now, left, gold=gold)
    except IntegrityError:
        # Only if a claim of the same rater got past the lock: the unique index let one
        # lease through; the caller finds it.
        return None


def _claim_orm_once(rater, campaign: Campaign, now, left: int, *, gold: bool):
    with transaction.atomic():
        _serialise(rater, campaign)
        held = (
            Assignment.objects.filter(rater=rater, campaign=campaign, status=Assignment.LEASED)
            .order_by("-leased_at")
            .first()
        )
        if held is not None and held.expires_at > now:
            return held
        if held is not None:  # expired but not yet returned: it would block a new lease
            _expire(Assignment.objects.filter(pk=held.pk), now)
        item = _lock_candidate(campaign, rater, gold=True) if gold else None
        if item is None:
            item = _lock_candidate(campaign, rater, gold=False)
        if item is None:
            return None
        Item.objects.filter(pk=item.pk).update(taken=F("taken") + 1)
        return Assignment.objects.create(
            item=item,
            campaign=campaign,
            rater=rater,
            leased_at=now,
            expires_at=now + campaign.lease,
            left_position=left,
        )


# The rater's live lease if there is one; else lock the first free non-gold item (as
# _lock_candidate orders them), lease it and count the slot — one statement, one round trip.
# The candidate's row lock makes PostgreSQL re-check ``taken < overlap`` on the newest row
# version, so concurrent claims can never over-fill an item. ``OFFSET 0`` keeps "not seen by
# this rater" a probe of the (item, rater) unique index per candidate: as an anti-join, stale
# statistics on a young table made the planner rescan the rater's whole history per candidate
# (100 ms per claim at 1,300 labels).
# One rater's claims in a campaign run one at a time: the candidate scan waits for the rater's
# advisory lock (``serial``, a one-time filter evaluated before the scan), so a concurrent
# claim of the same rater has committed and unlocked its item first. Its lease is newer than
# this statement's snapshot, so ``live`` misses it; the uniq_live_lease_per_rater index then
# makes the INSERT insert nothing (ON CONFLICT DO NOTHING), the slot is counted from what was
# inserted, and the caller finds that lease (_claim_after_none).
_CLAIM_SQL = """
WITH serial AS (
    SELECT pg_advisory_xact_lock(%(lock)s) AS locked
), live AS (
    SELECT id, item_id, left_position, leased_at, expires_at FROM grading_assignment
    WHERE rater_id = %(rater)s AND campaign_id = %(campaign)s AND status = 'leased'
      AND expires_at > %(now)s
    ORDER BY leased_at DESC LIMIT 1
), candidate AS (
    SELECT i.id FROM grading_item i
    WHERE EXISTS (SELECT 1 FROM serial) AND NOT EXISTS (SELECT 1 FROM live)
      AND i.campaign_id = %(campaign)s AND NOT i.is_gold AND i.taken < %(overlap)s
      AND NOT EXISTS (SELECT 1 FROM grading_assignment a
                      WHERE a.item_id = i.id AND a.rater_id = %(rater)s OFFSET 0)
    ORDER BY i.taken DESC, i.id
    LIMIT 1 FOR UPDATE OF i SKIP LOCKED
), leased AS (
    INSERT INTO grading_assignment (item_id, campaign_id, rater_id, status, left_position,
                                    leased_at, expires_at, skip_reason)
    SELECT id, %(campaign)s, %(rater)s, 'leased', %(left)s, %(now)s, %(expires)s, ''
    FROM candidate
    ON CONFLICT DO NOTHING
    RETURNING id, item_id, left_position, leased_at, expires_at
), counted AS (
    UPDATE grading_item i SET taken = i.taken + 1 FROM leased l WHERE i.id = l.item_id
), chosen AS (
    SELECT * FROM live UNION ALL SELECT * FROM leased
)
SELECT c.id, c.item_id, c.left_position, c.leased_at, c.expires_at, i.prompt, i.context,
       i.is_gold, r.id, r.position, r.text
FROM chosen c JOIN grading_item i ON i.id = c.item_id JOIN grading_response r ON r.item_id = i.id
"""


_CONTEXT = Item._meta.get_field("context")  # decodes the raw jsonb the statement reads


def _claim_statement(rater, campaign: Campaign, now, left: int, *, gold: bool):
    params = {
        "rater": rater.pk,
        "campaign": campaign.pk,
        "now": now,
        "left": left,
        "overlap": campaign.overlap,
        "expires": now + campaign.lease,
        "lock": _lock_key(rater, campaign),
    }
    with connection.cursor() as cursor:
        cursor.execute(_CLAIM_SQL, params)
        found = cursor.fetchall()  # one row per response
    if not found:
        return None
    pk, item_id, left_position, leased_at, expires_at, prompt, context, is_gold = found[0][:8]
    # Only the columns the statement read are loaded; touching another one of the item
    # fetches it, as for any deferred field. Its responses come loaded.
    item = Item.from_db(
        connection.alias,
        ["id", "campaign_id", "prompt", "context", "is_gold"],
        [item_id, campaign.pk, prompt, _CONTEXT.from_db_value(context, None, connection), is_gold],
    )
    rows.prefetched(
        item,
        "responses",
        [
            Response.from_db(
                connection.alias,
                ["id", "item_id", "position", "text"],
                [response_id, item_id, position, text],
            )
            for *_, response_id, position, text in found
        ],
    )
    assignment = Assignment(
        pk=pk,
        item=item,
        campaign=campaign,
        rater=rater,
        status=Assignment.LEASED,
        left_position=left_position,
        leased_at=leased_at,
        expires_at=expires_at,
    )
    assignment._state.adding, assignment._state.db = False, connection.alias
    return assignment


def _lock_candidate(campaign: Campaign, rater, *, gold: bool):
    seen = Assignment.objects.filter(item=OuterRef("pk"), rater=rater)
    candidates = Item.objects.filter(campaign=campaign, is_gold=gold).exclude(Exists(seen))
    if gold:
        candidates = candidates.order_by("taken", "id")  # spread gold checks across gold items
    else:
        # Fill items that already have labels first, so complete items (and agreement figures)
        # appear early instead of every item holding one label.
        candidates = candidates.filter(taken__lt=campaign.overlap).order_by("-taken", "id")
    if connection.features.has_select_for_update_skip_locked:
        candidates = candidates.select_for_update(skip_locked=True, of=("self",))
    return candidates.only("id", "prompt", "context").first()


_last_expiry: dict[int, float] = {}


def _expire_now_and_then(campaign: Campaign, now) -> None:
    """Expire leases lazily, at most once a second per campaign and process, so most claims
    skip the query; a claim that finds nothing expires at once (assignment_claim), and the
    periodic ``grading.leases_expire`` task covers idle campaigns."""
    stamp = now.timestamp()
    if stamp - _last_expiry.get(campaign.pk, 0.0) >= 1.0:
        _last_expiry[campaign.pk] = stamp
        leases_expire(campaign=campaign, now=now)


def leases_expire(*, campaign: Campaign | None = None, now=None) -> int:
    """Return the slots of expired leases to the pool. Call inside or outside a transaction."""
    now = now or timezone.now()
    expired = Assignment.objects.expired(now)
    if campaign is not None:
        expired = expired.filter(campaign=campaign)
    return _expire(expired, now, skip_locked=True)


def _expire(leases, now, *, skip_locked: bool = False) -> int:
    """Mark ``leases`` expired and give their items' slots back; ``skip_locked`` leaves leases
    another transaction is handling (a submit, another expiry) instead of waiting for them."""
    # No savepoint: inside a claim this is part of the claim's transaction (two round trips
    # fewer on the hottest path); called alone it is its own transaction.
    with transaction.atomic(savepoint=False):
        if connection.features.has_select_for_update_skip_locked:
            leases = leases.select_for_update(skip_locked=skip_locked)
        rows = list(leases.filter(status=Assignment.LEASED).values_list("pk", "item_id"))
        if not rows:
            return 0
        Assignment.objects.filter(pk__in=[pk for pk, _ in rows]).update(
            status=Assignment.EXPIRED, finished_at=now
        )
        for item_id, count in Counter(item_id for _, item_id in rows).items():
            Item.objects.filter(pk=item_id).update(taken=F("taken") - count)
    return len(rows)


def assignment_submit(*, assignment: Assignment, data: dict) -> Label:
    """Record a rater's label. Idempotent: a second submit returns the first label unchanged.

    ``data``: side by side {"choice": "left_better" | "tie_both_good" | …};
    single-sided {"scores": {aspect: 1..5}, "unsafe": bool, "comment": str}.
    A label sent after the lease expired is kept while the item still needs labels.
    """
    if assignment.status == Assignment.LEASED and _fast_path():
        fields = _label_fields(assignment, data)  # invalid input raises before any write
        label = _submit_statement(assignment, fields)
        if label is not None:
            return label
    with transaction.atomic():
        a = (
            Assignment.objects.select_for_update(of=("self",))
            .select_related("item", "campaign")
            .get(pk=assignment.pk)
        )
        if a.status == Assignment.SUBMITTED:
            return a.label
        if a.status == Assignment.SKIPPED:
            raise GradingError("you skipped this task; it cannot be submitted")
        fields = _label_fields(a, data)
        position = fields.pop("preferred_position")
        now = timezone.now()
        late = a.status == Assignment.EXPIRED or a.expires_at <= now
        if a.status == Assignment.EXPIRED:
            _retake_slot(a)
        label = Label.objects.create(
            assignment=a,
            item=a.item,
            campaign=a.campaign,
            rater_id=a.rater_id,
            late=late,
            seconds=(now - a.leased_at).total_seconds(),
            created_at=now,
            preferred=None if position is None else a.item.responses.get(position=position),
            **fields,
        )
        a.status, a.finished_at = Assignment.SUBMITTED, now
        a.save(update_fields=["status", "finished_at"])
        Item.objects.filter(pk=a.item_id).update(labelled=F("labelled") + 1)
    return label


# Close a live lease, count the label on its item and store it — one statement. The guard
# ``status = 'leased'`` is evaluated under the assignment's row lock, so a double submit, a
# skip or an expiry racing with it makes it change nothing and return no row.
_SUBMIT_SQL = """
WITH done AS (
    UPDATE grading_assignment SET status = 'submitted', finished_at = %(now)s
    WHERE id = %(assignment)s AND status = 'leased'
    RETURNING id, item_id
), counted AS (
    UPDATE grading_item SET labelled = labelled + 1 WHERE id = (SELECT item_id FROM done)
)
INSERT INTO grading_label (assignment_id, item_id, campaign_id, rater_id, preferred_id, level,
                           picked_left, scores, unsafe, comment, seconds, late, gold_correct,
                           created_at)
SELECT done.id, done.item_id, %(campaign)s, %(rater)s,
       (SELECT r.id FROM grading_response r
        WHERE r.item_id = done.item_id AND r.position = %(position)s),
       %(level)s, %(picked_left)s, %(scores)s::jsonb, %(unsafe)s, %(comment)s, %(seconds)s,
       %(late)s, %(gold_correct)s, %(now)s
FROM done
RETURNING id, preferred_id
"""


def _submit_statement(a: Assignment, fields: dict) -> Label | None:
    now = timezone.now()
    fields = {
        "level": "",
        "picked_left": None,
        "scores": {},
        "unsafe": False,
        "comment": "",
        **fields,
        "late": a.expires_at <= now,
        "seconds": (now - a.leased_at).total_seconds(),
        "created_at": now,
    }
    position = fields.pop("preferred_position")
    params = {
        **fields,
        "now": now,
        "assignment": a.pk,
        "campaign": a.campaign_id,
        "rater": a.rater_id,
        "position": position,
        "scores": json.dumps(fields["scores"]),
    }
    with connection.cursor() as cursor:
        cursor.execute(_SUBMIT_SQL, params)
        row = cursor.fetchone()
    if row is None:
        return None
    a.status, a.finished_at = Assignment.SUBMITTED, now
    label = Label(
        pk=row[0],
        assignment=a,
        item_id=a.item_id,
        campaign_id=a.campaign_id,
        rater_id=a.rater_id,
        preferred_id=row[1],
        **fields,
    )
    label._state.adding, label._state.db = False, connection.alias
    return label


def _retake_slot(a: Assignment) -> None:
    item = Item.objects.select_for_update().get(pk=a.item_id)
    if not item.is_gold and item.taken >= a.campaign.overlap:
        raise LeaseLost(
            "your lease on this task expired and the item already has all the "
            "labels it needs; please take the next task"
        )
    Item.objects.filter(pk=item.pk).update(taken=F("taken") + 1)


def _label_fields(a: Assignment, data: dict) -> dict:
    return a.campaign.task_kind.label_fields(a, data)


def assignment_skip(*, assignment: Assignment, reason) -> None:
    """Give a task back with a reason; the rater is never offered that item again."""
    reason = rater_text(reason, "reason", MAX_REASON).strip()
    if not reason:
        raise GradingError("say why you skip this task")
    with transaction.atomic():
        a = Assignment.objects.select_for_update().get(pk=assignment.pk)
        if a.status == Assignment.SKIPPED:
            return
        if a.status == Assignment.SUBMITTED:
            raise GradingError("this task is already submitted")
        if a.status == Assignment.LEASED:
            Item.objects.filter(pk=a.item_id).update(taken=F("taken") - 1)
        a.status, a.skip_reason, a.finished_at = Assignment.SKIPPED, reason, timezone.now()
        a.save(update_fields=["status", "skip_reason", "finished_at"])
