"""A check's job config: load it (a dict or a YAML file) and validate it against the job's schema."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config that cannot be used: ``problem`` is what the user is told, ``detail`` the short form."""

    def __init__(self, problem: str, detail: str | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.detail = problem if detail is None else detail


def load_config(
    config: str | Path | Mapping[str, Any] | None, rootdir: Path, test_dir: Path
) -> tuple[dict[str, Any], str | None]:
    """Return the config as a dict and the folder of its YAML file (None for a dict); raise ConfigError."""
    if config is None:
        return {}, None
    if isinstance(config, Mapping):
        data = dict(config)
        try:
            json.dumps(data)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"config must be JSON-serializable ({exc})") from None
        return data, None
    if not isinstance(config, (str, Path)):
        raise ConfigError(f"config must be a dict or a YAML file path, got {type(config).__name__}")
    path = Path(config)
    candidates = [path] if path.is_absolute() else [rootdir / path, test_dir / path]
    found = next((p for p in candidates if p.is_file()), None)
    folder = next((p for p in candidates if p.is_dir()), None)
    if found is None and folder is not None:
        raise ConfigError(f"config {str(config)!r} is a folder ({folder}), not a YAML file")
    candidates = list(dict.fromkeys(candidates))
    if found is None:
        raise ConfigError(f"config file {str(config)!r} not found (looked in: {', '.join(str(p) for p in candidates)})")
    try:
        data = yaml.safe_load(found.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {found} is not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {found} must hold a YAML mapping, got {type(data).__name__}")
    return data, str(found.parent)


def config_source(config: Any) -> str:
    """How provenance names where a config came from: its path, or "dict"."""
    return str(config) if isinstance(config, (str, Path)) else "dict"


def validate_config(job: Callable[..., Any] | str, cfg: dict[str, Any], source: str) -> dict[str, dict[str, Any]]:
    """Check the config against the job's schema here, before any process starts; return the effective config."""
    from .schema import effective_config

    validate = getattr(job, "__repro_validate__", None)
    schema = getattr(job, "__repro_schema__", None)
    try:
        if schema is not None and not isinstance(schema, type):
            schema = schema()
        if validate is not None:
            validate(cfg)
        return effective_config(schema, cfg, source)
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc), "invalid config") from None
