"""Config schemas: bare and parametrised containers, Optional, nesting, required fields, bounds."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Optional

import pytest

from pytest_repro.schema import ConfigError, effective_config, field, validate


@dataclass(frozen=True)
class Lora:
    """Bare and parametrised containers side by side."""

    target_modules: list = field(["q_proj", "v_proj"])  # type: ignore[type-arg]
    extra: dict = field({})  # type: ignore[type-arg]
    names: list[str] = field(["a"])
    weights: dict[str, float] = field({"a": 1.0}, ge=0)
    ranks: tuple[int, ...] = field((8,), gt=0)
    shape: tuple[int, str] = field((1, "x"))
    tags: set[str] = field(set())


@dataclass(frozen=True)
class Optim:
    """Optional fields in both spellings, a Literal and an Any."""

    lr: float = field(1e-3, gt=0)
    warmup: int | None = field(None, ge=0)
    schedule: Optional[str] = field(None, choices=("cosine", "linear"))  # noqa: UP045 (the old spelling on purpose)
    betas: list[float] | None = field(None)
    mode: Literal["adam", "sgd"] = field("adam")
    anything: Any = field(None)
    either: int | str = field(0)


@dataclass
class Mutable:
    """A non-frozen nested dataclass (unhashable): its default is copied per instance."""

    depth: int = field(2, ge=1, le=8)


@dataclass(frozen=True)
class Job:
    """Nesting: sections are dataclasses, one of them optional."""

    name: str = field()  # required: no default
    lora: Lora = field(Lora())
    optim: Optim = field(Optim())
    mutable: Mutable = field(Mutable())
    extra_section: Optim | None = field(None)

    def derived(self) -> dict[str, Any]:
        """Derived values, tagged 'derived' in the effective config."""
        return {"optim": {"lr_x1000": self.optim.lr * 1000}}


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(Job, data, "job config")
    return info.value.problems


def test_bare_and_parametrised_containers_are_accepted() -> None:
    cfg = validate(
        Job,
        {
            "name": "x",
            "lora": {
                "target_modules": ["q_proj", 3],  # bare list: any elements
                "extra": {"k": [1, 2]},
                "names": ["a", "b"],
                "weights": {"a": 1, "b": 0.5},  # ints are accepted as floats
                "ranks": [4, 8],
                "shape": [2, "y"],
                "tags": ["t", "t"],
            },
        },
    )
    assert cfg.lora.target_modules == ["q_proj", 3] and cfg.lora.extra == {"k": [1, 2]}
    assert cfg.lora.weights == {"a": 1.0, "b": 0.5} and isinstance(cfg.lora.weights["a"], float)
    assert cfg.lora.ranks == (4, 8) and cfg.lora.shape == (2, "y") and cfg.lora.tags == {"t"}


def test_element_types_bounds_and_shapes_are_checked_with_their_paths() -> None:
    assert problems(
        {
            "name": "x",
            "lora": {
                "target_modules": "q_proj",
                "extra": [1],
                "names": ["a", 2],
                "weights": {"a": "heavy", "b": -1.0, 3: 1.0},
                "ranks": [0],
                "shape": [1],
            },
        }
    ) == [
        "lora.target_modules: expected a list, got 'q_proj'",
        "lora.extra: expected a mapping, got [1]",
        "lora.names[1]: expected str, got 2",
        "lora.weights.a: expected float >= 0, got 'heavy'",
        "lora.weights.b: expected float >= 0, got -1.0",
        "lora.weights key 3: expected str, got 3",
        "lora.ranks[0]: expected int > 0, got 0",
        "lora.shape: expected 2 items (int, str), got [1]",
    ]


def test_optional_fields_accept_none_and_check_the_rest() -> None:
    cfg = validate(Job, {"name": "x", "optim": {"warmup": None, "schedule": "cosine", "betas": [0.9, 1]}})
    assert cfg.optim.warmup is None and cfg.optim.schedule == "cosine" and cfg.optim.betas == [0.9, 1.0]
    assert validate(Job, {"name": "x", "optim": {"either": "s", "anything": object}}).optim.either == "s"
    assert problems(
        {"name": "x", "optim": {"warmup": -1, "schedule": "step", "betas": "0.9", "mode": "rmsprop", "either": 1.5}}
    ) == [
        "optim.warmup: expected int >= 0, got -1",
        "optim.schedule: expected one of 'cosine', 'linear', got 'step'",
        "optim.betas: expected a list of float, got '0.9'",
        "optim.mode: expected one of 'adam', 'sgd', got 'rmsprop'",
        "optim.either: expected int or str, got 1.5",
    ]


def test_nested_sections_required_fields_and_unknown_keys() -> None:
    cfg = validate(Job, {"name": "x", "extra_section": {"lr": 0.5}, "mutable": {"depth": 8}})
    assert cfg.extra_section == Optim(lr=0.5) and cfg.mutable.depth == 8
    assert validate(Job, {"name": "x", "extra_section": None}).extra_section is None
    assert problems({"optim": 3, "mutable": {"depth": 9}, "lora": {"zzz": 1}}) == [
        "name: missing (required, str)",
        "lora.zzz: unknown key; allowed: target_modules, extra, names, weights, ranks, shape, tags",
        "optim: expected a mapping, got 3",
        "mutable.depth: expected int >= 1 and <= 8, got 9",
    ]
    assert "did you mean 'optim'?" in problems({"name": "x", "optm": {}})[0]


def test_mutable_defaults_are_not_shared() -> None:
    a, b = validate(Job, {"name": "a"}), validate(Job, {"name": "b"})
    assert a.mutable == b.mutable and a.mutable is not b.mutable
    assert a.lora.extra is not Lora().extra


def test_effective_config_flattens_containers_and_tags_sources() -> None:
    eff = effective_config(Job, {"name": "x", "lora": {"weights": {"a": 2}}}, "job.yaml")
    assert eff["name"] == {"value": "x", "source": "user:job.yaml"}
    assert eff["lora.weights.a"] == {"value": 2, "source": "user:job.yaml"}
    assert eff["lora.target_modules"] == {"value": ["q_proj", "v_proj"], "source": "default"}
    assert eff["optim.lr_x1000"] == {"value": 1.0, "source": "derived"}


def test_the_builtin_lora_schema_still_validates() -> None:
    from pytest_repro.jobs.lora import LoraJobConfig

    cfg = validate(LoraJobConfig, {"lora": {"target_modules": ["q_proj"]}, "train": {"lr": 1}})
    assert cfg.lora.target_modules == ["q_proj"] and cfg.train.lr == 1.0
    with pytest.raises(ConfigError, match=r"lora.rank: expected int > 0, got '8'"):
        validate(LoraJobConfig, {"lora": {"rank": "8"}})


def test_a_schema_with_unresolvable_annotations_says_how_to_fix_it() -> None:
    @dataclass
    class Local:
        inner: Undefined = field(None)  # type: ignore[name-defined]  # noqa: F821

    with pytest.raises(TypeError, match="define the schema's dataclasses at module level"):
        validate(Local, {})
    assert dataclasses.is_dataclass(Local)
