"""`pytest --repro` on a user-style job vs cold processes, with an empty and a warm pytest cache, in one run.

The job is written the way users write theirs: a tiny Llama + LoRA (r=8) built from a LlamaConfig,
20 AdamW steps on seeded random tokens, torch/transformers/peft imported *inside* the job function,
no ``__repro_preload__``. It lives in a generated project (its own rootdir and pytest cache):

- one test (2 runs + reference check) vs 2 cold processes     (goal: ratio <= 0.55)
- five parametrized tests vs 10 cold processes               (goal: ratio <= 0.22)

each timed, with a worker of the session's own (``--repro-worker=session``, as CI runs), first with an empty
pytest cache (``.pytest_cache`` removed) and then with the cache the previous run left; then with the worker
daemon (``--repro-worker=daemon``): the first session (no daemon running: it starts one) and the second
session (the daemon warm; goals: one test <= 0.25, five tests <= 0.08 of the cold processes). A cold process
is ``python -c`` running the job exactly as a harness child does (same spec, seeding, determinism flags and
record writing), one after the other, 2 per test. Every phase of a repeat runs in one loop, side by side.

Usage: python benchmarks/bench_user_job.py [--repeats N] [--json PATH] [--hypothesis] [--parallel-runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench_harness import timed  # the benchmarks folder is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent
LRS = (0.001, 0.002, 0.003, 0.004, 0.005)

USER_JOB = '''
"""A user's job: every heavy import inside the function, no preload attribute."""


def train(ctx):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = ctx.config
    config = LlamaConfig(
        vocab_size=cfg["vocab"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = get_peft_model(
        LlamaForCausalLM(config),
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    gen = ctx.generator()
    data = torch.randint(0, cfg["vocab"], (64, 16), generator=gen)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg["lr"])
    losses = []
    model.train()
    for _ in range(cfg["steps"]):
        batch = data[torch.randint(0, 64, (8,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        out = model(input_ids=data[:8], labels=data[:8])
    return {
        "losses": losses,
        "weights": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
        "metrics": {"eval_loss": float(out.loss)},
        "outputs": {"logits": out.logits.float()},
    }
'''

TEST_ONE = """
import pytest
from userjob import train


@pytest.mark.reproducible
def test_lora(repro):
    repro.check(train, config={"vocab": 128, "lr": 0.002, "steps": 20})
"""

TEST_FIVE = f"""
import pytest
from userjob import train


@pytest.mark.reproducible
@pytest.mark.parametrize("lr", {list(LRS)!r})
def test_lora(repro, lr):
    repro.check(train, config={{"vocab": 128, "lr": lr, "steps": 20}})
"""

COLD = (
    "import json, sys; from pytest_repro._exec.child import execute; from pytest_repro.context import RunSpec; "
    "sys.exit(execute(RunSpec.from_dict(json.loads(open(sys.argv[1]).read()))))"
)


def make_project(folder: Path, ini: str = "") -> None:
    (folder / "userjob.py").write_text(USER_JOB)
    (folder / "test_one.py").write_text(TEST_ONE)
    (folder / "test_five.py").write_text(TEST_FIVE)
    (folder / "pytest.ini").write_text(f"[pytest]\n{ini}")


def cold_specs(project: Path, nodeid: str, lr: float, scratch: Path) -> list[Path]:
    """The two runs of one test, as the harness would give them to its children."""
    from pytest_repro.context import JobRef, RunSpec
    from pytest_repro.seeding import derive_seed

    paths = []
    for index in range(2):
        workdir = scratch / f"{len(list(scratch.iterdir()))}"
        spec = RunSpec(
            job=JobRef("userjob", "train", str(project / "userjob.py")),
            config={"vocab": 128, "lr": lr, "steps": 20},
            seed=derive_seed(0, nodeid),
            device="cpu",
            deterministic=True,
            run_index=index,
            workdir=str(workdir),
            cwd=str(project),
            sys_path=(str(project),),
            manifest=index == 0,
        )
        path = workdir.with_suffix(".json")
        path.write_text(spec.to_json())
        workdir.mkdir()
        paths.append(path)
    return paths


def cold_env() -> dict[str, str]:
    """The environment the harness gives job processes (repro_threads = 1, deterministic)."""
    from pytest_repro.seeding import determinism_env

    env = determinism_env(True, 0)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return env


def bench(repeats: int, hypothesis: bool, ini: str = "") -> dict[str, dict[str, float]]:
    phases = ("empty_cache_s", "warm_cache_s", "daemon_first_s", "daemon_second_s", "cold_s")
    results: dict[str, dict[str, list[float]]] = {k: {p: [] for p in phases} for k in ("one", "five")}
    with tempfile.TemporaryDirectory() as tmp:
        project, scratch = Path(tmp) / "project", Path(tmp) / "scratch"
        project.mkdir()
        scratch.mkdir()
        make_project(project, ini)
        base = [sys.executable, "-m", "pytest", "--repro", "-q"]
        if not hypothesis:
            base += ["-p", "no:hypothesispytest"]
        session, daemon = [*base, "--repro-worker=session"], [*base, "--repro-worker=daemon"]
        stop = [sys.executable, "-m", "pytest_repro.cli", "worker", "stop"]
        timed([*session, "--repro-regen"], project)  # write the references (not timed)
        env = cold_env()
        cases = {
            "one": ("test_one.py", [("test_one.py::test_lora", 0.002)]),
            "five": ("test_five.py", [(f"test_five.py::test_lora[{lr}]", lr) for lr in LRS]),
        }
        for _ in range(repeats):
            for name, (path, tests) in cases.items():
                timed(stop, project)
                shutil.rmtree(project / ".pytest_cache", ignore_errors=True)
                results[name]["empty_cache_s"].append(timed([*session, path], project))
                results[name]["warm_cache_s"].append(timed([*session, path], project))
                results[name]["daemon_first_s"].append(timed([*daemon, path], project))
                results[name]["daemon_second_s"].append(timed([*daemon, path], project))
                timed(stop, project)
                total = 0.0
                for nodeid, lr in tests:
                    for spec in cold_specs(project, nodeid, lr, scratch):
                        total += timed([sys.executable, "-c", COLD, str(spec)], project, env)
                results[name]["cold_s"].append(total)
    out: dict[str, dict[str, float]] = {}
    for name, times in results.items():
        med = {k: statistics.median(v) for k, v in times.items()}
        med["ratio_empty_cache"] = med["empty_cache_s"] / med["cold_s"]
        med["ratio_warm_cache"] = med["warm_cache_s"] / med["cold_s"]
        med["ratio_daemon_first"] = med["daemon_first_s"] / med["cold_s"]
        med["ratio_daemon_second"] = med["daemon_second_s"] / med["cold_s"]
        med["daemon_first_vs_session"] = med["daemon_first_s"] / med["warm_cache_s"]
        med["cold_per_run_s"] = med["cold_s"] / (2 * len(cases[name][1]))
        out[name] = med
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--hypothesis", action="store_true", help="keep hypothesis' pytest plugin loaded")
    parser.add_argument("--parallel-runs", default="", help="repro_parallel_runs for the project (default: auto)")
    args = parser.parse_args()
    ini = f"repro_parallel_runs = {args.parallel_runs}\n" if args.parallel_runs else ""
    res = bench(args.repeats, args.hypothesis, ini)
    goals = {"one": (0.55, 0.25), "five": (0.22, 0.08)}
    for name, r in res.items():
        n = 1 if name == "one" else len(LRS)
        print(
            f"{n} test(s): cold {r['cold_s']:.2f} s ({2 * n} runs, {r['cold_per_run_s']:.2f} s each) | "
            f"session worker: empty cache {r['empty_cache_s']:.2f} s (ratio {r['ratio_empty_cache']:.3f}), "
            f"warm cache {r['warm_cache_s']:.2f} s (ratio {r['ratio_warm_cache']:.3f}), goal <= {goals[name][0]} | "
            f"daemon: first session {r['daemon_first_s']:.2f} s ({r['daemon_first_vs_session']:.2f} x the session "
            f"worker's), second session {r['daemon_second_s']:.2f} s (ratio {r['ratio_daemon_second']:.3f}), "
            f"goal <= {goals[name][1]}"
        )
    if args.json:
        meta = {
            "cores": os.cpu_count(),
            "repeats": args.repeats,
            "hypothesis_plugin": args.hypothesis,
            "parallel_runs": args.parallel_runs or "auto",
        }
        args.json.write_text(json.dumps({"meta": meta, **res}, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
