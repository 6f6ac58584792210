"""Reproducibility bundles: one self-describing archive per reference, and the check of every hash in it.

A bundle (``.tar.gz`` or ``.zip``) holds, under one top folder: ``reference/`` (record.json, the
tensor files, manifest.yaml, provenance.yaml), ``inputs/`` (the config file the job used and the data
files its config names, at their paths relative to the rootdir; the split file among them),
``outcome.json`` for a bundle of a failing check, a ``README.md`` written from all of these, and
``bundle.json``: the index with every file's sha256, the split file's hash, the job's module source
hash and notes on anything that could not be bundled. Nothing is pickled; nothing needs torch.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import shlex
import stat
import tarfile
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import yaml

from ..record import RECORD_FILE
from ..storage import MANIFEST_FILE, PLUGIN_FILES, PROVENANCE_FILE, parse_yaml, read_yaml_text, safe_name
from ..tensorfile import sha256_file

INDEX_FILE = "bundle.json"
README_FILE = "README.md"
OUTCOME_FILE = "outcome.json"
BUNDLE_FORMAT = "pytest-repro-bundle"
BUNDLE_VERSION = 1
SUFFIXES = (".tar.gz", ".tgz", ".zip")
MAX_INPUT_BYTES = 64 << 20  # data files larger than this are hashed and listed, not bundled
_SMALL = 16 << 20  # members verify keeps in memory (index, record, provenance)
_PASSING = ("passed", "passed-cross-env", "unchanged", "written")


class BundleError(Exception):
    """A bundle that cannot be written or read at all: ``problem`` and the ``fix``."""

    def __init__(self, problem: str, fix: str) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}")


@dataclass
class Bundle:
    """What goes into one archive: member name -> file path or bytes, plus the index."""

    members: dict[str, Path | bytes] = field(default_factory=dict)
    index: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, name: str, content: Path | bytes, role: str) -> None:
        """Add one member and its hash to the index."""
        if isinstance(content, bytes):
            digest, size = hashlib.sha256(content).hexdigest(), len(content)
        else:
            digest, size = sha256_file(content), content.stat().st_size
        self.members[name] = content
        self.index.setdefault("files", {})[name] = {"sha256": digest, "size": size, "role": role}


# ---------------------------------------------------------------------------------------------- export


def read_yaml(path: Path) -> dict[str, Any]:
    """Return a YAML mapping from ``path``, or {} when it is missing or not a readable mapping."""
    try:
        data = parse_yaml(read_yaml_text(path))
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def tensor_problems(folder: Path) -> list[str]:
    """Return what is inconsistent between record.json and the tensor files beside it (no torch needed)."""
    try:
        body = json.loads((folder / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return [f"{RECORD_FILE}: unreadable ({type(exc).__name__}: {exc})"]
    problems = []
    for section, entry in (body.get("tensors") or {}).items():
        if not isinstance(entry, dict):
            problems.append(f"{RECORD_FILE}: tensors.{section} is not a mapping")
            continue
        name = str(entry.get("file", f"{section}.safetensors"))
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing (record.json lists it)")
        elif sha256_file(path) != entry.get("sha256"):
            problems.append(f"{name}: does not match the sha256 record.json holds for it")
    return problems


def _job_source(job: str | None, rootdir: Path) -> dict[str, Any] | None:
    """Hash the job's module source as found now (a package: every .py file in it)."""
    if not job or ":" not in job:
        return None
    import importlib.util
    import sys

    module = job.partition(":")[0]
    added = str(rootdir) not in sys.path
    if added:
        sys.path.insert(0, str(rootdir))
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError, AttributeError):
        spec = None
    finally:
        if added:
            sys.path.remove(str(rootdir))
    if spec is None or not spec.origin or not Path(spec.origin).is_file():
        return {"job": job, "module": module, "found": False}
    origin = Path(spec.origin)
    depth = len(module.split("."))
    if origin.name == "__init__.py":
        base = origin.parents[depth]
        files = sorted(p for p in origin.parent.rglob("*.py") if "__pycache__" not in p.parts)
    else:
        base = origin.parents[depth - 1]
        files = [origin]
    hashes = {p.relative_to(base).as_posix(): sha256_file(p) for p in files}
    combined = hashlib.sha256("".join(f"{name}\0{digest}\n" for name, digest in hashes.items()).encode()).hexdigest()
    return {"job": job, "module": module, "found": True, "sha256": combined, "files": hashes, "hashed": "at export"}


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


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _input_name(path: Path, rootdir: Path) -> str:
    try:
        return "inputs/" + path.resolve().relative_to(rootdir.resolve()).as_posix()
    except ValueError:
        return f"inputs/_outside_rootdir/{safe_name(path.name)}"


def _packaged_inputs(provenance: Mapping[str, Any], data: dict[str, Any]) -> dict[str, str]:
    """List the shipped data files (``package:NAME``) the effective config names; return them by sha256."""
    from .. import __version__
    from ..jobs import PACKAGED, packaged_file

    effective = provenance.get("effective_config")
    values = effective.values() if isinstance(effective, dict) else ()
    by_hash: dict[str, str] = {}
    for text in sorted(
        {str(e.get("value")) for e in values if isinstance(e, dict) and isinstance(e.get("value"), str)}
    ):
        if not text.startswith(PACKAGED) or text in data:
            continue
        try:
            digest = sha256_file(packaged_file(text))
        except OSError:
            data[text] = {"packaged": f"pytest-repro {__version__}", "found": False}
            continue
        data[text] = {"packaged": f"pytest-repro {__version__}", "sha256": digest}
        by_hash[digest] = text
    return by_hash


def _add_inputs(bundle: Bundle, provenance: Mapping[str, Any], meta: Mapping[str, Any], rootdir: Path) -> None:
    """Bundle the config file the job used and the data files its config names; find the split file."""
    source = str(provenance.get("config_source") or "")
    test_file = str(provenance.get("test") or "").partition("::")[0]
    config_dir = rootdir
    config_entry: dict[str, Any] = {"source": source or None}
    if source and source != "dict":
        given = Path(source)
        candidates = [given] if given.is_absolute() else [rootdir / given, rootdir / Path(test_file).parent / given]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            bundle.notes.append(
                f"the config file {source} was not found (looked in: {', '.join(map(str, candidates))}); "
                "not bundled (its content is in provenance.yaml); export from the project's rootdir (--rootdir)"
            )
        else:
            name = _input_name(found, rootdir)
            bundle.add(name, found, "config")
            config_entry["bundled_as"] = name
            config_dir = found.parent
    bundle.index["config_file"] = config_entry
    split_sha = (meta.get("job_meta") or {}).get("split_sha256") if isinstance(meta.get("job_meta"), dict) else None
    data: dict[str, Any] = {}
    for text in sorted(set(_strings(provenance.get("config") or {}))):
        if not text or "\n" in text or len(text) > 1024:
            continue
        path = Path(text) if Path(text).is_absolute() else config_dir / text
        try:
            if not path.is_file():
                continue
            size = path.stat().st_size
        except OSError:
            continue
        name = _input_name(path, rootdir)
        if name in bundle.members:
            continue
        if size > MAX_INPUT_BYTES or name.startswith("inputs/_outside_rootdir/"):
            why = "over 64 MiB" if size > MAX_INPUT_BYTES else "outside the rootdir"
            data[text] = {"path": str(path), "size": size, "bundled": False}
            bundle.notes.append(f"the data file {path} ({size} bytes) is {why}: listed, not bundled")
            continue
        digest = sha256_file(path)
        role = "split" if split_sha and digest == split_sha else "data"
        bundle.add(name, path, role)
        data[text] = {"bundled_as": name, "sha256": digest}
    packaged = _packaged_inputs(provenance, data)
    bundle.index["data_files"] = data
    if split_sha:
        split_file = next((n for n, e in bundle.index.get("files", {}).items() if e["role"] == "split"), None)
        bundle.index["split"] = {"record_sha256": split_sha, "file": split_file}
        if split_file is None and split_sha in packaged:
            bundle.index["split"]["packaged"] = packaged[split_sha]
        elif split_file is None:
            bundle.notes.append(
                f"the record names a split file with sha256 {split_sha[:12]}…, but no file the config names "
                "has that hash now: the split file changed since the reference was recorded, or it lives elsewhere"
            )


def build_bundle(
    reference: Path | None,
    rootdir: Path,
    outcome: Mapping[str, Any] | None = None,
    created: str | None = None,
    archive: Path | None = None,
) -> Bundle:
    """Assemble a bundle of a reference folder (and, for a failing check, its outcome); raise BundleError."""
    from .. import __version__

    bundle = Bundle()
    stamp = created or datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    provenance: dict[str, Any] = {}
    manifest: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    record: dict[str, Any] = {}
    if reference is not None:
        if not (reference / RECORD_FILE).is_file():
            raise BundleError(f"{reference} holds no {RECORD_FILE}", "pass a reference environment folder")
        problems = tensor_problems(reference)
        if problems:
            raise BundleError(
                f"the reference {reference} is corrupt ({'; '.join(problems)})",
                "regenerate it with pytest --repro --repro-regen, then export again",
            )
        for name in sorted(PLUGIN_FILES):
            if (reference / name).is_file():
                role = {RECORD_FILE: "record", MANIFEST_FILE: "manifest", PROVENANCE_FILE: "provenance"}
                bundle.add(f"reference/{name}", reference / name, role.get(name, name.split(".")[0]))
        record = json.loads((reference / RECORD_FILE).read_text(encoding="utf-8"))
        meta = record.get("meta") or {}
        provenance = read_yaml(reference / PROVENANCE_FILE)
        manifest = read_yaml(reference / MANIFEST_FILE)
        if not provenance:
            bundle.notes.append(f"{reference} holds no readable {PROVENANCE_FILE}: config and command are unknown")
    nodeid = str((outcome or {}).get("nodeid") or provenance.get("test") or "")
    env_key = str(provenance.get("environment_key") or (reference.name if reference else "") or "")
    try:
        shown = str(reference.resolve().relative_to(rootdir.resolve())) if reference else None
    except ValueError:
        shown = str(reference)
    bundle.index.update(
        {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_VERSION,
            "created": stamp,
            "plugin_version": __version__,
            "test": nodeid,
            "check": (outcome or {}).get("name"),
            "environment_key": env_key,
            "reference": shown,
            "files": bundle.index.get("files", {}),
        }
    )
    if reference is not None:
        _add_inputs(bundle, provenance, meta, rootdir)
        bundle.index["job_source"] = _job_source(str(meta.get("job") or provenance.get("job") or ""), rootdir)
    if outcome is not None:
        bundle.add(
            OUTCOME_FILE, (json.dumps(dict(outcome), indent=2, sort_keys=True, default=str) + "\n").encode(), "outcome"
        )
        bundle.index["contents"] = "the reference used and this run's outcome" if reference else "this run's outcome"
        bundle.notes.append(
            "this run's own record (its tensors) is not included: it lives in a scratch folder removed at "
            "session end; outcome.json holds its verdict, loss curves, differences and drift"
        )
    else:
        bundle.index["contents"] = "the reference"
    bundle.index["notes"] = list(bundle.notes)
    job = str(meta.get("job") or provenance.get("job") or "")
    installs = installed_as("pytest-repro")
    job_dist = _job_distribution(job) if job else None
    if job_dist:
        installs += installed_as(job_dist)
    readme = render_readme(bundle.index, provenance, manifest, record, outcome, archive, installs).encode()
    bundle.add(README_FILE, readme, "readme")
    return bundle


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
    top = _top(Path(name))
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


def archive_kind(path: Path) -> str:
    """Return 'tar' or 'zip' from the output name; raise BundleError for another suffix."""
    name = path.name.lower()
    if name.endswith((".tar.gz", ".tgz")):
        return "tar"
    if name.endswith(".zip"):
        return "zip"
    raise BundleError(f"{path}: unknown archive type", "name the output *.tar.gz or *.zip")


def _top(path: Path) -> str:
    name = path.name
    for suffix in SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return safe_name(name or "bundle")


def write_bundle(bundle: Bundle, out: Path) -> None:
    """Write the archive atomically (temp file, then rename); raise BundleError or OSError."""
    kind = archive_kind(out)
    top = _top(out)
    index = (json.dumps(bundle.index, indent=2, sort_keys=True, default=str) + "\n").encode()
    members = [*sorted(bundle.members.items()), (INDEX_FILE, index)]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    mtime = time.time()
    try:
        if kind == "tar":
            with tarfile.open(tmp, "w:gz", format=tarfile.PAX_FORMAT) as tar:
                for name, content in members:
                    info = tarfile.TarInfo(f"{top}/{name}")
                    info.mode, info.mtime = 0o644, mtime
                    if isinstance(content, bytes):
                        info.size = len(content)
                        tar.addfile(info, io.BytesIO(content))
                    else:
                        info.size = content.stat().st_size
                        with open(content, "rb") as fh:
                            tar.addfile(info, fh)
        else:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
                for name, content in members:
                    if isinstance(content, bytes):
                        zf.writestr(f"{top}/{name}", content)
                    else:
                        zf.write(content, f"{top}/{name}")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def export(reference: Path | None, rootdir: Path, out: Path, outcome: Mapping[str, Any] | None = None) -> Bundle:
    """Build and write one bundle; return it (its notes say what could not be bundled)."""
    archive_kind(out)
    bundle = build_bundle(reference, rootdir, outcome, archive=out)
    write_bundle(bundle, out)
    return bundle


def bundle_failing(
    outcomes: list[dict[str, Any]], folder: Path, rootdir: Path
) -> tuple[dict[tuple[str, str | None], Path], list[str]]:
    """Write one bundle per failing check into ``folder``; return the paths by (nodeid, name), and problems."""
    written: dict[tuple[str, str | None], Path] = {}
    problems: list[str] = []
    for o in outcomes:
        if o.get("verdict") in _PASSING:
            continue
        nodeid, name = str(o["nodeid"]), o.get("name")
        path = Path(o["path"]) if o.get("path") else None
        reference = path if path is not None and (path / RECORD_FILE).is_file() else None
        out = folder / (safe_name(nodeid + (f"[{name}]" if name else "")) + ".tar.gz")
        try:
            export(reference, rootdir, out, o)
        except BundleError as exc:
            try:  # a corrupt reference: bundle the outcome alone, which says why
                export(None, rootdir, out, {**o, "details": [*o.get("details", []), exc.problem]})
            except (BundleError, OSError) as again:
                problems.append(f"could not write the bundle {out}: {again}; give a writable --repro-bundle-dir")
                continue
        except OSError as exc:
            problems.append(f"could not write the bundle {out}: {exc}; give a writable --repro-bundle-dir")
            continue
        written[(nodeid, name)] = out
    return written, problems


def bundle_dir_problem(value: str) -> str | None:
    """Say what is wrong with a --repro-bundle-dir value (a file, an unwritable place), or None."""
    path = Path(value)
    current = path
    while not current.exists():
        if current.parent == current:
            break
        current = current.parent
    if current.exists() and not current.is_dir():
        return (
            f"--repro-bundle-dir={value}: {current} is a file, not a folder; "
            "give a folder, e.g. --repro-bundle-dir=repro-bundles"
        )
    if current.exists() and not os.access(current, os.W_OK | os.X_OK):
        return (
            f"--repro-bundle-dir={value}: {current} is not writable; "
            "give a writable folder, e.g. --repro-bundle-dir=/tmp/repro-bundles"
        )
    return None


# ---------------------------------------------------------------------------------------------- verify


@dataclass
class Verification:
    """What ``verify`` found: the index, the lines it checked, and every inconsistency (file first)."""

    index: dict[str, Any] = field(default_factory=dict)
    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def bad_files(self) -> list[str]:
        """The files the problems name, in order."""
        return list(dict.fromkeys(p.split(":", 1)[0] for p in self.problems))


@dataclass
class _Member:
    sha256: str
    size: int
    data: bytes | None


def _digest(fh: IO[bytes], keep: bool) -> _Member:
    digest, size, chunks = hashlib.sha256(), 0, []
    for chunk in iter(lambda: fh.read(1 << 20), b""):
        digest.update(chunk)
        size += len(chunk)
        if keep and size <= _SMALL:
            chunks.append(chunk)
    return _Member(digest.hexdigest(), size, b"".join(chunks) if keep and size <= _SMALL else None)


def _keep(name: str) -> bool:
    return name.endswith((INDEX_FILE, RECORD_FILE, PROVENANCE_FILE))


def _member_name(name: str) -> tuple[str, str | None]:
    """Return a member's name without './' parts (``tar -C dir -czf x.tgz .``), and why extracting it is unsafe."""
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(parts[0]) == 2 and parts[0][1] == ":"):
        return name, "an absolute path: extracting the archive would write outside its folder"
    if ".." in parts:
        return name, "a path with '..': extracting the archive would write outside its folder"
    return "/".join(p for p in parts if p not in ("", ".")), None


def _read_members(archive: Path, damaged: list[str]) -> dict[str, _Member]:
    """Hash every regular member; note damage naming the member; raise BundleError if it is no archive."""
    import gzip
    import zlib

    fix = "pass an archive written by 'pytest-repro export' or --repro-bundle-dir"
    try:
        with open(archive, "rb") as fh:
            magic = fh.read(4)
    except FileNotFoundError:
        raise BundleError(f"{archive} does not exist", fix) from None
    except IsADirectoryError:
        raise BundleError(f"{archive} is a folder, not a bundle archive", fix) from None
    except OSError as exc:
        raise BundleError(f"cannot read {archive} ({exc.strerror or exc})", fix) from None
    members: dict[str, _Member] = {}
    errors = (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, gzip.BadGzipFile, OSError, ValueError)
    if magic.startswith(b"PK"):
        try:
            zf = zipfile.ZipFile(archive)
        except errors as exc:
            raise BundleError(f"{archive} is not a readable zip archive ({exc})", fix) from None
        with zf:
            for info in zf.infolist():
                name, unsafe = _member_name(info.filename)
                if unsafe:
                    damaged.append(f"{name}: {unsafe}")
                    continue
                if info.is_dir() or not name:
                    continue
                if stat.S_ISLNK(info.external_attr >> 16):
                    damaged.append(f"{name}: not a regular file (a link) in the archive")
                    continue
                try:
                    with zf.open(info) as fh:
                        members[name] = _digest(fh, _keep(name))
                except errors as exc:
                    damaged.append(f"{name}: damaged in the archive ({type(exc).__name__}: {exc})")
        return members
    if not magic.startswith(b"\x1f\x8b") and not tarfile.is_tarfile(archive):
        raise BundleError(f"{archive} is neither a .tar.gz nor a .zip archive", fix)
    current = "(the archive header)"
    try:
        with tarfile.open(archive, "r:gz" if magic.startswith(b"\x1f\x8b") else "r:") as tar:
            for member in tar:
                current, unsafe = _member_name(member.name)
                if unsafe:
                    damaged.append(f"{current}: {unsafe}")
                    continue
                if member.isdir() or not current:
                    continue
                if not member.isfile():
                    damaged.append(f"{current}: not a regular file (a link or device) in the archive")
                    continue
                stream = tar.extractfile(member)
                assert stream is not None
                members[current] = _digest(stream, _keep(current))
    except errors as exc:
        if not members and current == "(the archive header)":
            detail = " ".join(str(exc).split())
            raise BundleError(f"{archive} is damaged or not a .tar.gz archive ({detail})", fix) from None
        damaged.append(f"{current}: damaged in the archive, reading stopped here ({type(exc).__name__}: {exc})")
    return members


def verify(archive: Path) -> Verification:
    """Check every hash in a bundle: the index, record.json's tensor hashes, the split file; raise BundleError."""
    result = Verification()
    damaged: list[str] = []
    raw = _read_members(archive, damaged)
    indexes = [n for n in raw if n == INDEX_FILE or (n.count("/") == 1 and n.endswith("/" + INDEX_FILE))]
    if not indexes:
        if damaged:  # name the files without the archive's top folder, as everywhere else
            result.problems += [p.split("/", 1)[1] if "/" in p.split(":", 1)[0] else p for p in damaged]
            result.problems.append(f"{INDEX_FILE}: not reached, the archive is damaged before it")
            return result
        raise BundleError(
            f"{archive} is not a pytest-repro bundle (no {INDEX_FILE} in it)",
            "pass an archive written by 'pytest-repro export' or --repro-bundle-dir",
        )
    prefix = indexes[0][: -len(INDEX_FILE)]
    members = {n[len(prefix) :]: m for n, m in raw.items() if n.startswith(prefix)}
    result.problems += [p[len(prefix) :] if p.startswith(prefix) else p for p in damaged]
    result.problems += [f"{n}: outside the bundle's folder {prefix or '/'}" for n in raw if not n.startswith(prefix)]
    entry = members.pop(INDEX_FILE)
    try:
        index = json.loads((entry.data or b"").decode("utf-8"))
        if not isinstance(index, dict) or index.get("format") != BUNDLE_FORMAT:
            raise ValueError("not a pytest-repro bundle index")
    except (UnicodeDecodeError, ValueError) as exc:
        result.problems.append(f"{INDEX_FILE}: unreadable ({exc}); nothing else can be checked")
        return result
    if not isinstance(index.get("format_version"), int) or index["format_version"] > BUNDLE_VERSION:
        raise BundleError(
            f"{archive} has bundle format_version {index.get('format_version')!r}; this pytest-repro reads up to "
            f"{BUNDLE_VERSION}",
            "upgrade pytest-repro",
        )
    result.index = index
    listed: dict[str, Any] = index.get("files") or {}
    for name, want in sorted(listed.items()):
        got = members.get(name)
        if got is None:
            if not any(p.startswith(f"{name}:") for p in result.problems):
                result.problems.append(f"{name}: missing from the archive ({INDEX_FILE} lists it)")
            continue
        if got.sha256 != want.get("sha256") or got.size != want.get("size"):
            result.problems.append(
                f"{name}: sha256 {got.sha256[:12]}… ({got.size} bytes) but {INDEX_FILE} lists "
                f"{str(want.get('sha256'))[:12]}… ({want.get('size')} bytes): the file changed after export"
            )
        else:
            result.checked.append(f"{name}  sha256 {got.sha256[:12]}…  {got.size} bytes")
    for name in sorted(set(members) - set(listed)):
        result.problems.append(f"{name}: in the archive but not listed in {INDEX_FILE}")
    _check_record(members, index, result)
    return result


def _check_record(members: Mapping[str, _Member], index: Mapping[str, Any], result: Verification) -> None:
    """Cross-check record.json's tensor hashes, the split file and the provenance against the index."""
    record_member = members.get(f"reference/{RECORD_FILE}")
    if record_member is None or record_member.data is None:
        return
    try:
        record = json.loads(record_member.data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        result.problems.append(f"reference/{RECORD_FILE}: not valid JSON ({exc})")
        return
    for section, entry in (record.get("tensors") or {}).items():
        name = f"reference/{entry.get('file', section + '.safetensors')}"
        got = members.get(name)
        if got is None:
            if not any(p.startswith(f"{name}:") for p in result.problems):
                result.problems.append(f"{name}: missing ({RECORD_FILE} lists it)")
        elif got.sha256 != entry.get("sha256"):
            result.problems.append(
                f"{name}: sha256 {got.sha256[:12]}… but {RECORD_FILE} holds {str(entry.get('sha256'))[:12]}… for it"
            )
        else:
            result.checked.append(f"{name} matches the sha256 {RECORD_FILE} holds for it")
    split = index.get("split") or {}
    job_meta = (record.get("meta") or {}).get("job_meta") or {}
    if job_meta.get("split_sha256") and split.get("record_sha256") != job_meta.get("split_sha256"):
        result.problems.append(f"reference/{RECORD_FILE}: its split_sha256 differs from the one {INDEX_FILE} lists")
    if split.get("file"):
        got = members.get(split["file"])
        if got is not None and got.sha256 != job_meta.get("split_sha256"):
            result.problems.append(
                f"{split['file']}: sha256 {got.sha256[:12]}… but the record's split_sha256 is "
                f"{str(job_meta.get('split_sha256'))[:12]}…: not the split the reference was trained on"
            )
        elif got is not None:
            result.checked.append(f"{split['file']} is the split file the record names (split_sha256)")
    prov_member = members.get(f"reference/{PROVENANCE_FILE}")
    if prov_member is not None and prov_member.data is not None:
        try:
            provenance = yaml.safe_load(prov_member.data.decode("utf-8")) or {}
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            result.problems.append(f"reference/{PROVENANCE_FILE}: not valid YAML ({exc})")
            return
        for key, field_name in (("environment_key", "environment_key"), ("test", "test")):
            if isinstance(provenance, dict) and provenance.get(key) and provenance.get(key) != index.get(field_name):
                result.problems.append(
                    f"reference/{PROVENANCE_FILE}: {key} {provenance.get(key)!r} but {INDEX_FILE} says "
                    f"{index.get(field_name)!r}"
                )
