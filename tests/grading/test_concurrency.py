"""Claiming under real concurrency on PostgreSQL: many threads, each its own connection."""

import threading

import pytest
from django.db import connection, connections
from django.db.models import Count

from grading.models import Assignment, Item
from grading.services import assignment_claim, assignment_submit
from tests.factories import UserFactory, make_campaign, make_items

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True, params=["one-statement", "orm"])
def write_path(request, monkeypatch):
    if request.param == "orm":  # the path gold draws take on PostgreSQL
        monkeypatch.setattr("grading.services._fast_path", lambda: False)


def _run_threads(n, target):
    barrier = threading.Barrier(n)
    errors = []

    def run(i):
        try:
            barrier.wait()
            target(i)
        except Exception as exc:  # noqa: BLE001 - surfaced below
            errors.append(repr(exc))
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors


def test_24_raters_claiming_at_once_never_exceed_overlap_or_repeat_an_item():
    assert connection.vendor == "postgresql"
    campaign = make_campaign(overlap=3)
    make_items(campaign, 30)
    raters = [UserFactory(username=f"c{i}") for i in range(24)]

    def work(i):
        while (a := assignment_claim(rater=raters[i], campaign=campaign)) is not None:
            assignment_submit(assignment=a, data={"choice": "left_better"})

    _run_threads(24, work)
    per_item = Item.objects.values_list("labelled", "taken")
    assert all(labelled <= 3 for labelled, _ in per_item)
    assert sum(labelled for labelled, _ in per_item) == 90  # every slot filled, none twice
    assert all(labelled == taken for labelled, taken in per_item)
    dupes = Assignment.objects.values("item", "rater").annotate(n=Count("id")).filter(n__gt=1)
    assert not dupes.exists()


def test_simultaneous_first_claims_each_get_a_distinct_slot():
    campaign = make_campaign(overlap=1)
    make_items(campaign, 10)
    raters = [UserFactory(username=f"s{i}") for i in range(20)]
    got = [None] * 20

    def claim(i):
        a = assignment_claim(rater=raters[i], campaign=campaign)
        got[i] = a.item_id if a else None

    _run_threads(20, claim)
    items = [g for g in got if g is not None]
    assert len(items) == 10 and len(set(items)) == 10  # 10 slots, 10 winners, no double lease


def test_parallel_next_calls_of_one_rater_share_one_lease():
    """Issue 14: five parallel "next" calls of one rater gave two leases. Each round, eight
    threads of the same rater claim at once: all get the same task, one slot is taken."""
    campaign = make_campaign(overlap=3)
    make_items(campaign, 12)
    rater = UserFactory(username="twin")
    for _ in range(6):
        got = [None] * 8

        def claim(i, got=got):
            got[i] = assignment_claim(rater=rater, campaign=campaign).pk

        _run_threads(8, claim)
        assert len(set(got)) == 1, got
        assert Assignment.objects.filter(rater=rater, status="leased").count() == 1
        assert (
            sum(Item.objects.values_list("taken", flat=True))
            == Assignment.objects.filter(status__in=("leased", "submitted")).count()
        )
        assignment_submit(
            assignment=Assignment.objects.get(pk=got[0]), data={"choice": "tie_both_good"}
        )


def test_parallel_next_calls_after_an_expired_lease_give_one_new_lease():
    """The rater's own expired lease (still "leased" until swept) neither blocks the next
    claim nor lets two through."""
    from datetime import timedelta

    from django.utils import timezone

    campaign = make_campaign(overlap=1)
    make_items(campaign, 12)
    rater = UserFactory(username="late")
    old = assignment_claim(rater=rater, campaign=campaign)
    Assignment.objects.filter(pk=old.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    got = [None] * 8

    def claim(i):
        got[i] = assignment_claim(rater=rater, campaign=campaign).pk

    _run_threads(8, claim)
    assert len(set(got)) == 1 and got[0] != old.pk
    statuses = dict(Assignment.objects.values_list("pk", "status"))
    assert statuses == {old.pk: "expired", got[0]: "leased"}
    assert sum(Item.objects.values_list("taken", flat=True)) == 1
