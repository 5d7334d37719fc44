"""The ``evalhub`` console script (``manage.py`` installed in the virtualenv) and the README's
command lines: each names a real command and options that command takes."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import get_commands, load_command_class
from django.db import connection

from core.models import ApiToken
from grading.services import assignment_claim, assignment_submit
from tests.factories import make_campaign, make_items

EVALHUB = Path(sys.executable).parent / "evalhub"
needs_script = pytest.mark.skipif(
    not EVALHUB.exists(),
    reason=f"{EVALHUB} is missing: this virtualenv predates [project.scripts]; "
    "run `.venv/bin/pip install -e .` (make install does)",
)
ROOT = Path(settings.BASE_DIR)
OURS = ("evaluate", "import_model", "create_api_token", "export", "posttrain", "jobkinds")
OURS += ("inferenceserver", "runplatform", "bootstrap")


def evalhub(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(EVALHUB), *args],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@needs_script
@pytest.mark.parametrize("where", ["suites", "outside"])
def test_evalhub_lists_evalhubs_commands_from_any_directory(where, tmp_path):
    done = evalhub("help", cwd=ROOT / "suites" if where == "suites" else tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Type 'evalhub help <subcommand>'" in done.stdout
    listed = set(re.findall(r"^ {4}(\w+)$", done.stdout, re.M))
    assert set(OURS) <= listed, set(OURS) - listed


@needs_script
def test_a_commands_help_reads_evalhub_and_an_unknown_command_fails_by_name():
    done = evalhub("evaluate", "--help", cwd=ROOT)
    assert done.returncode == 0 and "usage: evalhub evaluate" in done.stdout
    assert "--suite" in done.stdout and "--limit" in done.stdout
    done = evalhub("evalute", cwd=ROOT)
    assert done.returncode == 1 and "Unknown command: 'evalute'" in done.stderr


@needs_script
@pytest.mark.django_db(transaction=True)  # the subprocess reads what this test committed
def test_create_api_token_through_evalhub_prints_a_token_that_authenticates(carol, tmp_path):
    url = _test_db_url()
    done = evalhub("create_api_token", "carol", "--name", "ci", cwd=tmp_path, DATABASE_URL=url)
    assert done.returncode == 0, done.stderr
    raw = done.stdout.strip()
    assert raw.startswith("evh_") and ApiToken.objects.authenticate(raw) == carol
    assert ApiToken.objects.get(user=carol).name == "ci"

    done = evalhub("create_api_token", "nobody", cwd=tmp_path, DATABASE_URL=url)
    assert done.returncode == 1 and "no user named 'nobody'" in done.stderr
    assert ApiToken.objects.count() == 1


def _test_db_url() -> str:
    db = connection.settings_dict
    return f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"


@needs_script
@pytest.mark.django_db(transaction=True)
def test_evalhub_export_writes_a_campaigns_labels_where_it_is_run(alice, tmp_path):
    campaign = make_campaign(overlap=1)
    make_items(campaign, 3)
    while (a := assignment_claim(rater=alice, campaign=campaign)) is not None:
        assignment_submit(assignment=a, data={"choice": "left_better"})

    done = evalhub("export", str(campaign.pk), cwd=tmp_path, DATABASE_URL=_test_db_url())
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (tmp_path / f"campaign{campaign.pk}.jsonl").open()]
    assert len(rows) == 3 and {"prompt", "chosen", "rejected"} <= set(rows[0])
    assert f"wrote 3 rows of {campaign.name!r}" in done.stdout

    out = tmp_path / "labels.csv"
    args = ("export", str(campaign.pk), "--format", "csv", "--out", str(out))
    assert evalhub(*args, cwd=ROOT, DATABASE_URL=_test_db_url()).returncode == 0
    assert len(out.read_text().splitlines()) == 4  # header and 3 rows
    done = evalhub("export", "999999", cwd=tmp_path, DATABASE_URL=_test_db_url())
    assert done.returncode == 1 and "no campaign with id 999999" in done.stderr


def _readme_command_lines() -> list[tuple[str, list[str]]]:
    """(command, options) of each `evalhub CMD …` or `manage.py CMD …` the README shows."""
    readme = (ROOT / "README.md").read_text()
    found = []
    for match in re.finditer(r"(?:\bevalhub|\bmanage\.py) ([a-z_]+)([^`\n#]*)", readme):
        found.append((match[1], re.findall(r"(?<!\S)(--[a-z][a-z-]*)", match[2])))
    return found


def test_every_command_line_in_the_readme_names_a_real_command_and_real_options():
    lines = _readme_command_lines()
    assert {name for name, _ in lines} >= {"evaluate", "import_model", "create_api_token"}
    commands = get_commands()
    for name, options in lines:
        if name == "help":
            continue
        assert name in commands, f"README runs `evalhub {name}`, which does not exist"
        parser = load_command_class(commands[name], name).create_parser("evalhub", name)
        known = {s for action in parser._actions for s in action.option_strings}
        assert set(options) <= known, f"evalhub {name}: no option {set(options) - known}"


def test_the_readme_runs_python_from_the_virtualenv_only():
    readme = (ROOT / "README.md").read_text()
    bare = re.findall(r"(?<![/\w.-])(?:python3?|pip) [^\s`]+", readme)
    assert not bare, f"commands outside .venv/bin (not installed on a fresh clone): {bare}"
