"""The warm worker: what it preloads (found in sources, learned from runs, cached), and runs side by side."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from pytest_repro._exec.preload import Preloads, imports_in, job_names, load_cached, save_cached
from pytest_repro._exec.runner import parallel_runs
from pytest_repro.settings import OPTIONS, SettingsError, base_settings

# ---------------------------------------------------------------- static: what a job's source imports


def _project(tmp_path: Path) -> Path:
    (tmp_path / "jobhelpers.py").write_text("import numpy as np\nimport json\n\ndef f():\n    import yaml\n")
    (tmp_path / "userjob.py").write_text(
        textwrap.dedent(
            """
            from typing import TYPE_CHECKING
            import jobhelpers
            if TYPE_CHECKING:
                import scipy

            def train(ctx):
                import torch
                from safetensors.torch import save_file
                return {"losses": [1.0]}
            """
        )
    )
    (tmp_path / "test_user.py").write_text(
        "import pytest\nfrom userjob import train\n\ndef test_a(repro):\n    repro.check(train)\n"
    )
    return tmp_path


def test_imports_are_found_at_any_depth_but_not_under_type_checking() -> None:
    import ast

    tree = ast.parse("import a.b\nfrom c import d, e\nif TYPE_CHECKING:\n    import f\ndef g():\n    from . import h\n")
    assert imports_in(tree) == [("a.b", (), 0), ("c", ("d", "e"), 0), ("", ("h",), 1)]
    assert job_names(ast.parse("repro.check(train, config={})\nr.check_resume(job=other, at=2)")) == {"train", "other"}


def test_job_scan_finds_third_party_imports_and_follows_user_modules(tmp_path: Path) -> None:
    from pytest_repro.context import JobRef

    project = _project(tmp_path)
    preloads = Preloads([project])
    entries = preloads.for_job(JobRef("userjob", "train", str(project / "userjob.py")))
    assert entries == ["torch", "safetensors.torch:save_file", "numpy", "yaml"]  # in order: job, then helpers
    # never the user's own modules, the standard library, or what only type checkers import
    assert not {"jobhelpers", "userjob", "json", "typing", "scipy"} & {e.partition(":")[0] for e in entries}


def test_test_modules_are_scanned_through_their_jobs(tmp_path: Path) -> None:
    project = _project(tmp_path)
    entries = Preloads([project]).tests([project / "test_user.py"])
    assert entries == ["pytest", "torch", "safetensors.torch:save_file", "numpy", "yaml"]


def test_a_venv_inside_the_rootdir_is_still_third_party(tmp_path: Path) -> None:
    # This repository's own .venv lies under its rootdir: torch there is installed, not the user's code.
    import torch

    root = Path(torch.__file__).resolve().parents[4]  # above lib/pythonX.Y/site-packages/torch
    assert Preloads([root]).third_party("torch")
    assert not Preloads([Path(__file__).resolve().parents[1]]).third_party("pytest_repro")  # editable: the user's


def test_learned_modules_are_filtered_to_preloadable_leaves(tmp_path: Path) -> None:
    preloads = Preloads([tmp_path])
    reported = ["userjob", "helpers", "yaml", "yaml.nodes", "torch.nn", "_pytest_repro_job_1", "mypkg.jobs", "numpy"]
    assert preloads.learned(reported, "mypkg.jobs.train") == ["yaml.nodes", "torch.nn", "numpy"]


# ---------------------------------------------------------------- the cache


class _Cache:
    def __init__(self, value: Any = None) -> None:
        self.data: dict[str, Any] = {} if value is None else {"repro/preload": value}

    def get(self, key: str, default: Any) -> Any:
        return self.data.get(key, default)

    def set(self, key: str, value: Any) -> None:
        self.data[key] = json.loads(json.dumps(value))


def test_cache_merges_drops_failures_and_ignores_garbage() -> None:
    cache = _Cache({"modules": ["torch", "broken", "peft"]})
    assert load_cached(cache) == ["torch", "broken", "peft"]
    assert save_cached(cache, ["torch", "yaml"], drop={"broken"})
    assert load_cached(cache) == ["torch", "peft", "yaml"]
    assert not save_cached(cache, ["yaml"])  # nothing new: not rewritten
    assert load_cached(_Cache(["torch"])) == []
    assert load_cached(_Cache({"modules": "torch"})) == []
    assert load_cached(_Cache({"modules": [1, "@user", "ok"]})) == ["ok"]


# ---------------------------------------------------------------- how many runs side by side


def test_parallel_runs_auto_uses_free_cores_on_cpu_only() -> None:
    assert parallel_runs(0, 2, "cpu", threads=1, cores=2, workers=1) == 2
    assert parallel_runs(0, 5, "cpu", threads=1, cores=16, workers=1) == 5
    assert parallel_runs(0, 5, "cpu", threads=2, cores=4, workers=1) == 2
    assert parallel_runs(0, 2, "cpu", threads=1, cores=2, workers=2) == 1  # two xdist workers share the cores
    assert parallel_runs(0, 2, "cpu", threads=0, cores=8, workers=1) == 1  # torch's default: all cores per run
    assert parallel_runs(0, 2, "cuda", threads=1, cores=8, workers=1) == 1  # GPU memory: one at a time
    assert parallel_runs(3, 2, "cuda", threads=1, cores=1, workers=1) == 2  # asked for: honoured, at most runs


def test_parallel_runs_ini_option(tmp_path: Path) -> None:
    ini: dict[str, Any] = {o.ini: o.default for o in OPTIONS if o.ini}
    ini |= {"repro_manifest_packages": [], "repro_env_key_fields": []}
    assert base_settings(ini, {}, tmp_path).parallel_runs == 0
    assert base_settings({**ini, "repro_parallel_runs": "3"}, {}, tmp_path).parallel_runs == 3
    for bad in ("0", "many"):
        with pytest.raises(SettingsError, match=r"^repro_parallel_runs: expected auto or an integer >= 1"):
            base_settings({**ini, "repro_parallel_runs": bad}, {}, tmp_path)
    # the flag wins over the ini option, and names itself when it is wrong
    three = {**ini, "repro_parallel_runs": "3"}
    assert base_settings(three, {"repro_parallel_runs": "1"}, tmp_path).parallel_runs == 1
    assert base_settings(three, {"repro_parallel_runs": "auto"}, tmp_path).parallel_runs == 0
    with pytest.raises(SettingsError, match=r"^--repro-parallel-runs: expected auto or an integer >= 1"):
        base_settings(ini, {"repro_parallel_runs": "-2"}, tmp_path)


def test_parallel_runs_flag_end_to_end(pytester: pytest.Pytester) -> None:
    """--repro-parallel-runs overrides the ini option: 1 runs a check's runs one after the other, 2 side by side."""
    spans_dir = pytester.path / "spans"
    pytester.makepyfile(
        test_spans=f"""
        import json, os, time
        import pytest

        def job(ctx):
            started = time.time()
            time.sleep(1.0)
            with open(os.path.join({str(spans_dir)!r}, str(os.getpid())), "w") as fh:
                json.dump([started, time.time()], fh)
            return {{"losses": [1.0]}}

        @pytest.mark.reproducible(runs=2)
        def test_spans(repro):
            repro.check(job)
        """
    )
    pytester.makeini("[pytest]\nrepro_config_audit = off\nrepro_parallel_runs = 2\n")

    def overlapped(*args: str) -> bool:
        shutil.rmtree(spans_dir, ignore_errors=True)
        spans_dir.mkdir()
        result = pytester.runpytest_subprocess("--repro", "--repro-regen=all", *args)
        assert result.ret == 0, result.stdout.str()
        first, second = sorted(json.loads(f.read_text()) for f in spans_dir.iterdir())
        return bool(second[0] < first[1])

    assert not overlapped("--repro-parallel-runs=1")
    assert overlapped("--repro-parallel-runs=2")
    bad = pytester.runpytest_subprocess("--repro", "--repro-parallel-runs=lots")
    assert bad.ret == 4
    bad.stderr.fnmatch_lines(["*--repro-parallel-runs: expected auto or an integer >= 1*got 'lots'*"])


# ---------------------------------------------------------------- the worker itself


def uses_yaml(ctx: Any) -> dict[str, Any]:
    import yaml  # a third-party import inside the job, as users write them

    started = time.time()
    time.sleep(float(ctx.config.get("sleep", 0)))
    (Path(ctx.workdir) / "span").write_text(json.dumps([started, time.time()]))
    if ctx.config.get("fail"):
        raise ValueError("boom")
    return {"losses": [float(len(yaml.safe_dump({"seed": ctx.seed})))]}


def torch_job(ctx: Any) -> dict[str, Any]:
    import torch

    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(32, 8)
    losses = []
    for _ in range(10):
        loss = (model(x) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "weights": dict(model.state_dict())}


def lora_job(ctx: Any) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    data = torch.randint(0, 64, (8, 12), generator=ctx.generator())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(4):
        loss = model(input_ids=data, labels=data).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"losses": losses, "weights": adapter}


def _specs(tmp_path: Path, job: Any, n: int, config: dict[str, Any] | None = None, label: str = "run") -> list[Any]:
    from pytest_repro.context import JobRef, RunSpec

    return [
        RunSpec(
            job=JobRef.from_callable(job),
            config=dict(config or {}),
            seed=1234,
            device="cpu",
            deterministic=True,
            run_index=i,
            workdir=str(tmp_path / f"{label}{i}"),
            cwd=str(tmp_path),
            sys_path=tuple(sys.path),
        )
        for i in range(n)
    ]


def _imports(outcome: Any) -> list[str]:
    return json.loads((outcome.workdir / "imports.json").read_text())  # type: ignore[no-any-return]


def _same_records(a: Path, b: Path) -> None:
    """Bitwise: the same losses and the same bytes in every weight."""
    import torch

    from pytest_repro.record import load_record, user_view

    ra, rb = user_view(load_record(a)), user_view(load_record(b))
    assert ra.losses == rb.losses
    assert ra.weights.keys() == rb.weights.keys()
    for name, tensor in ra.weights.items():
        other = rb.weights[name]
        assert tensor.dtype == other.dtype and tensor.shape == other.shape, name
        assert torch.equal(tensor.reshape(-1).view(torch.uint8), other.reshape(-1).view(torch.uint8)), name


def _fork_runner(**kwargs: Any) -> Any:
    from pytest_repro._exec.runner import Runner, fork_supported

    if not fork_supported():
        pytest.skip("the warm fork worker is Linux-only")
    return Runner("fork", extra_env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, **kwargs)


@pytest.mark.slow
def test_worker_learns_what_a_run_imported_and_preloads_it_for_the_next(tmp_path: Path) -> None:
    preloads = Preloads([tmp_path])
    runner = _fork_runner(learn=preloads.learned)
    runner.extra_env["PYTHONPATH"] = str(tmp_path)  # a worker of its own, which has never imported yaml
    first, second = runner.run_many(_specs(tmp_path, uses_yaml, 2), 120, 0, parallel=1)
    assert first.status == second.status == "ok", first.detail + second.detail
    assert "yaml" in _imports(first)  # the worker lacked it ...
    assert any(e.startswith("yaml") for e in runner.preloaded())
    assert not any(n.startswith("yaml") for n in _imports(second))  # ... and had it for the next run


@pytest.mark.slow
def test_runs_side_by_side_overlap_and_stay_bitwise_identical(tmp_path: Path) -> None:
    runner = _fork_runner()
    spans = runner.run_many(_specs(tmp_path, uses_yaml, 2, {"sleep": 1.0}, "sleep"), 120, 0, parallel=2)
    (s1, e1), (s2, e2) = (json.loads((o.workdir / "job" / "span").read_text()) for o in spans)
    assert s2 < e1 and s1 < e2, "the two runs did not run at the same time"
    together = runner.run_many(_specs(tmp_path, torch_job, 3, label="par"), 120, 0, parallel=3)
    one_by_one = runner.run_many(_specs(tmp_path, torch_job, 3, label="seq"), 120, 0, parallel=1)
    assert [o.status for o in together + one_by_one] == ["ok"] * 6
    for outcome in [*together, *one_by_one[1:]]:  # same seed: every run has the bits of the first
        _same_records(outcome.record_dir, one_by_one[0].record_dir)


@pytest.mark.slow
def test_a_failed_run_stops_the_batch(tmp_path: Path) -> None:
    runner = _fork_runner()
    outcomes = runner.run_many(_specs(tmp_path, uses_yaml, 3, {"fail": True}), 120, 0, parallel=1)
    assert [o.status for o in outcomes] == ["error"]
    assert "ValueError: boom" in outcomes[0].detail


@pytest.mark.slow
def test_preloaded_transformers_and_peft_give_the_same_bits_as_a_cold_process(tmp_path: Path) -> None:
    """The user-style job (imports inside the function) forked from a worker that preloaded them vs spawned."""
    from pytest_repro._exec.runner import Runner

    preloads = Preloads([tmp_path])
    runner = _fork_runner(learn=preloads.learned)
    ref = _specs(tmp_path, lora_job, 1)[0].job
    runner.want(preloads.for_job(ref))
    assert {"transformers:LlamaForCausalLM", "peft:get_peft_model"} <= set(runner.wanted)
    forked = runner.run_many(_specs(tmp_path, lora_job, 2, label="fork"), 300, 0, parallel=2)
    learned = runner.run_many(_specs(tmp_path, lora_job, 1, label="learned"), 300, 0)  # with what run 1 taught
    spawner = Runner("spawn", extra_env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    spawned = spawner.run(_specs(tmp_path, lora_job, 1, label="spawn")[0], 300, 0)
    assert [o.status for o in [*forked, *learned, spawned]] == ["ok"] * 4, spawned.detail
    assert not any(n.startswith(("transformers", "peft")) for n in _imports(learned[0]))
    for outcome in [*forked, *learned]:
        _same_records(outcome.record_dir, spawned.record_dir)


BROKEN = "raise RuntimeError('this package is broken')\n"
THREADED = "import threading, time\nthreading.Thread(target=time.sleep, args=(3600,), daemon=True).start()\n"


@pytest.mark.slow
def test_preload_failures_are_reported_once_and_unsafe_imports_retire_the_worker(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "repro_broken_pkg.py").write_text(BROKEN)
    (site / "repro_threaded_pkg.py").write_text(THREADED)
    runner = _fork_runner()
    runner.extra_env["PYTHONPATH"] = str(site)  # its own worker (PYTHONPATH is part of the start-up key)
    runner.want(["repro_broken_pkg", "repro_not_installed_pkg", "repro_threaded_pkg"])
    first = runner.run(_specs(tmp_path, uses_yaml, 1, label="a")[0], 120, 0)
    assert first.status == "ok", first.detail  # a worker that may not fork: the run is spawned instead
    warnings = runner.take_warnings()
    assert len(warnings) == 2, warnings
    assert "could not import repro_broken_pkg (RuntimeError: this package is broken)" in warnings[0]
    assert "Fix:" in warnings[0]
    assert "importing repro_threaded_pkg started a thread" in warnings[1]
    assert "does not preload repro_threaded_pkg" in warnings[1]
    logs = "".join(w.log_path.read_text() for w in runner._retired)
    assert "preloaded" in logs and "could not preload repro_broken_pkg" in logs
    assert "not installed, skipped: repro_not_installed_pkg" in logs
    second = runner.run(_specs(tmp_path, uses_yaml, 1, label="b")[0], 120, 0)
    assert second.status == "ok", second.detail
    assert runner.take_warnings() == []  # reported once
    assert runner.preloaded() == []
    assert {"repro_broken_pkg", "repro_not_installed_pkg", "repro_threaded_pkg"} <= runner.rejected()


# ---------------------------------------------------------------- end to end: the pytest cache

CACHED_JOB = """
def train(ctx):
    import yaml

    return {"losses": [float(len(yaml.safe_dump({"a": 1})))]}
"""


@pytest.mark.slow
def test_what_jobs_import_is_kept_in_pytests_cache(heavy_modules: None, pytester: pytest.Pytester) -> None:
    pytester.makepyfile(cachedjob=CACHED_JOB)
    pytester.makepyfile(
        test_cached="import pytest\nfrom cachedjob import train\n\n"
        "@pytest.mark.reproducible\ndef test_a(repro):\n    repro.check(train)\n"
    )
    pytester.makeini("[pytest]\nrepro_timeout = 60\n")
    pytester.syspathinsert()
    pytester.runpytest("--repro", "--repro-regen").assert_outcomes(passed=1)
    cached = json.loads((pytester.path / ".pytest_cache" / "v" / "repro" / "preload").read_text())["modules"]
    assert "pytest" in cached and any(e.startswith("yaml") for e in cached)
    assert not any(e.startswith(("cachedjob", "test_cached")) for e in cached)
    pytester.runpytest("--repro").assert_outcomes(passed=1)


@pytest.mark.slow
def test_a_base_module_that_makes_forking_unsafe_switches_the_session_to_spawn(tmp_path: Path) -> None:
    from pytest_repro._exec.runner import BASE_PRELOAD, Runner, fork_supported

    if not fork_supported():
        pytest.skip("the warm fork worker is Linux-only")
    (tmp_path / "repro_threaded_base.py").write_text(THREADED)
    runner = Runner("fork", preload=(*BASE_PRELOAD, "repro_threaded_base"), extra_env={"PYTHONPATH": str(tmp_path)})
    outcome = runner.run(_specs(tmp_path, uses_yaml, 1)[0], 120, 0)
    assert outcome.status == "ok", outcome.detail
    assert runner.isolation == "spawn"
    (warning,) = runner.take_warnings()
    assert "importing repro_threaded_base started a thread" in warning and "fresh interpreter" in warning
