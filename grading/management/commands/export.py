from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from grading.exports import FORMATS, SUFFIXES, export_file
from grading.models import Campaign


class Command(BaseCommand):
    help = (
        "Write a campaign's labels to a file in this process (the grading.export job's formats): "
        "JSONL in the TRL / OpenRLHF preference schema, CSV, Parquet or TRL conversational."
    )

    def add_arguments(self, parser):
        parser.add_argument("campaign_id", type=int, help="the campaign's id (its page's URL)")
        parser.add_argument("--format", default="jsonl", choices=FORMATS)
        parser.add_argument(
            "--include-ties", action="store_true", help="keep tied pairs (left out by default)"
        )
        parser.add_argument("--out", help="file to write (default: campaignID.FORMAT here)")

    def handle(self, *args, campaign_id: int, format: str, include_ties: bool, out, **options):
        campaign = Campaign.objects.filter(pk=campaign_id).first()
        if campaign is None:
            raise CommandError(f"no campaign with id {campaign_id}")
        path = Path(out or f"campaign{campaign.pk}.{SUFFIXES.get(format, format)}")
        if not path.parent.is_dir():
            raise CommandError(f"--out: no directory {path.parent}")
        n = export_file(campaign, format, path, include_ties=include_ties)
        self.stdout.write(self.style.SUCCESS(f"wrote {n} rows of {campaign.name!r} to {path}"))
