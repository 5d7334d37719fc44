"""Claiming, leases, submitting and skipping through the service functions."""

import random
import re
from datetime import timedelta

import pytest
from django.utils import timezone

from grading.models import Assignment, Item, Label
from grading.services import (
    GradingError,
    LeaseLost,
    assignment_claim,
    assignment_skip,
    assignment_submit,
    campaign_import,
    leases_expire,
)
from grading.uploads import UploadError
from tests.factories import UserFactory, make_campaign, make_items

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True, params=["one-statement", "orm"])
def write_path(request, monkeypatch):
    """Every behaviour holds on both write paths: PostgreSQL's single statements and the ORM
    transactions that SQLite, gold draws and the fallbacks use."""
    if request.param == "orm":
        monkeypatch.setattr("grading.services._fast_path", lambda: False)
    return request.param


def _raters(n):
    return [UserFactory(username=f"r{i}") for i in range(n)]


def _expire(assignment):
    Assignment.objects.filter(pk=assignment.pk).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )


def test_items_get_at_most_overlap_labels_and_each_rater_sees_an_item_once():
    campaign = make_campaign(overlap=2)
    make_items(campaign, 3)
    seen = {}
    for rater in _raters(5):
        while (a := assignment_claim(rater=rater, campaign=campaign)) is not None:
            assert a.item_id not in seen.setdefault(rater.pk, set())
            seen[rater.pk].add(a.item_id)
            assignment_submit(assignment=a, data={"choice": "left_better"})
    assert sorted(Item.objects.values_list("labelled", flat=True)) == [2, 2, 2]
    assert Label.objects.count() == 6


def test_claim_returns_the_live_lease_instead_of_a_second_task():
    campaign = make_campaign()
    make_items(campaign, 5)
    rater = UserFactory(username="r")
    first = assignment_claim(rater=rater, campaign=campaign)
    assert assignment_claim(rater=rater, campaign=campaign).pk == first.pk
    assert Assignment.objects.count() == 1


def test_an_expired_lease_returns_the_item_to_the_pool():
    campaign = make_campaign(overlap=1)
    make_items(campaign, 1)
    alice, bob = _raters(2)
    lease = assignment_claim(rater=alice, campaign=campaign)
    assert assignment_claim(rater=bob, campaign=campaign) is None
    _expire(lease)
    bobs = assignment_claim(rater=bob, campaign=campaign)
    assert bobs is not None and bobs.item_id == lease.item_id
    lease.refresh_from_db()
    assert lease.status == "expired"


def test_a_late_label_is_kept_while_the_item_still_needs_labels():
    campaign = make_campaign(overlap=2)
    make_items(campaign, 1)
    (alice,) = _raters(1)
    lease = assignment_claim(rater=alice, campaign=campaign)
    _expire(lease)
    leases_expire()
    label = assignment_submit(assignment=lease, data={"choice": "tie_both_good"})
    assert label.late and label.level == "tie_both_good" and label.preferred is None
    item = Item.objects.get()
    assert (item.taken, item.labelled) == (1, 1)


def test_a_late_label_for_an_item_already_full_is_refused_without_changes():
    campaign = make_campaign(overlap=1)
    make_items(campaign, 1)
    alice, bob = _raters(2)
    lease = assignment_claim(rater=alice, campaign=campaign)
    _expire(lease)
    bobs = assignment_claim(rater=bob, campaign=campaign)
    assignment_submit(assignment=bobs, data={"choice": "left_better"})
    with pytest.raises(LeaseLost, match="expired"):
        assignment_submit(assignment=lease, data={"choice": "right_better"})
    assert Label.objects.count() == 1 and Item.objects.get().labelled == 1


def test_a_double_submit_is_idempotent():
    campaign = make_campaign()
    make_items(campaign, 1)
    (rater,) = _raters(1)
    lease = assignment_claim(rater=rater, campaign=campaign)
    first = assignment_submit(assignment=lease, data={"choice": "left_better"})
    again = assignment_submit(assignment=lease, data={"choice": "right_significantly_better"})
    assert again.pk == first.pk and again.level == "better"
    assert Label.objects.count() == 1 and Item.objects.get().labelled == 1


def test_the_label_names_the_response_shown_on_the_chosen_side():
    campaign = make_campaign(overlap=10)
    make_items(campaign, 1)
    positions = set()
    for i, rater in enumerate(_raters(10)):
        lease = assignment_claim(rater=rater, campaign=campaign, rng=random.Random(i))
        label = assignment_submit(assignment=lease, data={"choice": "right_slightly_better"})
        assert label.preferred.position == 1 - lease.left_position
        assert label.picked_left is False and label.level == "slightly_better"
        positions.add(lease.left_position)
    assert positions == {0, 1}  # the sides really are shuffled


@pytest.mark.parametrize(
    "choice, message",
    [
        ("left_awesome", "unknown choice 'left_awesome'"),
        ("middle_better", "unknown choice"),
        ("", "no choice given: choose which response is better, or a tie"),
        ("tie", "unknown choice 'tie'"),
        ("left_tie_both_good", "unknown choice"),
    ],
)
def test_an_unknown_or_missing_choice_is_refused_and_changes_nothing(choice, message):
    campaign = make_campaign()
    make_items(campaign, 1)
    (rater,) = _raters(1)
    lease = assignment_claim(rater=rater, campaign=campaign)
    with pytest.raises(GradingError, match=re.escape(message)):
        assignment_submit(assignment=lease, data={"choice": choice})
    lease.refresh_from_db()
    assert lease.status == "leased" and not Label.objects.exists()


def test_single_sided_scores_are_validated_per_aspect():
    campaign = make_campaign(kind="single_sided")
    make_items(campaign, 1)
    (rater,) = _raters(1)
    lease = assignment_claim(rater=rater, campaign=campaign)
    full = {"instruction_following": 5, "conciseness": 4, "truthfulness": 3, "harmlessness": 5}
    for bad, message in [
        ({**full, "conciseness": 6}, "from 1 to 5"),
        ({k: v for k, v in full.items() if k != "truthfulness"}, "truthfulness"),
        ({**full, "style": 3}, "unknown aspect"),
        ({**full, "harmlessness": "x"}, "harmlessness"),
    ]:
        with pytest.raises(GradingError, match=message):
            assignment_submit(assignment=lease, data={"scores": bad})
    label = assignment_submit(
        assignment=lease, data={"scores": full, "unsafe": True, "comment": "odd"}
    )
    assert label.scores == full and label.unsafe and label.comment == "odd"


def test_skip_needs_a_reason_and_the_item_goes_to_someone_else():
    campaign = make_campaign(overlap=1)
    make_items(campaign, 1)
    alice, bob = _raters(2)
    lease = assignment_claim(rater=alice, campaign=campaign)
    with pytest.raises(GradingError, match="why"):
        assignment_skip(assignment=lease, reason="  ")
    assignment_skip(assignment=lease, reason="needs medical expertise")
    assert assignment_claim(rater=alice, campaign=campaign) is None
    assert assignment_claim(rater=bob, campaign=campaign).item_id == lease.item_id
    with pytest.raises(GradingError, match="skipped"):
        assignment_submit(assignment=lease, data={"choice": "left_better"})


def test_the_quota_stops_a_rater():
    campaign = make_campaign(quota_per_rater=2)
    make_items(campaign, 5)
    (rater,) = _raters(1)
    for _ in range(2):
        lease = assignment_claim(rater=rater, campaign=campaign)
        assignment_submit(assignment=lease, data={"choice": "left_better"})
    with pytest.raises(GradingError, match="quota of 2"):
        assignment_claim(rater=rater, campaign=campaign)


def test_gold_items_are_mixed_in_and_scored():
    campaign = make_campaign(gold_rate=0.5, overlap=1)
    make_items(campaign, 20)
    make_items(campaign, 20, gold={"preferred": 0})
    (rater,) = _raters(1)
    rng = random.Random(7)
    gold_seen = 0
    for _ in range(20):
        lease = assignment_claim(rater=rater, campaign=campaign, rng=rng)
        side = "left" if lease.left_position == 0 else "right"  # always pick uploaded A
        label = assignment_submit(assignment=lease, data={"choice": f"{side}_better"})
        if lease.item.is_gold:
            gold_seen += 1
            assert label.gold_correct is True
        else:
            assert label.gold_correct is None
    assert 4 <= gold_seen <= 16


def test_a_closed_campaign_hands_out_no_tasks():
    campaign = make_campaign(status="closed")
    make_items(campaign, 1)
    with pytest.raises(GradingError, match="not open"):
        assignment_claim(rater=UserFactory(username="r"), campaign=campaign)


def test_an_import_is_all_or_nothing():
    campaign = make_campaign()
    good = (
        b'{"prompt": "p", "response_a": "a", "response_b": "b", "model_a": "m1", "model_b": "m2"}'
    )
    assert campaign_import(campaign=campaign, data=good + b"\n" + good, filename="x.jsonl") == 2
    with pytest.raises(UploadError):
        campaign_import(campaign=campaign, data=good + b"\n{bad", filename="x.jsonl")
    assert Item.objects.count() == 2
    item = Item.objects.first()
    assert [(r.position, r.model_name) for r in item.responses.all()] == [(0, "m1"), (1, "m2")]


def test_a_conversation_item_is_claimed_with_its_earlier_turns(alice):
    from tests.grading.conversations import upload_conversations

    campaign = make_campaign(overlap=1)
    conversations = upload_conversations(campaign, 2)
    a = assignment_claim(rater=alice, campaign=campaign)
    assert a.item.context == conversations[0][:-1] and a.item.messages == conversations[0]
    assert a.item.prompt == conversations[0][-1]["content"]
    label = assignment_submit(assignment=a, data={"choice": "right_better"})
    assert label.level == "better" and label.picked_left is False
