"""What an optional feature needs installed, and the pip command that adds it the way pytest-repro is installed.

Callers ask ``extras.installed(...)`` through the module, so that a test can pretend a library is missing.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def installed(module: str) -> bool:
    """Whether a top-level module can be imported here (found, not imported: costs nothing)."""
    return importlib.util.find_spec(module) is not None


def extra_install(extra: str) -> str:
    """The pip command that adds pytest-repro's ``extra`` the way pytest-repro is installed here."""
    direct_url = _own_direct_url()
    checkout = Path(__file__).resolve().parents[2]
    if direct_url is None and (checkout / "pyproject.toml").is_file():
        # Running from a source tree whose metadata pip did not record (e.g. a stray .egg-info shadows it).
        direct_url = {"url": checkout.as_uri(), "dir_info": {"editable": True}}
    return extra_install_for(extra, direct_url)


def extra_install_for(extra: str, direct_url: Mapping[str, Any] | None) -> str:
    """The pip command that adds pytest-repro's ``extra`` to an install described by PEP 610 ``direct_url``."""
    url = str((direct_url or {}).get("url") or "")
    vcs = (direct_url or {}).get("vcs_info")
    if isinstance(vcs, Mapping) and vcs.get("vcs") == "git":
        at = f"@{vcs['commit_id']}" if vcs.get("commit_id") else ""
        return f"pip install {shlex.quote(f'pytest-repro[{extra}] @ git+{url}{at}')}"
    if url.startswith("file://") and "dir_info" in (direct_url or {}):
        from urllib.parse import unquote, urlparse

        folder = unquote(urlparse(url).path)
        dir_info = (direct_url or {}).get("dir_info")
        editable = "-e " if isinstance(dir_info, Mapping) and dir_info.get("editable") else ""
        return f"pip install {editable}{shlex.quote(f'{folder}[{extra}]')}"
    return f"pip install {shlex.quote(f'pytest-repro[{extra}]')}"


def _own_direct_url() -> Mapping[str, Any] | None:
    """pytest-repro's PEP 610 ``direct_url.json`` (None when installed from an index, or not installed)."""
    import importlib.metadata

    for dist in importlib.metadata.distributions(name="pytest-repro"):  # an .egg-info in the cwd may come first
        try:
            data = json.loads(dist.read_text("direct_url.json") or "null")
        except ValueError:
            continue
        if isinstance(data, dict):
            return data
    return None


def report_install() -> str:
    """The command that installs the HTML report's matplotlib, or pytest-repro's ``[report]`` extra."""
    return f"install it with: pip install matplotlib (or pytest-repro's extra: {extra_install('report')})"
