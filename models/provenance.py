"""Where a result came from: the source commit and package versions, recorded with checkpoints
(``models.checkpoint``) and evaluation runs (``evalhub.evaluation``). No torch, no Django:
web processes import it without loading either."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path


def source_commit() -> str | None:
    """The commit of the code that is running: ``EVALHUB_COMMIT`` when set (an image built
    without its git directory), else ``git rev-parse HEAD`` of this checkout; None when there
    is neither (an installed package, no git binary, a broken repository). Never raises."""
    if os.environ.get("EVALHUB_COMMIT"):
        return os.environ["EVALHUB_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def package_versions(names: Iterable[str]) -> dict[str, str | None]:
    """Installed version of each named distribution (None: not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions
