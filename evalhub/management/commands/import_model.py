from django.core.management.base import BaseCommand, CommandError

from evalhub.registry import model_import
from models.checkpoint import CheckpointError


class Command(BaseCommand):
    help = (
        "Import a GGUF file or a Hugging Face directory as an EvalHub checkpoint and register it."
    )

    def add_arguments(self, parser):
        parser.add_argument("src", help="path to a .gguf file or a Hugging Face model directory")
        parser.add_argument("--name", required=True, help="registry name (a slug)")
        parser.add_argument("--description", default="")

    def handle(self, *args, src: str, name: str, description: str, **options):
        try:
            model = model_import(src=src, name=name, progress=True, description=description)
        except (CheckpointError, ValueError) as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            self.style.SUCCESS(
                f"registered {model.name}: {model.n_params:,} parameters, {model.location}"
            )
        )
