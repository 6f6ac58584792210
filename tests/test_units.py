"""Unit tests: seeding, records and the reference store, config schema, splits, Trainer helper, CLI."""

from __future__ import annotations

import copy
import json
import math
import os
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

from pytest_repro import seed_everything, staging  # noqa: E402
from pytest_repro._judge.drift import diff_manifests  # noqa: E402
from pytest_repro.cli import main as cli_main  # noqa: E402
from pytest_repro.context import JobRef, JobReferenceError  # noqa: E402
from pytest_repro.jobs.lora import parse_config  # noqa: E402
from pytest_repro.jobs.trainer import record_from_trainer  # noqa: E402
from pytest_repro.manifest import collect_manifest  # noqa: E402
from pytest_repro.record import CorruptRecordError, Record, load_record, normalize_result, save_record  # noqa: E402
from pytest_repro.schema import ConfigError  # noqa: E402
from pytest_repro.seeding import derive_seed  # noqa: E402
from pytest_repro.splits import SplitError, load_split, make_split  # noqa: E402
from pytest_repro.staging import write_reference  # noqa: E402
from pytest_repro.storage import load_reference, reference_path, safe_name  # noqa: E402

FIXTURES = Path(__file__).parent.parent / "fixtures"


def draw() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_seed_everything_seeds_every_rng_and_restores_as_context_manager() -> None:
    seed_everything(3, deterministic=False)
    first = draw()
    seed_everything(3, deterministic=False)
    assert draw() == first
    before_state = draw()  # advance, then capture what comes next without seeding
    assert before_state != first
    random_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    with seed_everything(3, deterministic=True):
        assert draw() == first
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")
    assert not torch.are_deterministic_algorithms_enabled()
    assert random.getstate() == random_state
    assert np.random.get_state()[1].tolist() == np_state[1].tolist()
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_derive_seed_is_stable_and_per_test() -> None:
    assert derive_seed(0, "tests/test_a.py::test_x") == derive_seed(0, "tests/test_a.py::test_x")
    assert derive_seed(0, "tests/test_a.py::test_x") != derive_seed(0, "tests/test_a.py::test_y")
    assert derive_seed(0, "tests/test_a.py::test_x") != derive_seed(1, "tests/test_a.py::test_x")
    assert derive_seed(0, "tests/test_reproducible.py::test_lora_is_reproducible") == 1112205865  # same everywhere


def sample_record() -> Record:
    return Record(
        losses=[1.5, 1.25, float("nan")],
        weights={"b.weight": torch.arange(6.0).reshape(2, 3), "a.bias": torch.ones(2, dtype=torch.bfloat16)},
        metrics={"acc": 0.5},
        outputs={"logits": torch.zeros(2, 2)},
        meta={"seed": 1, "device": "cpu"},
    )


def test_record_round_trips_bitwise_and_keeps_state_dict_order(tmp_path: Path) -> None:
    r = sample_record()
    save_record(r, tmp_path)
    back = load_record(tmp_path)
    assert list(back.weights) == ["b.weight", "a.bias"]
    assert back.weights["a.bias"].dtype == torch.bfloat16
    assert back.losses[:2] == [1.5, 1.25] and back.losses[2] != back.losses[2]
    assert back.metrics == {"acc": 0.5} and back.seed == 1 and back.device == "cpu"
    text = (tmp_path / "record.json").read_text()
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"  # sorted, stable


def test_tampered_or_truncated_record_is_corrupt(tmp_path: Path) -> None:
    save_record(sample_record(), tmp_path)
    path = tmp_path / "weights.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CorruptRecordError, match="does not match"):
        load_record(tmp_path)
    path.unlink()
    with pytest.raises(CorruptRecordError, match="tensor file is missing"):
        load_record(tmp_path)
    (tmp_path / "record.json").write_text("[]")
    with pytest.raises(CorruptRecordError, match="not a pytest-repro record"):
        load_record(tmp_path)


def test_normalize_result_rejects_malformed_job_results() -> None:
    with pytest.raises(ValueError, match="unknown key"):
        normalize_result({"loss": [1.0]}, {})
    with pytest.raises(ValueError, match="must return a dict"):
        normalize_result([1.0], {})
    with pytest.raises(ValueError, match=r"metrics\['acc'\]: expected a number"):
        normalize_result({"metrics": {"acc": "high"}}, {})
    r = normalize_result({"losses": torch.tensor([1.0, 2.0]), "metrics": {"acc": torch.tensor(0.5)}}, {})
    assert r.losses == [1.0, 2.0] and r.metrics == {"acc": 0.5}


def test_reference_paths_are_filesystem_safe_and_distinct(tmp_path: Path) -> None:
    p = reference_path(tmp_path, "tests/sub/test_x.py::TestA::test_y[cfg/1-a b]")
    assert p.relative_to(tmp_path).parts[:4] == ("tests", "sub", "test_x", "TestA")
    assert "/" not in p.name and " " not in p.name
    assert p != reference_path(tmp_path, "tests/sub/test_x.py::TestA::test_y[cfg_1-a_b]")
    assert safe_name("test_plain") == "test_plain"


def test_killed_regeneration_keeps_the_old_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "ref"
    write_reference(target, sample_record(), {"m": 1}, {"p": 1})
    before = {f.name: f.read_bytes() for f in target.iterdir()}
    newer = sample_record()
    newer.losses = [9.0]
    real_replace = os.replace

    calls = []

    def dying_replace(src: object, dst: object) -> None:
        if Path(str(dst)) == target and not calls:  # interrupted right at the swap
            calls.append(src)
            raise KeyboardInterrupt
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", dying_replace)
    monkeypatch.setattr(staging, "_exchange", lambda a, b: False)  # the two-rename fallback (no renameat2)
    with pytest.raises(KeyboardInterrupt):
        write_reference(target, newer, {"m": 2}, {"p": 2})
    monkeypatch.setattr(os, "replace", real_replace)
    assert {f.name: f.read_bytes() for f in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ref"], "no staging or backup folders left behind"
    assert load_reference(target).record.losses[:2] == [1.5, 1.25]


def test_reference_left_half_swapped_by_a_kill_is_recovered(tmp_path: Path) -> None:
    target = tmp_path / "ref"
    write_reference(target, sample_record(), {}, {})
    os.replace(target, tmp_path / ".ref.old-4242")  # SIGKILL between the two renames leaves this state
    (tmp_path / ".ref.new-4242").mkdir()  # and perhaps a half-written staging folder
    assert load_reference(target).record.losses[:2] == [1.5, 1.25]
    assert not (tmp_path / ".ref.old-4242").exists()


def test_lora_config_errors_list_every_problem() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"lora": {"rank": "8", "alpah": 2}, "train": {"lr": -1, "steps": 0}, "dtype": "fp8", "extra": 1})
    problems = info.value.problems
    assert "lora.rank: expected int > 0, got '8'" in problems
    assert any(p.startswith("lora.alpah: unknown key (did you mean 'alpha'?)") for p in problems)
    assert "train.lr: expected float > 0, got -1.0" in problems
    assert "train.steps: expected int > 0, got 0" in problems
    assert any(p.startswith("dtype: expected one of 'float32'") for p in problems)
    assert any(p.startswith("extra: unknown key") for p in problems)
    assert len(problems) == 6
    with pytest.raises(ConfigError, match="not divisible"):
        parse_config({"model": {"hidden_size": 30, "num_heads": 4}})
    assert parse_config({}).train.steps == 24


def test_shipped_split_is_consistent_with_the_corpus() -> None:
    split = load_split(FIXTURES / "splits_v1.json", FIXTURES / "corpus.jsonl")
    assert {k: len(v) for k, v in split.splits.items()} == {"train": 192, "eval": 36, "probe": 12}


def test_split_checks_catch_changed_source_leakage_and_duplicates(tmp_path: Path) -> None:
    src = tmp_path / "data.jsonl"
    src.write_text("".join(json.dumps({"id": f"e{i}", "text": f"t{i}"}) + "\n" for i in range(10)))
    out = tmp_path / "split.json"
    make_split(src, out, {"train": 0.8, "eval": 0.2}, seed=1)
    assert sum(len(v) for v in load_split(out, src).splits.values()) == 10
    data = json.loads(out.read_text())
    data["splits"]["eval"].append(data["splits"]["train"][0])
    out.write_text(json.dumps(data))
    with pytest.raises(SplitError, match="leakage: id"):
        load_split(out, src)
    make_split(src, out, {"train": 0.8, "eval": 0.2}, seed=1)
    lines = src.read_text().splitlines()
    ev = json.loads(out.read_text())["splits"]["eval"][0]
    tr = json.loads(out.read_text())["splits"]["train"][0]
    rows = [json.loads(x) for x in lines]
    for row in rows:
        if row["id"] == ev:
            row["text"] = next(r["text"] for r in rows if r["id"] == tr)
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SplitError, match="changed since"):
        load_split(out, src)
    make_split(src, out, {"train": 0.8, "eval": 0.2}, seed=1)
    with pytest.raises(SplitError, match="duplicate:"):
        load_split(out, src)


def test_record_from_trainer_reads_log_history_and_skips_timings() -> None:
    model = torch.nn.Linear(2, 2)
    model.bias.requires_grad_(False)
    trainer = SimpleNamespace(
        model=model,
        state=SimpleNamespace(
            log_history=[
                {"loss": 2.0, "grad_norm": 1.0, "step": 1},
                {"loss": 1.5, "step": 2},
                {"train_runtime": 0.1, "train_loss": 1.75},
                {
                    "eval_loss": 1.4,
                    "eval_runtime": 0.01,
                    "eval_samples_per_second": 900.0,
                    "eval_steps_per_second": 9.0,
                },
            ]
        ),
    )
    result = record_from_trainer(trainer)
    assert result["losses"] == [2.0, 1.5]
    assert result["metrics"] == {"eval_loss": 1.4}
    assert list(result["weights"]) == ["weight"]
    assert list(record_from_trainer(trainer, adapter_only=False)["weights"]) == ["weight", "bias"]
    trainer.state.log_history = [{"train_loss": 1.0}]
    with pytest.raises(ValueError, match="logging_steps=1"):
        record_from_trainer(trainer)


def top_level_job(ctx: object) -> dict[str, object]:
    return {"losses": [1.0]}


def test_job_refs_need_importable_top_level_functions() -> None:
    ref = JobRef.from_callable(top_level_job)
    assert ref.name.endswith(":top_level_job") and ref.file is not None and ref.file.endswith("test_units.py")
    with pytest.raises(JobReferenceError, match="importable top-level"):
        JobRef.from_callable(lambda ctx: {})
    assert JobRef.from_callable("pkg.mod:fn").name == "pkg.mod:fn"
    with pytest.raises(JobReferenceError):
        JobRef.from_callable("no_colon")


def test_manifest_and_its_diff(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = collect_manifest()
    assert m["torch"]["version"] == torch.__version__ and m["python"]["version"]
    assert diff_manifests(m, m) == []
    changed = json.loads(json.dumps(m))
    changed["torch"]["version"] = "0.0.0"
    changed["git"]["commit"] = "abc"
    drift = diff_manifests(m, changed)
    assert [(d.path, d.category) for d in drift] == [("torch.version", "numeric"), ("git.commit", "code")]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(m))
    b.write_text(json.dumps(changed))
    assert cli_main(["diff", str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "numeric  torch.version:" in out and "code     git.commit:" in out
    assert cli_main(["diff", str(a), str(a), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"changes": [], "numeric_drift": False}
    assert cli_main(["manifest", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["schema"] == 2


def test_each_xdist_worker_gets_its_own_gpu() -> None:
    from pytest_repro.session import job_env, worker_gpu

    assert [worker_gpu(f"gw{i}", "0,1,2,3", 0) for i in range(6)] == ["0", "1", "2", "3", "0", "1"]
    assert worker_gpu("gw1", "4,7", 0) == "7"
    assert worker_gpu("gw2", None, 2) == "0"
    assert worker_gpu(None, "0,1", 0) is None and worker_gpu("master", "0,1", 0) is None
    assert worker_gpu("gw0", None, 0) is None  # no GPU at all: leave the environment alone
    fake = {"PYTEST_XDIST_WORKER": "gw3", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert job_env("cuda", fake) == {"CUDA_VISIBLE_DEVICES": "1"}
    assert job_env("auto", {"PYTEST_XDIST_WORKER": "gw1"}, count=lambda: 4) == {"CUDA_VISIBLE_DEVICES": "1"}
    assert job_env("cpu", fake) == {} and job_env("cuda", {"CUDA_VISIBLE_DEVICES": "0,1"}) == {}


def test_job_threads_are_pinned() -> None:
    from pytest_repro.session import thread_env

    assert thread_env(1) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    assert thread_env(0) == {}


def hang_and_report_pid(ctx: object) -> dict[str, object]:
    import time

    (Path(ctx.workdir) / "pid").write_text(str(os.getpid()))  # type: ignore[attr-defined]
    time.sleep(600)
    return {"losses": [1.0]}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state  # a zombie waiting to be reaped is not running any more


@pytest.mark.slow
def test_job_processes_die_with_their_worker(tmp_path: Path) -> None:
    import sys
    import threading
    import time

    from pytest_repro._exec.pool import _WORKERS
    from pytest_repro._exec.runner import Runner, fork_supported
    from pytest_repro.context import JobRef, RunSpec

    if not fork_supported():
        pytest.skip("the warm fork worker is Linux-only")
    runner = Runner("fork")
    spec = RunSpec(
        job=JobRef.from_callable(hang_and_report_pid),
        config={},
        seed=0,
        device="cpu",
        deterministic=True,
        run_index=0,
        workdir=str(tmp_path / "run"),
        cwd=str(tmp_path),
        sys_path=tuple(sys.path),
    )
    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(runner.run(spec, 600, 0)))
    thread.start()
    pid_file = tmp_path / "run" / "job" / "pid"
    deadline = time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(pid_file.read_text())
    assert _alive(pid)
    for worker in list(_WORKERS.values()):
        if worker.alive():
            worker.close()  # what happens at exit, or when pytest is interrupted
    thread.join(30)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), "the hanging job outlived its worker"
    assert outcome and outcome[0].status == "crashed"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "copy",
    [dict, lambda c: {**c}, lambda c: c.copy(), lambda c: json.loads(json.dumps(c)), copy.deepcopy, copy.copy],
    ids=["dict", "unpack", "copy-method", "json", "deepcopy", "copy"],
)
def test_config_copies_count_as_reads(copy: Any) -> None:
    from pytest_repro.context import TrackedConfig

    cfg = TrackedConfig({"lr": 0.1, "model": {"size": 4}})
    copied = copy(cfg)
    assert copied["lr"] == 0.1 and copied["model"]["size"] == 4
    assert cfg.audit() == {"undeclared_reads": [], "unused_keys": []}
    untouched = TrackedConfig({"lr": 0.1})
    assert untouched.audit()["unused_keys"] == ["lr"], "a config nobody read is still reported"


def test_non_finite_values_are_counted_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_repro._judge import finite

    monkeypatch.setattr(finite, "_CHUNK", 3)  # chunks of 3 elements: the NaNs fall in different chunks
    t = torch.zeros(4, 5)
    t[1, 2], t[3, 4] = math.nan, math.inf
    found = finite.find_non_finite(Record(weights={"w": t}), lambda section, key: False)
    assert [(f.key, f.count, f.first) for f in found] == [("w", 2, "at index (1, 2)")]


def test_every_public_name_of_the_package_resolves() -> None:
    """`from pytest_repro import X` for each name of __all__ (lazily imported: a moved module breaks only here)."""
    import pytest_repro

    for name in pytest_repro.__all__:
        assert getattr(pytest_repro, name) is not None, name
