import django.db.models.deletion
import django.utils.timezone
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("evalhub", "0006_job_heartbeat"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.CreateModel(
            name="PromptSet",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("name", models.SlugField(max_length=100)),
                ("version", models.PositiveIntegerField(default=1)),
                ("description", models.TextField(blank=True)),
                (
                    "source",
                    models.CharField(
                        blank=True, help_text="file name or builtin:NAME", max_length=1000
                    ),
                ),
                ("content_hash", models.CharField(max_length=64)),
                ("records", models.JSONField(default=list)),
                ("n_records", models.PositiveIntegerField(default=0)),
                ("max_turns", models.PositiveSmallIntegerField(default=1)),
                ("categories", models.JSONField(blank=True, default=dict)),
                ("created_at", models.DateTimeField(default=django.utils.timezone.now)),
                (
                    "created_by",
                    models.ForeignKey(
                        blank=True,
                        null=True,
                        on_delete=django.db.models.deletion.SET_NULL,
                        related_name="+",
                        to=settings.AUTH_USER_MODEL,
                    ),
                ),
            ],
            options={
                "ordering": ["name", "-version"],
                "constraints": [
                    models.UniqueConstraint(
                        fields=("name", "version"), name="uniq_prompt_set_version"
                    )
                ],
            },
        ),
    ]
