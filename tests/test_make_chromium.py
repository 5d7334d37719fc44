"""`make test` finds Chromium, installs it when missing, and says what to do when it cannot."""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def make_chromium(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "-s", "chromium", *overrides], cwd=ROOT, capture_output=True, text=True
    )


def test_an_installed_chromium_is_used_without_installing(tmp_path):
    browser = tmp_path / "chromium"
    browser.write_text("#!/bin/sh\n")
    browser.chmod(0o755)
    result = make_chromium(f"CHROMIUM={browser}", "APT_GET=false")
    assert result.returncode == 0 and result.stderr == ""


def test_a_missing_chromium_is_installed_through_apt(tmp_path):
    browser = tmp_path / "chromium"
    apt = tmp_path / "apt-get"  # stands in for apt-get: "installs" the browser on install
    apt.write_text(
        f'#!/bin/sh\necho "$@" >> {tmp_path}/apt.log\n'
        f'[ "$1" = install ] && printf "#!/bin/sh\\n" > {browser} && chmod +x {browser}\nexit 0\n'
    )
    apt.chmod(0o755)
    result = make_chromium(f"CHROMIUM={browser}", f"APT_GET={apt}")
    if result.returncode != 0 and "sudo" in result.stderr:
        pytest.skip("not root and no passwordless sudo to run apt-get with")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "apt.log").read_text().split("\n")[1].startswith("install -y -qq chromium")


def test_a_chromium_that_cannot_be_installed_fails_with_what_to_do(tmp_path):
    result = make_chromium(f"CHROMIUM={tmp_path}/none", "APT_GET=false")
    assert result.returncode != 0
    assert "make test needs Chromium at" in result.stderr
    assert "sudo apt-get install chromium" in result.stderr
