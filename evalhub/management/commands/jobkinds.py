"""List the job kinds and their parameters, from their declarations (``core/params.py``)."""

from django.core.management.base import BaseCommand

from core.jobs import KINDS
from core.params import markdown

README_START = "<!-- jobkinds: start (manage.py jobkinds --markdown --write) -->"
README_END = "<!-- jobkinds: end -->"


class Command(BaseCommand):
    help = "List job kinds with their parameters; --markdown prints the README's section."

    def add_arguments(self, parser):
        parser.add_argument("--markdown", action="store_true", help="the README's tables")
        parser.add_argument(
            "--write", action="store_true", help="with --markdown: rewrite README.md's section"
        )

    def handle(self, *args, markdown: bool, write: bool, **options):
        if not markdown:
            for kind in sorted(KINDS):
                names = ", ".join(f.name for f in KINDS[kind].job_params.fields)
                self.stdout.write(f"{kind}: {names}")
            return
        text = readme_section()
        if write:
            from django.conf import settings

            path = settings.BASE_DIR / "README.md"
            path.write_text(replace_section(path.read_text(), text))
            self.stdout.write(f"rewrote the job kinds section of {path}")
        else:
            self.stdout.write(text)


def readme_section() -> str:
    return f"{README_START}\n{markdown(KINDS)}{README_END}"


def replace_section(readme: str, section: str) -> str:
    """``readme`` with the text between the markers (the markers included) replaced."""
    start, end = readme.index(README_START), readme.index(README_END) + len(README_END)
    return readme[:start] + section + readme[end:]
