"""The bad-input and fault matrix: every case asserts the exit code, the verdict in all four places
(terminal section, JSON report, JUnit property, pytest's outcome), the message, and that nothing is lost."""

from __future__ import annotations

import json
import os
import stat
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import env_key, snapshot

pytestmark = pytest.mark.slow

# Jobs steered by config["case"]: each returns (or does) one kind of bad thing.
FAULT_JOBS = """
import os
import signal
import subprocess
import sys
import time

import torch


def base(steps=3):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    x = torch.randn(8, 4)
    losses = []
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        loss = (model(x) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model, x, losses


def job(ctx):
    case = ctx.config.get("case", "ok")
    model, x, losses = base()
    good = {"losses": losses, "weights": dict(model.state_dict()), "metrics": {"acc": 0.5},
            "outputs": {"y": model(x).detach()}}
    if case == "ok":
        return good
    if case == "none":
        return None
    if case == "list":
        return [1, 2]
    if case == "unknown_key":
        return {**good, "extra": 1}
    if case == "empty_losses":
        return {"losses": []}
    if case == "empty_dict":
        return {}
    if case == "bad_loss_type":
        return {"losses": ["a"]}
    if case == "metric_nan":
        return {**good, "metrics": {"acc": float("nan")}}
    if case == "metric_inf":
        return {**good, "metrics": {"acc": float("inf")}}
    if case == "output_nan":
        y = model(x).detach().clone()
        y[0, 1] = float("nan")
        return {**good, "outputs": {"y": y}}
    if case == "weight_inf":
        w = dict(model.state_dict())
        w["bias"] = w["bias"].clone()
        w["bias"][0] = float("inf")
        return {**good, "weights": w}
    if case == "shape":
        return {**good, "outputs": {"y": model(x).detach()[:4]}}
    if case == "dtype":
        return {**good, "outputs": {"y": model(x).detach().double()}}
    if case == "zero_d":
        return {**good, "outputs": {"y": torch.tensor(3.5)}}
    if case == "non_contiguous":
        return {**good, "outputs": {"y": torch.arange(12.0).reshape(3, 4).t()}}
    if case == "bf16":
        return {**good, "outputs": {"y": model(x).detach().to(torch.bfloat16)}}
    if case == "tied":
        emb = torch.nn.Embedding(5, 3)
        head = torch.nn.Linear(3, 5, bias=False)
        head.weight = emb.weight
        return {**good, "weights": {"emb.weight": emb.weight, "head.weight": head.weight}}
    if case == "large":
        return {**good, "weights": {"big": torch.randn(4_000_000, generator=torch.Generator().manual_seed(1))}}
    if case == "fp8":
        return {**good, "weights": {"w": torch.linspace(-2, 2, 8).to(torch.float8_e4m3fn)}}
    if case == "meta":
        return {**good, "outputs": {"y": torch.empty(3, device="meta")}}
    if case == "only_empty_tensor":
        return {"weights": {"w": torch.empty(0)}}
    if case == "sparse":
        return {**good, "outputs": {"y": torch.eye(3).to_sparse()}}
    if case == "raise":
        raise RuntimeError("the job exploded at step 2")
    if case == "exit":
        os._exit(3)
    if case == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if case == "segfault":
        import ctypes
        ctypes.string_at(0)
    if case == "hang":
        time.sleep(3600)
    if case == "huge_output":
        for i in range(20000):
            print("x" * 250, i)
        return good
    if case == "orphan":
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        (ctx.workdir.parent.parent / "orphan.pid").write_text(str(proc.pid))
        return good
    if case == "chdir":
        os.chdir("/")
        return good
    if case == "environ":
        os.environ.clear()
        os.environ["OMP_NUM_THREADS"] = "7"
        return good
    if case == "fork":
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        return good
    if case == "multiprocessing":
        import multiprocessing as mp
        with mp.get_context("fork").Pool(2) as pool:
            squares = pool.map(abs, [-1, -2, -3])
        return {**good, "metrics": {"acc": float(sum(squares))}}
    if case == "noisy_metric":
        return {**good, "metrics": {"acc": 0.5 + ctx.rng.normal(0, 0.01)}}
    if case == "nan_in_run2":
        return {**good, "metrics": {"acc": float("nan") if ctx.run_index == 1 else 0.5}}
    if case == "nan_one_seed":
        return {**good, "metrics": {"acc": float("nan") if ctx.run_index == 2 else 0.5 + ctx.rng.normal(0, 0.01)}}
    if case == "shifted":
        return {**good, "metrics": {"acc": 0.9 + ctx.rng.normal(0, 0.001)}}
    raise ValueError(f"unknown case {case}")
"""

TEST = """
import pytest
from faultjobs import job

@pytest.mark.reproducible{marker}
def test_it(repro{fixtures}):
{body}
"""

PASSING = {"passed", "passed-cross-env", "unchanged", "written"}
LABELS = {"passed": "PASSED", "passed-cross-env": "CROSS-ENV", "unchanged": "UNCHANGED", "written": "WRITTEN",
          "diverged": "DIVERGED", "differs": "DIFFERS", "missing": "MISSING", "corrupt": "CORRUPT", "error": "ERROR",
          "timeout": "TIMEOUT", "non-finite": "NON-FINITE", "test-failed": "TEST-FAILED"}  # fmt: skip


@pytest.fixture
def faults(heavy_modules: None, pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(faultjobs=FAULT_JOBS)
    pytester.makeini("[pytest]\nrepro_timeout = 30\n")
    pytester.syspathinsert()
    return pytester


def write(p: pytest.Pytester, case: str = "ok", marker: str = "", body: str | None = None, fixtures: str = "") -> None:
    body = body or f'    repro.check(job, config={{"case": "{case}"}})'
    p.makepyfile(test_fault=TEST.format(marker=marker, body=body, fixtures=fixtures))


def ref(p: pytest.Pytester) -> Path:
    return p.path / "reference_outputs" / "test_fault" / "test_it" / env_key()


def run(p: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, dict[str, str], str]:
    """Run pytest and check that every place agrees; return the result, verdict by place, and the output."""
    result = p.runpytest("--repro", "--repro-report=r.json", "--junitxml=j.xml", "-rA", *args)
    out = result.stdout.str() + result.stderr.str()
    places: dict[str, str] = {}
    report_file = p.path / "r.json"
    if result.ret == pytest.ExitCode.USAGE_ERROR:
        return result, places, out
    report = json.loads(report_file.read_text())
    report_file.unlink()
    assert report["exitstatus"] == int(result.ret), "the JSON report states the run's true exit status"
    tests = {t["nodeid"] + (f"[{t['name']}]" if t["name"] else ""): t for t in report["tests"]}
    junit = ET.parse(p.path / "j.xml").getroot()
    for case in junit.iter("testcase"):
        props = {q.get("name"): q.get("value") for q in case.iter("property")}
        failed = any(case.find(tag) is not None for tag in ("failure", "error", "skipped"))
        for name, value in props.items():
            if not (name or "").startswith("repro_verdict"):
                continue
            assert not (value in PASSING and failed), f"JUnit shows {value} for a test that did not pass"
            places["junit"] = str(value)
        assert not any((name or "") == "repro_outcome" for name in props), "JUnit carries only short properties"
    for key, t in tests.items():
        assert not (t["verdict"] in PASSING and t["test_outcome"] != "passed"), f"{key}: {t}"
        label = LABELS[t["verdict"]]
        assert any(line.startswith(label) and t["nodeid"] in line for line in out.splitlines()), (
            f"terminal section lacks {label} {t['nodeid']}"
        )
        places["json"] = t["verdict"]
        places["outcome"] = t["test_outcome"]
    if "junit" in places and "json" in places:
        assert places["junit"] == places["json"]
    return result, places, out


@dataclass
class Case:
    """One row of the matrix."""

    id: str
    case: str = "ok"
    args: tuple[str, ...] = ()
    ret: int = 1
    verdict: str | None = None
    says: tuple[str, ...] = ()
    marker: str = ""
    body: str | None = None
    setup: Callable[[pytest.Pytester], None] | None = None  # runs after the first --repro-regen
    first: str | None = "ok"  # the case recorded first as the reference (None: no reference)
    first_marker: str | None = None  # the marker of that first run (default: the case's)
    untouched: bool = True  # the reference written first must be byte-for-byte as before
    extra: Callable[[pytest.Pytester, str], None] | None = None
    env: dict[str, str] = field(default_factory=dict)
    conftest: str | None = None
    fixtures: str = ""  # more fixtures the test requests, e.g. ", subtests"


def _weights(p: pytest.Pytester) -> Path:
    return ref(p) / "weights.safetensors"


def truncate(p: pytest.Pytester) -> None:
    _weights(p).write_bytes(_weights(p).read_bytes()[:-9])


def flip(p: pytest.Pytester) -> None:
    data = bytearray(_weights(p).read_bytes())
    data[-3] ^= 0x01
    _weights(p).write_bytes(bytes(data))


def bad_json(p: pytest.Pytester) -> None:
    (ref(p) / "record.json").write_text("{not json")


def wrong_hash(p: pytest.Pytester) -> None:
    body = json.loads((ref(p) / "record.json").read_text())
    body["tensors"]["weights"]["sha256"] = "0" * 64
    (ref(p) / "record.json").write_text(json.dumps(body))


def python_yaml(p: pytest.Pytester) -> None:
    (ref(p) / "manifest.yaml").write_text("!!python/object/apply:os.system ['touch pwned']\n")


def pickle_file(p: pytest.Pytester) -> None:
    import pickle

    _weights(p).write_bytes(pickle.dumps({"weight": [1.0, 2.0]}))


def no_record(p: pytest.Pytester) -> None:
    (ref(p) / "record.json").unlink()


def _immutable(paths: list[Path], on: bool) -> bool:
    """root ignores permission bits: make folders immutable with chattr instead (False where unsupported)."""
    import subprocess

    flag = "+i" if on else "-i"
    return all(subprocess.run(["chattr", flag, str(x)], capture_output=True).returncode == 0 for x in paths)


def read_only(p: pytest.Pytester) -> None:
    folders = [ref(p).parent, ref(p)]
    if os.geteuid() == 0:
        if not _immutable(folders, True):
            pytest.skip("running as root without chattr: cannot make a folder read-only")
        return
    for path in folders:
        path.chmod(stat.S_IRUSR | stat.S_IXUSR)


def file_in_the_way(p: pytest.Pytester) -> None:
    folder = ref(p)
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    folder.write_text("my notes, not a reference\n")


def root_is_a_file(p: pytest.Pytester) -> None:
    import shutil

    shutil.rmtree(p.path / "reference_outputs")
    (p.path / "reference_outputs").write_text("not a folder\n")


def symlink_out(p: pytest.Pytester) -> None:
    outside = p.path.parent / f"{p.path.name}-outside"
    outside.mkdir(exist_ok=True)
    for f in ref(p).iterdir():
        (outside / f.name).write_bytes(f.read_bytes())
        f.unlink()
    ref(p).rmdir()
    ref(p).symlink_to(outside, target_is_directory=True)


def stale_staging(p: pytest.Pytester) -> None:
    staging = ref(p).with_name(f".{env_key()}.new-99999999")
    staging.mkdir()
    (staging / "weights.safetensors").write_bytes(b"partial")


def stale_backup(p: pytest.Pytester) -> None:
    os.replace(ref(p), ref(p).with_name(f".{env_key()}.old-99999999"))


def user_file(p: pytest.Pytester) -> None:
    (ref(p) / "NOTES.md").write_text("why this reference changed\n")


def readable_again(p: pytest.Pytester) -> None:
    folders = [x for x in (ref(p).parent, ref(p)) if x.is_dir() and not x.is_symlink()]
    if os.geteuid() == 0:
        _immutable(folders, False)
    for path in folders:
        path.chmod(0o755)


def record_is_a_folder(p: pytest.Pytester) -> None:
    (ref(p) / "record.json").unlink()
    (ref(p) / "record.json").mkdir()
    (ref(p) / "record.json" / "notes.txt").write_text("mine\n")


def _folder_kept(p: pytest.Pytester, out: str) -> None:
    assert (ref(p) / "record.json" / "notes.txt").read_text() == "mine\n"


def symlink_in_tree(p: pytest.Pytester) -> None:
    elsewhere = p.path / "reference_outputs" / "elsewhere"
    os.replace(ref(p), elsewhere)
    ref(p).symlink_to(Path("..") / ".." / "elsewhere", target_is_directory=True)


def _symlink_kept(p: pytest.Pytester, out: str) -> None:
    assert ref(p).is_symlink() and (p.path / "reference_outputs" / "elsewhere" / "record.json").is_file()
    assert not [x for x in ref(p).parent.iterdir() if x.name.startswith(".")], "no staging left behind"
    result, _, out2 = run(p)
    assert result.ret == 0 and "removed the stale" not in out2


def _no_ref_written(p: pytest.Pytester, out: str) -> None:
    assert not ref(p).exists(), "nothing may be written for a failing test"


def _stale_gone(p: pytest.Pytester, out: str) -> None:
    assert not ref(p).with_name(f".{env_key()}.new-99999999").exists()
    assert "removed the stale staging folder" in out


def _restored(p: pytest.Pytester, out: str) -> None:
    assert (ref(p) / "record.json").is_file() and "restored" in out


def _kept_user_file(p: pytest.Pytester, out: str) -> None:
    assert (ref(p) / "NOTES.md").read_text() == "why this reference changed\n"
    assert "kept files you added to the reference folder: NOTES.md" in out


def _orphan_killed(p: pytest.Pytester, out: str) -> None:
    pid = int((p.path / "orphan.pid").read_text()) if (p.path / "orphan.pid").exists() else None
    assert "left 1 process(es) running after the job returned; they were killed" in out
    if pid is not None:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _written_then_passes(p: pytest.Pytester, out: str) -> None:
    result, places, _ = run(p)
    assert result.ret == 0 and places["json"] == "passed", result.stdout.str()


# What soft-assertion plugins do: an outer (tryfirst) wrapper that turns a passed call into a failure.
SOFT_ASSERT = """
import pytest

@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.when == "call":
        report.outcome = "failed"
        report.longrepr = "soft assertion failed"
"""

CHANGED = '    repro.check(job, config={"case": "ok", "v": 2})'
REGEN_ONLY = ("--repro-regen",)

CASES = [
    # ---- reference files
    Case("truncated-tensor-file", setup=truncate, verdict="corrupt", says=("is corrupt and was not used",)),
    Case("flipped-byte", setup=flip, verdict="corrupt", says=("sha256", "does not match")),
    Case("invalid-json", setup=bad_json, verdict="corrupt", says=("not valid JSON",)),
    Case("wrong-hash", setup=wrong_hash, verdict="corrupt", says=("does not match",)),
    Case(
        "python-tagged-yaml",
        setup=python_yaml,
        ret=0,
        verdict="passed",
        says=("environment drift unknown: manifest.yaml of the reference is unreadable (not valid YAML",),
    ),
    Case("pickle-as-tensor-file", setup=pickle_file, verdict="corrupt", says=("does not match",)),
    Case("record-missing", setup=no_record, verdict="corrupt", says=("record.json: is missing",)),
    Case("corrupt-regen-missing", setup=truncate, args=("--repro-regen=missing",), verdict="corrupt"),
    Case(
        "corrupt-regen-all-replaces",
        setup=truncate,
        args=REGEN_ONLY,
        ret=0,
        verdict="written",
        untouched=False,
        says=("replaced a corrupt reference",),
    ),
    Case(
        "read-only-during-regen",
        setup=read_only,
        args=REGEN_ONLY,
        body=CHANGED,
        verdict="error",
        says=("could not be written", "PermissionError", "Nothing was changed"),
    ),
    Case(
        "file-in-the-way",
        setup=file_in_the_way,
        verdict="error",
        untouched=False,
        says=("is a file, not a reference folder", "move it out of the way"),
    ),
    Case(
        "file-in-the-way-regen-missing",
        setup=file_in_the_way,
        args=("--repro-regen=missing",),
        verdict="error",
        untouched=False,
        says=("is a file, not a reference folder",),
    ),
    Case(
        "file-in-the-way-regen-all",
        setup=file_in_the_way,
        args=REGEN_ONLY,
        verdict="error",
        untouched=False,
        says=("is a file, not a reference folder",),
    ),
    Case(
        "reference-root-is-a-file",
        setup=root_is_a_file,
        args=REGEN_ONLY,
        verdict="error",
        untouched=False,
        says=("is a file",),
    ),
    Case("symlink-out", setup=symlink_out, verdict="error", untouched=False, says=("is a symlink to", "not followed")),
    Case("leftover-staging", setup=stale_staging, ret=0, verdict="passed", extra=_stale_gone),
    Case("leftover-backup", setup=stale_backup, ret=0, verdict="passed", untouched=False, extra=_restored),
    Case(
        "user-file-kept-on-regen",
        setup=user_file,
        args=REGEN_ONLY,
        body=CHANGED,
        ret=0,
        verdict="written",
        untouched=False,
        extra=_kept_user_file,
    ),
    # ---- job results
    Case("returns-none", case="none", args=REGEN_ONLY, verdict="error", says=("cannot be recorded", "got NoneType")),
    Case("returns-list", case="list", args=REGEN_ONLY, verdict="error", says=("cannot be recorded",)),
    Case("unknown-key", case="unknown_key", args=REGEN_ONLY, verdict="error", says=("unknown key(s) ['extra']",)),
    Case(
        "empty-losses",
        case="empty_losses",
        args=REGEN_ONLY,
        verdict="error",
        says=("returned nothing to compare", "could never fail"),
    ),
    Case("empty-dict", case="empty_dict", args=REGEN_ONLY, verdict="error", says=("job result is empty",)),
    Case("loss-not-a-number", case="bad_loss_type", args=REGEN_ONLY, verdict="error", says=("losses[0]",)),
    Case(
        "metric-nan",
        case="metric_nan",
        args=REGEN_ONLY,
        verdict="non-finite",
        says=("run 1 (seed ", "metrics['acc']", "non-finite", "equal_nan"),
    ),
    Case("metric-inf", case="metric_inf", args=REGEN_ONLY, verdict="non-finite", says=("metrics['acc']", "inf")),
    Case("output-nan", case="output_nan", args=REGEN_ONLY, verdict="non-finite", says=("outputs['y']",)),
    Case("weight-inf", case="weight_inf", args=REGEN_ONLY, verdict="non-finite", says=("weights['bias']",)),
    Case(
        "output-nan-allowed",
        case="output_nan",
        args=REGEN_ONLY,
        ret=0,
        verdict="written",
        marker='(tolerance={"outputs": {"y": {"atol": 0, "equal_nan": True}}})',
        extra=_written_then_passes,
    ),
    Case("shape-changed", case="shape", verdict="differs", says=("shape (4, 2), expected (8, 2)",)),
    Case("dtype-changed", case="dtype", verdict="differs", says=("dtype torch.float64, expected torch.float32",)),
    Case("zero-d-tensor", case="zero_d", args=REGEN_ONLY, ret=0, verdict="written", extra=_written_then_passes),
    Case(
        "non-contiguous", case="non_contiguous", args=REGEN_ONLY, ret=0, verdict="written", extra=_written_then_passes
    ),
    Case("bfloat16-output", case="bf16", args=REGEN_ONLY, ret=0, verdict="written", extra=_written_then_passes),
    Case("tied-weights", case="tied", args=REGEN_ONLY, ret=0, verdict="written", extra=_written_then_passes),
    Case("large-tensor", case="large", args=REGEN_ONLY, ret=0, verdict="written", extra=_written_then_passes),
    Case("sparse-tensor", case="sparse", args=REGEN_ONLY, verdict="error", says=("sparse", "to_dense()")),
    # ---- job behaviour
    Case(
        "job-raises",
        case="raise",
        args=REGEN_ONLY,
        verdict="error",
        says=("raised an exception", "the job exploded at step 2"),
    ),
    Case("os-exit", case="exit", args=REGEN_ONLY, verdict="error", says=("exited with code 3",)),
    Case("sigkill", case="sigkill", args=REGEN_ONLY, verdict="error", says=("killed by SIGKILL",)),
    Case("segfault", case="segfault", args=REGEN_ONLY, verdict="error", says=("killed by SIGSEGV",)),
    Case(
        "hang",
        case="hang",
        args=REGEN_ONLY,
        verdict="timeout",
        marker="(timeout=2)",
        says=("killed after 2 s", "repro_timeout"),
    ),
    Case("huge-output", case="huge_output", args=REGEN_ONLY, ret=0, verdict="written", extra=_written_then_passes),
    Case("orphan-child", case="orphan", args=REGEN_ONLY, ret=0, verdict="written", extra=_orphan_killed),
    Case("chdir", case="chdir", args=REGEN_ONLY, ret=0, verdict="written", extra=_written_then_passes),
    Case("environ-cleared", case="environ", args=REGEN_ONLY, ret=0, verdict="written", extra=_written_then_passes),
    Case("fork-in-job", case="fork", args=REGEN_ONLY, ret=0, verdict="written", extra=_written_then_passes),
    Case(
        "multiprocessing-pool",
        case="multiprocessing",
        args=REGEN_ONLY,
        ret=0,
        verdict="written",
        extra=_written_then_passes,
    ),
    # ---- config and marker errors
    Case(
        "config-file-missing",
        args=REGEN_ONLY,
        body='    repro.check(job, config="nope.yaml")',
        verdict="error",
        says=("config file 'nope.yaml' not found", "Nothing was run"),
    ),
    Case(
        "config-not-json",
        args=REGEN_ONLY,
        body="    repro.check(job, config={'case': object()})",
        verdict="error",
        says=("must be JSON-serializable",),
    ),
    Case(
        "config-wrong-type",
        args=REGEN_ONLY,
        body="    repro.check(job, config=42)",
        verdict="error",
        says=("config must be a dict or a YAML file path, got int",),
    ),
    Case(
        "check-twice-same-name",
        args=REGEN_ONLY,
        verdict="error",
        body="    repro.check(job, config={'case': 'ok'})\n    repro.check(job, config={'case': 'ok'})",
        says=("without name=: the checks would share one reference folder",),
    ),
    Case(
        "lambda-job",
        args=REGEN_ONLY,
        body="    repro.check(lambda ctx: {}, config={})",
        verdict="error",
        says=("must be an importable top-level function",),
    ),
    Case(
        "marker-device-cuda-without-gpu",
        args=REGEN_ONLY,
        marker='(device="cuda")',
        verdict="error",
        says=("usable CUDA device(s)", "--repro-device=cpu"),
    ),
    Case(
        "marker-unknown-kwarg", args=REGEN_ONLY, marker="(tolerence='close')", says=("unknown argument(s) tolerence",)
    ),
    Case(
        "marker-bad-tolerance",
        args=REGEN_ONLY,
        marker="(tolerance='nearly')",
        first_marker="",
        says=("unknown tolerance 'nearly'",),
    ),
    Case("marker-positional", args=REGEN_ONLY, marker="('close')", says=("takes keyword arguments only",)),
    # ---- CLI option errors
    Case("cli-runs-zero", args=("--repro-runs=0",), ret=4, says=("--repro-runs: expected an integer >= 1, got 0",)),
    Case("cli-bad-device", args=("--repro-device=tpu",), ret=4, says=("expected auto, cpu, cuda or cuda:N",)),
    Case("cli-bad-regen", args=("--repro-regen=some",), ret=4, says=("expected all or missing",)),
    Case("cli-report-is-folder", args=("--repro-html=.",), ret=4, says=("is a folder; give a file path",)),
    Case(
        "cli-negative-timeout", args=("--repro-timeout=-1",), ret=4, says=("expected a finite number of seconds > 0",)
    ),
    Case("cli-regen-in-ci", args=REGEN_ONLY, ret=4, env={"CI": "true"}, says=("refuses to regenerate",)),
    # ---- verdict honesty
    Case(
        "user-assert-after-check",
        verdict="test-failed",
        body="    repro.check(job, config={'case': 'ok'})\n    assert False, 'accuracy too low'",
        says=("the check agreed (PASSED), but the test failed",),
    ),
    Case(
        "user-assert-during-regen",
        args=REGEN_ONLY,
        verdict="test-failed",
        first=None,
        body="    repro.check(job, config={'case': 'ok'})\n    assert False, 'accuracy too low'",
        says=("the reference was not written",),
        extra=_no_ref_written,
    ),
    Case(
        "failure-swallowed",
        verdict="differs",
        body=("    try:\n        repro.check(job, config={'case': 'shape'})\n    except BaseException:\n        pass"),
        says=("caught the failure and passed",),
    ),
    Case(
        "skip-after-check-during-regen",
        args=REGEN_ONLY,
        ret=0,
        verdict="test-failed",
        first=None,
        body="    repro.check(job, config={'case': 'ok'})\n    pytest.skip('not today')",
        extra=_no_ref_written,
    ),
    Case(
        "xfail-after-check-during-regen",
        args=REGEN_ONLY,
        ret=0,
        verdict="test-failed",
        first=None,
        marker="\n@pytest.mark.xfail(strict=True)",
        body="    repro.check(job, config={'case': 'ok'})\n    assert False",
        extra=_no_ref_written,
    ),
    Case(
        "statistical-same-seed-vs-reference",
        case="shifted",
        verdict="differs",
        first="noisy_metric",
        marker='(tolerance={"mode": "statistical", "seeds": 3, "same_seed": True, "margin": 0.01, "losses": False})',
        setup=None,
        says=("NOT equivalent",),
    ),
    Case(
        "statistical-nan-in-one-seed",
        case="nan_one_seed",
        args=REGEN_ONLY,
        verdict="non-finite",
        first=None,
        marker='(tolerance={"mode": "statistical", "seeds": 3, "margin": 0.1})',
        says=("run 3 (seed", "acc"),
    ),
    Case(
        "same-seed-nan-in-run-2",
        case="nan_in_run2",
        verdict="non-finite",
        first=None,
        marker='(tolerance={"mode": "statistical", "seeds": 3, "same_seed": True, "margin": 0.1})',
        says=("run 2 (seed",),
    ),
    Case("missing-reference", first=None, verdict="missing", says=("--repro-regen=missing",)),
    # ---- more results, names, settings and files (from a hostile test run)
    Case("float8-weights", case="fp8", args=REGEN_ONLY, ret=0, verdict="written", extra=_written_then_passes),
    Case("meta-device-tensor", case="meta", args=REGEN_ONLY, verdict="error", says=("outputs['y']", "meta device")),
    Case(
        "only-an-empty-tensor",
        case="only_empty_tensor",
        args=REGEN_ONLY,
        verdict="error",
        says=("returned nothing to compare",),
    ),
    Case(
        "check-named-empty",
        args=REGEN_ONLY,
        body="    repro.check(job, config={'case': 'ok'}, name='')",
        verdict="error",
        says=("a name must be a non-empty string",),
    ),
    Case(
        "check-named-like-an-environment",
        args=REGEN_ONLY,
        verdict="error",
        body="    repro.check(job, config={'case': 'ok'}, name='cpu-amd-avx512')",
        says=("does not start with cpu",),
    ),
    Case(
        "never-calls-check",
        args=REGEN_ONLY,
        body="    assert repro.seed >= 0",
        verdict="error",
        says=("never called repro.check: it checks nothing",),
    ),
    Case(
        "marker-infinite-timeout",
        args=REGEN_ONLY,
        marker="(timeout=float('inf'))",
        says=("expected a finite number of seconds > 0",),
    ),
    Case(
        "statistical-metric-not-returned",
        args=REGEN_ONLY,
        verdict="error",
        first=None,
        marker='(tolerance={"mode": "statistical", "seeds": 2, "margin": 0.1, "metrics": ["nope"]})',
        says=("the job returned no metric 'nope' (it returned: acc)",),
    ),
    Case(
        "statistical-infinite-margin",
        args=REGEN_ONLY,
        first=None,
        marker='(tolerance={"mode": "statistical", "seeds": 2, "margin": float("inf")})',
        says=("expected a finite number >= 0",),
    ),
    Case(
        "record-json-is-a-folder",
        setup=record_is_a_folder,
        args=REGEN_ONLY,
        verdict="error",
        untouched=False,
        says=("is a folder, not a reference file",),
        extra=_folder_kept,
    ),
    Case(
        "symlinked-environment-folder-in-tree",
        setup=symlink_in_tree,
        args=REGEN_ONLY,
        body=CHANGED,
        ret=0,
        verdict="written",
        extra=_symlink_kept,
    ),
    # ---- verdict honesty against other plugins
    Case(
        "failed-subtest-during-regen",
        args=REGEN_ONLY,
        verdict="test-failed",
        first=None,
        extra=_no_ref_written,
        body="    repro.check(job, config={'case': 'ok'})\n    with subtests.test('sub'):\n        assert False",
        fixtures=", subtests",
    ),
    Case(
        "plugin-marks-call-failed",
        args=REGEN_ONLY,
        verdict="test-failed",
        first=None,
        extra=_no_ref_written,
        conftest=SOFT_ASSERT,
        says=("soft assertion failed",),
    ),
    Case(
        "output-nan-allowed-differs",
        case="output_nan",
        first="ok",
        verdict="differs",
        marker='(tolerance={"outputs": {"y": {"atol": 0, "equal_nan": True}}})',
        says=("outputs['y']",),
    ),
]


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_fault_matrix(faults: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, c: Case) -> None:
    if c.first is not None:
        marker = c.first_marker if c.first_marker is not None else c.marker
        write(faults, c.first, marker=marker if "tolerance" in marker else "")
        first, _, out = run(faults, "--repro-regen")
        assert first.ret == 0, out
    if c.setup is not None:
        c.setup(faults)
    root = faults.path / "reference_outputs"

    def visible() -> dict[str, bytes]:  # staging/backup folders of killed writers may be cleaned up
        files = snapshot(root) if root.is_dir() else {}
        return {k: v for k, v in files.items() if not any(part.startswith(".") for part in Path(k).parts)}

    before = visible()
    write(faults, c.case, marker=c.marker, body=c.body, fixtures=c.fixtures)
    if c.conftest is not None:
        faults.makeconftest(c.conftest)
    for name, value in c.env.items():
        monkeypatch.setenv(name, value)
    try:
        result, places, out = run(faults, *c.args)
    finally:
        readable_again(faults)
    assert result.ret == c.ret, out
    for text in c.says:
        assert text in out, f"{text!r} not in output:\n{out}"
    if c.verdict is not None:
        assert places.get("json") == c.verdict and places.get("junit") == c.verdict, (places, out)
        if c.verdict not in PASSING:
            assert places["outcome"] != "passed"
    if c.untouched and c.verdict != "written" and before:
        assert visible() == before, "a reference the user had was changed"
    if c.extra is not None:
        c.extra(faults, out)


UNUSED = """
import pytest
from faultjobs import job

@pytest.mark.reproducible
def test_a(repro):
    repro.check(job, config={"case": "ok"})

@pytest.mark.reproducible
def test_b(repro):
    repro.check(job, config={"case": "ok", "b": 1})
"""


@pytest.mark.parametrize(
    "hide",
    ["collection-error", "importorskip", "ignore-option", "collect_ignore", "ignore-glob", "conftest-drops-items"],
)
def test_unused_delete_keeps_references_of_modules_not_collected(faults: pytest.Pytester, hide: str) -> None:
    faults.makepyfile(test_one=UNUSED, test_two=UNUSED)
    assert run(faults, "--repro-regen")[0].ret == 0
    before = snapshot(faults.path / "reference_outputs")
    args: list[str] = []
    if hide == "collection-error":
        faults.makepyfile(test_two="import no_such_module\n" + UNUSED)
    elif hide == "importorskip":
        faults.makepyfile(test_two="import pytest\npytest.importorskip('no_such_gpu_lib')\n" + UNUSED)
    elif hide == "ignore-option":
        args = ["--ignore=test_two.py"]
    elif hide == "collect_ignore":
        faults.makeconftest("collect_ignore = ['test_two.py']\n")
    elif hide == "conftest-drops-items":
        faults.makeconftest(
            "def pytest_collection_modifyitems(config, items):\n"
            "    items[:] = [i for i in items if 'test_two' not in i.nodeid]\n"
        )
    else:
        args = ["--ignore-glob=*_two.py"]
    result = faults.runpytest("--repro", "--repro-unused=delete", *args)
    out = result.stdout.str()
    assert "unused references not checked" in out and "test_two.py" in out, out
    assert "unknown, not unused" in out
    assert snapshot(faults.path / "reference_outputs") == before, "nothing may be deleted"
    result = faults.runpytest("--repro", "--repro-unused=fail", *args)
    assert "unused references not checked" in result.stdout.str()
    assert result.ret != pytest.ExitCode.TESTS_FAILED or hide == "collection-error"


def test_unused_delete_keeps_files_it_did_not_write(faults: pytest.Pytester) -> None:
    faults.makepyfile(test_one=UNUSED)
    assert run(faults, "--repro-regen")[0].ret == 0
    folder = faults.path / "reference_outputs" / "test_one" / "test_b" / env_key()
    (folder / "NOTES.md").write_text("keep me\n")
    faults.makepyfile(test_one=UNUSED.replace("def test_b(", "def test_b_renamed("))
    result = faults.runpytest("--repro", "--repro-unused=delete", "--repro-regen=missing")
    out = result.stdout.str()
    assert "deleted 1 unused reference folder(s); kept 1 file(s) pytest-repro did not write" in out, out
    assert (folder / "NOTES.md").read_text() == "keep me\n" and not (folder / "record.json").exists()


def test_unused_fail_exit_status_is_in_the_json_report(faults: pytest.Pytester) -> None:
    faults.makepyfile(test_one=UNUSED)
    assert run(faults, "--repro-regen")[0].ret == 0
    faults.makepyfile(test_one=UNUSED.replace("def test_b(", "def test_b_renamed("))
    result = faults.runpytest("--repro", "--repro-regen=missing", "--repro-unused=fail", "--repro-report=r.json")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert json.loads((faults.path / "r.json").read_text())["exitstatus"] == 1


def test_report_path_that_cannot_be_written_fails_the_run_and_leaves_no_temp_file(faults: pytest.Pytester) -> None:
    write(faults)
    (faults.path / "blocked").write_text("a file where a folder should be\n")
    result = faults.runpytest("--repro", "--repro-regen", "--repro-report=blocked/r.json")
    assert result.ret == pytest.ExitCode.INTERNAL_ERROR
    assert "could not write the JSON report blocked/r.json" in result.stdout.str()
    assert not [p for p in faults.path.rglob(".*.tmp-*")]


def test_unused_only_looks_at_the_paths_the_run_collected(faults: pytest.Pytester) -> None:
    """testpaths = sub: references of tests outside sub/ are unknown to this run, never deleted."""
    (faults.path / "sub").mkdir()
    (faults.path / "sub" / "test_in.py").write_text(UNUSED)
    faults.makepyfile(test_out=UNUSED)
    assert run(faults, "--repro-regen", "sub", "test_out.py")[0].ret == 0
    faults.makeini("[pytest]\nrepro_timeout = 30\ntestpaths = sub\n")
    before = snapshot(faults.path / "reference_outputs" / "test_out")
    result = faults.runpytest("--repro", "--repro-unused=delete")
    assert "no unused references" in result.stdout.str(), result.stdout.str()
    assert snapshot(faults.path / "reference_outputs" / "test_out") == before
