"""A rater holds at most one lease per campaign. Before the index, surplus leases that
concurrent claims created (issue 14) are expired as leases_expire() would: the newest stays,
the others end "expired" and give their item's slot back."""

from django.db import migrations, models
from django.db.models import Count, F


def expire_surplus_leases(apps, schema_editor):
    Assignment = apps.get_model("grading", "Assignment")
    Item = apps.get_model("grading", "Item")
    from django.utils import timezone

    now = timezone.now()
    doubled = (
        Assignment.objects.filter(status="leased")
        .values("rater_id", "campaign_id")
        .annotate(n=Count("id"))
        .filter(n__gt=1)
    )
    for pair in doubled:
        leases = Assignment.objects.filter(
            status="leased", rater_id=pair["rater_id"], campaign_id=pair["campaign_id"]
        ).order_by("-leased_at", "-id")
        for lease in list(leases)[1:]:
            Assignment.objects.filter(pk=lease.pk).update(status="expired", finished_at=now)
            Item.objects.filter(pk=lease.item_id).update(taken=F("taken") - 1)


class Migration(migrations.Migration):

    dependencies = [
        ("grading", "0002_fewer_write_indexes"),
    ]

    operations = [
        migrations.RunPython(expire_surplus_leases, migrations.RunPython.noop),
        migrations.AddConstraint(
            model_name="assignment",
            constraint=models.UniqueConstraint(
                condition=models.Q(("status", "leased")),
                fields=("rater", "campaign"),
                name="uniq_live_lease_per_rater",
            ),
        ),
    ]
