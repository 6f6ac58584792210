"""A bundle's README.md: what was trained, with what, where, when, and the commands that reproduce it."""

from __future__ import annotations

import contextlib
import functools
import json
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import INDEX_FILE, README_FILE, top_folder


def _checkout(path: Path) -> dict[str, Any]:
    """The git commit, remote URL and dirtiness of a local folder (empty when it is not a git checkout)."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        info: dict[str, Any] = {"commit": git("rev-parse", "HEAD")}
        info["dirty"] = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):  # a checkout without a remote
        info["remote"] = git("remote", "get-url", "origin")
    return info


def install_command(
    name: str, version: str, direct_url: Mapping[str, Any] | None, checkout: Any = _checkout
) -> list[str]:
    """Return the lines that install distribution ``name`` as it is installed here (index, git, checkout, file).

    ``direct_url`` is the distribution's PEP 610 ``direct_url.json`` (None for one installed from an index);
    ``checkout(path)`` says the commit/remote/dirtiness of a local folder it was installed from.
    """
    url = str((direct_url or {}).get("url") or "")
    if not url:
        return [f"pip install {shlex.quote(f'{name}=={version}')}"]
    vcs = (direct_url or {}).get("vcs_info")
    if isinstance(vcs, Mapping) and vcs.get("vcs") == "git":
        at = f"@{vcs['commit_id']}" if vcs.get("commit_id") else ""
        return [f"pip install {shlex.quote(f'{name} @ git+{url}{at}')}"]
    if "dir_info" not in (direct_url or {}) or not url.startswith("file://"):
        return [f"pip install {shlex.quote(url)}   # {name} {version} was installed from this file"]
    from urllib.parse import unquote, urlparse

    folder = Path(unquote(urlparse(url).path))
    git = checkout(folder)
    dirty = " (it had uncommitted changes)" if git.get("dirty") else ""
    if git.get("commit") and git.get("remote"):
        spec = f"{name} @ git+{git['remote']}@{git['commit']}"
        return [f"pip install {shlex.quote(spec)}   # {name} {version} was installed from the checkout {folder}{dirty}"]
    where = f"commit {git['commit']} of the checkout" if git.get("commit") else "the folder"
    return [
        f"# {name} {version} was installed from {where} {folder}{dirty}; elsewhere, use your copy of it:",
        f"pip install {shlex.quote(str(folder))}",
    ]


def installed_as(name: str) -> list[str]:
    """Return the lines that install the distribution ``name`` the way it is installed in this environment."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return []
    try:
        direct = json.loads(dist.read_text("direct_url.json") or "null")
    except ValueError:
        direct = None
    return install_command(dist.metadata["Name"] or name, dist.version, direct if isinstance(direct, dict) else None)


@functools.cache
def _module_distributions() -> Mapping[str, list[str]]:
    import importlib.metadata

    return importlib.metadata.packages_distributions()  # scans every installed distribution: once per process


def _job_distribution(job: str) -> str | None:
    """The installed distribution that provides the job's top-level module, if any (not pytest-repro)."""
    top = job.partition(":")[0].split(".")[0]
    names = [n for n in _module_distributions().get(top, []) if n.lower() != "pytest-repro"]
    return names[0] if names else None


def install_lines(job: str) -> list[str]:
    """The lines that install pytest-repro, and the distribution providing ``job`` if any, as installed here."""
    installs = installed_as("pytest-repro")
    job_dist = _job_distribution(job) if job else None
    if job_dist:
        installs += installed_as(job_dist)
    return installs


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.8g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _field(data: Mapping[str, Any], key: str, first: Mapping[str, Any] | None = None) -> str:
    """A recorded value as text (from ``first`` when it has it): "(absent)" when not recorded, None for a null."""
    for source in (first or {}, data):
        if key in source:
            return _fmt(source[key])
    return "(absent)"


def render_readme(
    index: Mapping[str, Any],
    provenance: Mapping[str, Any],
    manifest: Mapping[str, Any],
    record: Mapping[str, Any],
    outcome: Mapping[str, Any] | None,
    archive: Path | None = None,
    installs: Sequence[str] = (),
) -> str:
    """Write the bundle's README.md: what was trained, with what, where, when, and how to reproduce it.

    ``installs``: the lines that install pytest-repro (and the job's own distribution) as installed at export.
    """
    nodeid = str(index.get("test") or "(unknown test)")
    env_key = index.get("environment_key") or "?"
    meta = record.get("meta") or {}
    git = manifest.get("git") or {}
    torch_info = manifest.get("torch") or {}
    lines = [f"# Reproducibility bundle: `{nodeid}`" + (f" [{index['check']}]" if index.get("check") else ""), ""]
    lines += [
        f"Contents: {index.get('contents')}. Written by pytest-repro {index.get('plugin_version')} on "
        f"{index.get('created')}. Check it with `pytest-repro verify <this archive>`.",
        "",
    ]
    if outcome is not None:
        lines += [
            "## This run's verdict",
            "",
            f"**{str(outcome.get('verdict', '?')).upper()}**: {outcome.get('detail', '')}",
            "",
        ]
        for title, key in (
            ("What changed since the reference", "context"),
            ("Environment drift", "drift"),
            ("Details", "details"),
        ):
            if outcome.get(key):
                lines += [f"{title}:", "", "```text", *(str(line).rstrip() for line in outcome[key]), "```", ""]
        if outcome.get("max_abs"):
            lines += [
                "Largest absolute difference per section: "
                + ", ".join(f"{k} {_fmt(v)}" for k, v in outcome["max_abs"].items()),
                "",
            ]
    if not record:
        lines += [
            "No usable reference is bundled: none was recorded for this environment, or it could not be read.",
            "",
        ]
        lines += [
            "## Reproduce",
            "",
            "```bash",
            f"pytest --repro --repro-regen {shlex.quote(nodeid)}   # record one",
            "```",
            "",
        ]
        return "\n".join(lines)
    job = index.get("job_source") or {}
    lines += ["## What was trained" + (" (the reference)" if outcome is not None else ""), ""]
    lines.append(
        f"- job: `{meta.get('job') or provenance.get('job')}`"
        + (
            f" (module source sha256 `{job['sha256'][:16]}…` at export, {len(job['files'])} file(s))"
            if job.get("found")
            else ""
        )
    )
    config = index.get("config_file") or {}
    lines.append(
        f"- config: {config.get('source') or 'none'}"
        + (f" (bundled as `{config['bundled_as']}`)" if config.get("bundled_as") else "")
    )
    split = index.get("split")
    if split:
        where = split.get("file") or (
            f"{split['packaged']} (shipped with pytest-repro)" if split.get("packaged") else None
        )
        lines.append(f"- split file: `{where or 'not found'}`, sha256 `{split['record_sha256']}`")
    losses = record.get("losses") or []
    if losses:
        lines.append(f"- {len(losses)} loss steps, first {_fmt(losses[0])}, final {_fmt(losses[-1])}")
    for name, value in sorted((record.get("metrics") or {}).items()):
        lines.append(f"- metric {name}: {_fmt(value)}")
    effective = provenance.get("effective_config") or {}
    if effective:
        lines += ["", "| config field | value | source |", "| --- | --- | --- |"]
        for key, entry in sorted(effective.items()):
            entry = entry if isinstance(entry, Mapping) else {"value": entry, "source": "?"}
            lines.append(f"| `{key}` | `{_fmt(entry.get('value'))}` | {entry.get('source')} |")
    lines += ["", "## With what", ""]
    lines.append(
        f"- seed {_field(meta, 'seed', provenance)} (base seed {_field(provenance, 'base_seed')}), "
        f"device {_field(meta, 'device', provenance)}, deterministic {_field(meta, 'deterministic', provenance)}, "
        f"dtype {_field(meta, 'dtype')}"
    )
    packages = {k: v for k, v in (manifest.get("packages") or {}).items() if v}
    lines.append(
        f"- Python {_field(manifest.get('python') or {}, 'version')}, torch {_field(torch_info, 'version')} "
        f"(CUDA {_field(torch_info, 'cuda')}, cuDNN {_field(torch_info, 'cudnn')}, BLAS {_field(torch_info, 'blas')})"
    )
    if packages:
        lines.append("- packages: " + ", ".join(f"{k} {v}" for k, v in sorted(packages.items())))
    lines += ["", "## Where and when", ""]
    cpu = manifest.get("cpu") or {}
    gpus = manifest.get("gpu") or []
    os_info = manifest.get("os") or {}
    lines.append(
        f"- environment key `{env_key}`; OS {_field(os_info, 'system')} {os_info.get('libc') or ''}, "
        f"CPU {_field(cpu, 'model')}" + (f", GPU {', '.join(str(g.get('name')) for g in gpus)}" if gpus else "")
    )
    host = manifest.get("host") or {}
    if host.get("hostname"):
        lines.append(f"- host {host.get('hostname')}")
    if git.get("commit"):
        lines.append(
            f"- git commit `{git['commit']}`"
            + (f" on {git['branch']}" if git.get("branch") and git.get("branch") != "HEAD" else "")
            + (" (with uncommitted changes)" if git.get("dirty") else "")
        )
    else:
        why = (
            f"the git probe failed ({git['error']})"
            if git.get("error")
            else "the project was not a git checkout when the reference was recorded"
        )
        lines.append(f"- no git commit recorded: {why}")
    lines.append(f"- recorded {_field(provenance, 'recorded_at')} by `{_field(provenance, 'command')}`")
    reference = index.get("reference") or f"reference_outputs/.../{env_key}"
    name = archive.name if archive is not None else "bundle.tar.gz"
    top = top_folder(Path(name))
    lines += ["", "## Reproduce", "", "```bash"]
    unpack = f"unzip {shlex.quote(name)}" if name.lower().endswith(".zip") else f"tar -xzf {shlex.quote(name)}"
    lines.append(f"pytest-repro verify {shlex.quote(name)} && {unpack}   # check every hash, then unpack into {top}/")
    if git.get("commit"):
        lines.append(
            f"git checkout {git['commit']}"
            + ("   # the reference was recorded with uncommitted changes" if git.get("dirty") else "")
        )
    else:
        known = " (its job module's sha256 is listed above)" if job.get("found") else ""
        lines.append(f"# no git commit was recorded: get the project's code as it was{known}")
    torch_version = str(packages.get("torch") or torch_info.get("version") or "")
    if torch_version:
        plain, _, build = torch_version.partition("+")
        index_url = f" --index-url https://download.pytorch.org/whl/{build}" if build else ""
        lines.append(f"pip install torch=={plain}{index_url}")
    pins = [f"{k}=={v}" for k, v in sorted(packages.items()) if k != "torch"]
    if pins:
        lines.append("pip install " + " ".join(shlex.quote(p) for p in pins))
    lines += installs or ["pip install " + shlex.quote(f"pytest-repro=={index.get('plugin_version')}")]
    lines.append(f"mkdir -p {shlex.quote(str(reference))}")
    lines.append(f"cp {top}/reference/* {shlex.quote(str(reference))}/   # put the reference where the test looks")
    if any(str(name).startswith("inputs/") for name in (index.get("files") or {})):
        lines.append(f"cp -r {top}/inputs/. .   # the config and data files, at their paths in the rootdir")
    lines.append(f"pytest --repro {shlex.quote(nodeid)}   # retrain and check against the reference")
    lines.append("```")
    lines += ["", f"It was recorded with: `{provenance.get('command')}`."]
    notes = index.get("notes") or []
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "## Files", "", "| file | sha256 | bytes |", "| --- | --- | --- |"]
    for name, entry in sorted((index.get("files") or {}).items()):
        lines.append(f"| `{name}` | `{entry['sha256'][:16]}…` | {entry['size']} |")
    lines.append(f"| `{README_FILE}` | (this file; its hash is in `{INDEX_FILE}`) | |")
    return "\n".join(lines) + "\n"
