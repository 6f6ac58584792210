"""Environment manifests: redaction, classification, environment keys, effective config, config audit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_repro._judge.drift import category, diff_manifests, run_only_fields, run_only_note
from pytest_repro.context import TrackedConfig
from pytest_repro.manifest import (
    REDACTED,
    SECRET_NAME,
    collect_manifest,
    environment_key,
    redact_env,
    vendor_from_cpuinfo,
    vendor_from_model,
)
from pytest_repro.schema import effective_config
from pytest_repro.splits import load_split, make_split

leaf = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=4))
trees = st.recursive(leaf, lambda c: st.dictionaries(st.sampled_from(list("abcdef")), c, max_size=4), max_leaves=12)
manifests = st.dictionaries(st.sampled_from(["torch", "gpu", "git", "host", "env", "packages"]), trees, max_size=6)


pytest.importorskip("deepdiff")
relaxed = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@relaxed
@given(manifests)
def test_diff_of_a_manifest_with_itself_is_empty(m: dict[str, Any]) -> None:
    assert diff_manifests(m, json.loads(json.dumps(m))) == []


@relaxed
@given(manifests, manifests)
def test_diff_is_symmetric_in_which_fields_changed(a: dict[str, Any], b: dict[str, Any]) -> None:
    forward = {(d.path, d.category) for d in diff_manifests(a, b)}
    backward = {(d.path, d.category) for d in diff_manifests(b, a)}
    assert forward == backward
    flips = {"added": "removed", "removed": "added", "changed": "changed"}
    assert {(d.path, flips[d.change]) for d in diff_manifests(a, b)} == {
        (d.path, d.change) for d in diff_manifests(b, a)
    }


secret_words = st.sampled_from(["TOKEN", "SECRET", "PASSWORD", "API_KEY", "ACCESS_KEY", "CREDENTIAL", "AUTH"])
prefixes = st.sampled_from(["CUDA_", "NCCL_", "TORCH_", "MKL_", "OMP_", "HF_", "AWS_", ""])
values = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=8, max_size=24)


@given(prefixes, secret_words, st.sampled_from(["", "_X", "_VALUE"]), values)
def test_redaction_never_leaks_a_secret_looking_variable(prefix: str, word: str, suffix: str, value: str) -> None:
    name = f"{prefix}{word}{suffix}"
    env = {name: value, "OMP_NUM_THREADS": "4", "HOME": "/root"}
    out = redact_env(env)
    assert value not in json.dumps(out)
    assert out.get(name, REDACTED) == REDACTED
    assert out["OMP_NUM_THREADS"] == "4" and "HOME" not in out
    assert SECRET_NAME.search(name)


def test_manifest_never_holds_secrets_or_plain_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NCCL_AUTH_TOKEN", "hunter2hunter2")
    monkeypatch.setenv("CUDA_LAUNCH_BLOCKING", "1")
    m = collect_manifest()
    text = json.dumps(m)
    assert "hunter2hunter2" not in text
    assert m["env"]["NCCL_AUTH_TOKEN"] == REDACTED and m["env"]["CUDA_LAUNCH_BLOCKING"] == "1"
    import getpass
    import socket

    assert m["host"]["hostname"].startswith("sha256:") and socket.gethostname() not in text
    assert getpass.getuser() not in json.dumps(m["host"])
    assert collect_manifest(identity="omit")["host"] == {"hostname": None, "user": None}
    assert collect_manifest(identity="plain")["host"]["hostname"] == socket.gethostname()
    for key in ("container", "pip", "torch", "cpu", "packages", "git", "determinism"):
        assert key in m


def test_probes_that_fail_record_their_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import pytest_repro.manifest as manifest

    def broken() -> dict[str, Any]:
        raise OSError("no /proc here")

    monkeypatch.setattr(manifest, "_cpu", broken)
    assert collect_manifest()["cpu"] == {"error": "OSError: no /proc here"}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("torch.version", "numeric"),
        ("gpu.0.driver", "numeric"),
        ("env.OMP_NUM_THREADS", "numeric"),
        ("packages.peft", "numeric"),
        ("git.commit", "code"),
        ("git.dirty", "code"),
        ("host.hostname", "cosmetic"),
        ("collected_at", "cosmetic"),
        ("python.executable", "cosmetic"),
        ("python.version", "numeric"),
        ("os.libc", "numeric"),
        ("pip.freeze_sha256", "cosmetic"),
        ("whatever", "cosmetic"),
    ],
)
def test_drift_categories(path: str, expected: str) -> None:
    assert category(path) == expected


def _cpu_manifest(model: str, vendor: str | None, capability: str | None, machine: str = "x86_64") -> dict[str, Any]:
    cpu: dict[str, Any] = {"model": model, "machine": machine}
    if vendor is not None:
        cpu["vendor"] = vendor
    return {"cpu": cpu, "torch": {"cpu_capability": capability}, "gpu": [], "env": {"OMP_NUM_THREADS": "4"}}


@pytest.mark.parametrize(
    ("manifest", "key"),
    [
        (_cpu_manifest("AMD EPYC 9654", "amd", "AVX512"), "cpu-amd-avx512"),
        (_cpu_manifest("Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", "intel", "AVX2"), "cpu-intel-avx2"),
        (_cpu_manifest("Neoverse-V1", "arm", "NO AVX", machine="aarch64"), "cpu-arm-default"),
        (_cpu_manifest("", "arm", "DEFAULT", machine="aarch64"), "cpu-arm-default"),
        (_cpu_manifest("", "arm", "SVE256", machine="aarch64"), "cpu-arm-sve256"),
        (_cpu_manifest("Mystery CPU", "unknown", None), "cpu-unknown-unknown"),
        ({"cpu": {"error": "OSError: no /proc here"}, "torch": {"installed": False}}, "cpu-unknown-unknown"),
        ({}, "cpu-unknown-unknown"),
        # recorded before cpu.vendor existed: the vendor comes from the model string
        (_cpu_manifest("AMD EPYC", None, "AVX512"), "cpu-amd-avx512"),
        (_cpu_manifest("AMD Ryzen 9 7950X 16-Core Processor", None, "AVX512"), "cpu-amd-avx512"),
        (_cpu_manifest("Intel(R) Core(TM) i7-8700 CPU", None, "AVX2"), "cpu-intel-avx2"),
        (_cpu_manifest("Genuine Xeon", None, "AVX2"), "cpu-intel-avx2"),
        (_cpu_manifest("", None, "NO", machine="aarch64"), "cpu-arm-default"),  # old regex kept only "NO"
        (_cpu_manifest("Some CPU", None, "AVX2"), "cpu-unknown-avx2"),
    ],
)
def test_cpu_environment_keys_name_vendor_and_capability(manifest: dict[str, Any], key: str) -> None:
    assert environment_key(manifest, "cpu") == key


def test_gpu_environment_keys_and_extra_fields() -> None:
    m = {
        **_cpu_manifest("AMD EPYC", "amd", "AVX512"),
        "gpu": [{"capability": "9.0"}, {"capability": "8.0"}],
    }
    assert environment_key(m, "cuda") == "cuda-sm90"
    assert environment_key(m, "cuda:1") == "cuda-sm80"
    assert environment_key({}, "cuda") == "cuda"
    assert environment_key(m, "cpu", ["env.OMP_NUM_THREADS"]) == "cpu-amd-avx512_OMP_NUM_THREADS-4"
    assert environment_key(m, "cuda", ["env.OMP_NUM_THREADS"]) == "cuda-sm90_OMP_NUM_THREADS-4"


@pytest.mark.parametrize(
    ("cpuinfo", "vendor"),
    [
        ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n", "amd"),
        ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R)\n", "intel"),
        ("processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\nCPU part\t: 0xd40\n", "arm"),
        ("processor\t: 0\nvendor_id\t: HygonGenuine\n", None),
        ("", None),
    ],
)
def test_cpu_vendor_from_cpuinfo(cpuinfo: str, vendor: str | None) -> None:
    assert vendor_from_cpuinfo(cpuinfo) == vendor


def test_cpu_vendor_from_model_and_machine() -> None:
    assert vendor_from_model("AMD EPYC 7R13 Processor") == "amd"
    assert vendor_from_model("Intel(R) Xeon(R) CPU") == "intel"
    assert vendor_from_model("Apple M2", "arm64") == "arm"
    assert vendor_from_model("", "aarch64") == "arm"
    assert vendor_from_model("Harmony 3000", "x86_64") == "unknown"  # no word match inside other words


def test_this_machine_manifest_names_its_cpu_vendor_and_key() -> None:
    m = collect_manifest()
    assert m["kind"] == "job" and m["cpu"]["vendor"] in ("amd", "intel", "arm", "unknown")
    assert environment_key(m, "cpu").startswith(f"cpu-{m['cpu']['vendor']}-")
    assert collect_manifest(kind="cli")["kind"] == "cli"
    with pytest.raises(ValueError, match="kind must be job or cli"):
        collect_manifest(kind="plain")


def _job_and_cli() -> tuple[dict[str, Any], dict[str, Any]]:
    job = {
        "kind": "job",
        "torch": {"version": "2.5.0", "intra_op_threads": 1, "inter_op_threads": 1},
        "determinism": {"use_deterministic_algorithms": True, "cudnn_benchmark": False},
        "env": {
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "PYTHONHASHSEED": "0",
            "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
            "CUDA_VISIBLE_DEVICES": "0",
        },
    }
    cli = {
        "kind": "cli",
        "torch": {"version": "2.5.0", "intra_op_threads": 16, "inter_op_threads": 16},
        "determinism": {"use_deterministic_algorithms": False, "cudnn_benchmark": False},
        "env": {"CUDA_VISIBLE_DEVICES": "0"},
    }
    return job, cli


def test_a_cli_manifest_is_not_compared_on_run_only_fields() -> None:
    job, cli = _job_and_cli()
    assert diff_manifests(job, cli) == [] and diff_manifests(cli, job) == []
    assert "determinism" in run_only_fields(job, cli) and "env.PYTHONHASHSEED" in run_only_fields(job, cli)
    note = run_only_note(job, cli)
    assert note is not None and "\n" not in note
    assert note.startswith("not compared: determinism.*, torch.intra_op_threads, torch.inter_op_threads")
    assert "a job manifest vs a cli manifest" in note
    # what is not run-only is still compared
    cli["torch"]["version"] = "2.6.0"
    cli["env"]["CUDA_VISIBLE_DEVICES"] = "1"
    assert [(d.path, d.category) for d in diff_manifests(job, cli)] == [
        ("env.CUDA_VISIBLE_DEVICES", "numeric"),
        ("torch.version", "numeric"),
    ]
    # a manifest recorded before "kind" existed is a job manifest
    old = {k: v for k, v in job.items() if k != "kind"}
    assert diff_manifests(old, cli) == diff_manifests(job, cli)


def test_two_manifests_of_one_kind_compare_every_field() -> None:
    job, cli = _job_and_cli()
    other = {**cli, "kind": "job"}
    paths = {d.path for d in diff_manifests(job, other)}
    assert {"determinism.use_deterministic_algorithms", "torch.intra_op_threads"} <= paths
    assert any(p.startswith("env") for p in paths)  # (deepdiff reports a mostly-changed section whole)
    assert run_only_fields(job, other) == [] and run_only_note(job, other) is None
    old = {k: v for k, v in job.items() if k != "kind"}
    assert diff_manifests(old, job) == []  # a missing kind is "job": no invented drift


def test_effective_config_tags_every_field_with_its_provenance() -> None:
    from pytest_repro.jobs.lora import LoraJobConfig

    eff = effective_config(LoraJobConfig, {"train": {"lr": 0.01}}, "fixtures/x.yaml")
    assert eff["train.lr"] == {"value": 0.01, "source": "user:fixtures/x.yaml"}
    assert eff["train.steps"] == {"value": 24, "source": "default"}
    assert eff["lora.scaling"] == {"value": 2.0, "source": "derived"}
    assert eff["train.examples_seen"] == {"value": 24 * 8, "source": "derived"}
    assert list(eff) == sorted(eff), "stable order, so that records diff cleanly"
    assert effective_config(None, {"lr": 1}, "dict") == {"lr": {"value": 1, "source": "user:dict"}}


def test_config_audit_flags_undeclared_reads_and_unused_keys() -> None:
    cfg = TrackedConfig({"lr": 0.1, "model": {"width": 4, "depth": 2}, "unused": 1, "opt": {"beta": 0.9}})
    assert cfg["lr"] == 0.1
    assert cfg["model"]["width"] == 4
    assert cfg.get("steps", 10) == 10
    assert cfg["model"].get("dropout", 0.0) == 0.0
    dict(**cfg["opt"])  # a section handed on whole counts as used
    assert "unused" in cfg  # a membership test is not a read
    assert cfg.audit() == {"undeclared_reads": ["model.dropout", "steps"], "unused_keys": ["model.depth", "unused"]}


def test_stratified_split_keeps_label_proportions(tmp_path: Path) -> None:
    src = tmp_path / "d.jsonl"
    rows = [{"id": f"e{i}", "label": "a" if i < 80 else "b", "text": f"t{i}"} for i in range(100)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "s.json"
    data = make_split(src, out, {"train": 0.75, "eval": 0.25}, seed=3, stratify_by="label")
    assert data["method"] == "stratified:label"
    split = load_split(out, src)
    labels = [r["label"] for r in split.splits["eval"]]
    assert labels.count("a") == 20 and labels.count("b") == 5


def test_a_manifest_recorded_before_cpu_vendor_existed_shows_no_vendor_drift() -> None:
    old = {"cpu": {"model": "AMD EPYC", "machine": "x86_64"}}
    assert diff_manifests(old, {"cpu": {**old["cpu"], "vendor": "amd"}}) == []
    [drift] = diff_manifests(old, {"cpu": {**old["cpu"], "vendor": "intel"}})
    assert (drift.path, drift.old, drift.new, drift.category) == ("cpu.vendor", "amd", "intel", "numeric")
