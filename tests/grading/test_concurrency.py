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
