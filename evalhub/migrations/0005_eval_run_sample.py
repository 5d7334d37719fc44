from django.db import migrations, models


def mark_full_runs_complete(apps, schema_editor):
    """Runs finished before this field existed were complete exactly when they had no limit."""
    EvalRun = apps.get_model("evalhub", "EvalRun")
    full = [
        run.pk
        for run in EvalRun.objects.filter(metrics__isnull=False).only("settings")
        if not (run.settings or {}).get("limit")
    ]
    EvalRun.objects.filter(pk__in=full).update(complete=True)


class Migration(migrations.Migration):
    dependencies = [
        ("evalhub", "0004_job_data_reward_backend"),
    ]

    operations = [
        migrations.AddField(
            model_name="evalrun",
            name="complete",
            field=models.BooleanField(db_index=True, default=False),
        ),
        migrations.AddField(
            model_name="evalrun",
            name="planned",
            field=models.PositiveIntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="evalrun",
            name="suite_size",
            field=models.PositiveIntegerField(blank=True, null=True),
        ),
        migrations.RunPython(mark_full_runs_complete, migrations.RunPython.noop),
    ]
