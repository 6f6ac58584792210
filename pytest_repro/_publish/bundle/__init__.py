"""Reproducibility bundles: one self-describing archive per reference, and the check of every hash in it.

A bundle (``.tar.gz`` or ``.zip``) holds, under one top folder: ``reference/`` (record.json, the
tensor files, manifest.yaml, provenance.yaml), ``inputs/`` (the config file the job used and the data
files its config names, at their paths relative to the rootdir; the split file among them),
``outcome.json`` for a bundle of a failing check, a ``README.md`` written from all of these, and
``bundle.json``: the index with every file's sha256, the split file's hash, the job's module source
hash and notes on anything that could not be bundled. Nothing is pickled; nothing needs torch.

This module holds the format (member names, the index's version, the error, the archive's name); ``build``
writes a bundle, ``readme`` renders its README.md, ``verify`` checks one and ``publish`` bundles a session's
checks (--repro-bundle-dir).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ...errors import FixableError
from ...storage import parse_yaml, read_yaml_text, safe_name
from ...tensorfile import sha256_file

INDEX_FILE = "bundle.json"
README_FILE = "README.md"
OUTCOME_FILE = "outcome.json"
BUNDLE_FORMAT = "pytest-repro-bundle"
BUNDLE_VERSION = 1
SUFFIXES = (".tar.gz", ".tgz", ".zip")


class BundleError(FixableError):
    """A bundle that cannot be written or read at all: ``problem`` and the ``fix``."""


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


def read_yaml(path: Path) -> dict[str, Any]:
    """Return a YAML mapping from ``path``, or {} when it is missing or not a readable mapping."""
    try:
        data = parse_yaml(read_yaml_text(path))
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def archive_kind(path: Path) -> str:
    """Return 'tar' or 'zip' from the output name; raise BundleError for another suffix."""
    name = path.name.lower()
    if name.endswith((".tar.gz", ".tgz")):
        return "tar"
    if name.endswith(".zip"):
        return "zip"
    raise BundleError(f"{path}: unknown archive type", "name the output *.tar.gz or *.zip")


def top_folder(path: Path) -> str:
    """The archive's top folder: its file name without the archive suffix, made safe."""
    name = path.name
    for suffix in SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return safe_name(name or "bundle")
