"""The code a run ran: zar's version, torch's and torchvision's, and the git commit of the checkout.

Recorded as tags on every training run so that a number can be traced to its code, and checked
again by ``--resume`` so that one run never mixes two versions of it.
"""

from __future__ import annotations

import shutil
import subprocess
from functools import cache
from importlib import metadata
from pathlib import Path

import torch
import torchvision

TAG_VERSION = "zar.version"
TAG_TORCH = "zar.torch_version"
TAG_TORCHVISION = "zar.torchvision_version"
TAG_GIT_COMMIT = "mlflow.source.git.commit"  # MLflow's own tag: the UI shows it as the run's source version
TAG_GIT_DIRTY = "zar.git_dirty"
# What must match for ``--resume`` to continue a run: the same zar at the same commit.
RESUME_KEYS = (TAG_VERSION, TAG_GIT_COMMIT)


def zar_version() -> str:
    try:
        return metadata.version("zar")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


@cache
def code_tags() -> dict[str, str]:
    """The tags that name the code: versions always, the commit where zar's code or the working
    folder is a git checkout (zar's own first: that is the code that trains)."""
    tags = {TAG_VERSION: zar_version(), TAG_TORCH: torch.__version__, TAG_TORCHVISION: torchvision.__version__}
    for folder in (Path(__file__).resolve().parent, Path.cwd()):
        commit = _git(folder, "rev-parse", "HEAD")
        if commit:
            # Tracked files only: untracked ones (results, caches) are not the code that ran.
            status = _git(folder, "status", "--porcelain", "--untracked-files=no")
            tags[TAG_GIT_COMMIT] = commit
            tags[TAG_GIT_DIRTY] = "true" if status else "false"
            break
    return tags


def _git(folder: Path, *args: str) -> str | None:
    """git's stripped output in ``folder``, or None where there is no git or no checkout."""
    git = shutil.which("git")
    if git is None:
        return None
    try:
        done = subprocess.run([git, "-C", str(folder), *args], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def resume_mismatch(tags: dict[str, str]) -> str | None:
    """What differs between the code that started a run (its ``tags``) and this code, or None."""
    now = code_tags()
    for key in RESUME_KEYS:
        then = tags.get(key)
        if then is not None and then != now.get(key):
            return f"{key} was {then}, now {now.get(key, 'none')}"
    return None
