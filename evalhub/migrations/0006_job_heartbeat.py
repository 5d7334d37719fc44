from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("evalhub", "0005_eval_run_sample"),
    ]

    operations = [
        migrations.AddField(
            model_name="job",
            name="heartbeat_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
    ]
