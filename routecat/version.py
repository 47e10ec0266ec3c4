"""What code is running: the package version and the git commit of the checkout, if any.

Read once at start-up from the files under ``.git`` (no subprocess on any hot path).
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path


def package_version() -> str:
    try:
        return metadata.version("routecat")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


def git_commit(start: Path | None = None) -> str:
    """The short commit hash of the checkout holding this package, or ``unknown``."""
    here = (start or Path(__file__)).resolve()
    for folder in [here, *here.parents]:
        git = folder / ".git"
        if git.is_dir():
            return _resolve_head(git)
    return "unknown"


def _resolve_head(git: Path) -> str:
    try:
        head = (git / "HEAD").read_text(encoding="utf-8").strip()
        if not head.startswith("ref: "):
            return head[:7] or "unknown"
        ref = head[5:]
        ref_file = git / ref
        if ref_file.is_file():
            return ref_file.read_text(encoding="utf-8").strip()[:7]
        packed = git / "packed-refs"
        if packed.is_file():
            for line in packed.read_text(encoding="utf-8").splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1] == ref:
                    return parts[0][:7]
    except OSError:
        pass
    return "unknown"
