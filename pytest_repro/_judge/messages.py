"""Every failure text a user sees: what differed, where, by how much, then the command that fixes it."""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence


def regen_command(nodeid: str, mode: str = "") -> str:
    """Return the command that (re)writes this test's reference."""
    flag = "--repro-regen" + (f"={mode}" if mode else "")
    return f"pytest --repro {flag} {shlex.quote(nodeid)}"


def rerun_command(nodeid: str) -> str:
    """Return the command that reruns this test."""
    return f"pytest --repro {shlex.quote(nodeid)}"


def _log(run: int, log_tail: str) -> str:
    return f"\n--- output of run {run} (last lines) ---\n{log_tail}" if log_tail.strip() else ""


def timeout(nodeid: str, run: int, detail: str, log_tail: str) -> str:
    """A run that was killed after the time limit."""
    return (
        f"run {run} of {nodeid} was {detail}.{_log(run, log_tail)}\n"
        "Fix: find why the job hangs, or raise the limit with "
        "@pytest.mark.reproducible(timeout=SECONDS), ini repro_timeout or --repro-timeout."
    )


def nondeterministic_op(nodeid: str, run: int, op: str, device: str, last_line: str) -> str:
    """A job that used an op without a deterministic implementation while determinism is on."""
    return (
        f"run {run} of {nodeid}: the job used `{op}`, which has no deterministic implementation "
        f"on {device}, and determinism is on (torch.use_deterministic_algorithms(True)).\n{last_line}\n"
        "Options: use a deterministic alternative for this op (e.g. another reduction or interpolation "
        "mode); or keep determinism on but let this op through with "
        "torch.use_deterministic_algorithms(True, warn_only=True) inside the job; or run "
        "nondeterministically (@pytest.mark.reproducible(deterministic=False)) with a statistical "
        "tolerance (pytest_repro.statistical(...))."
    )


def job_failed(nodeid: str, run: int, what: str, detail: str, log_tail: str, audit: Sequence[str] = ()) -> str:
    """A job that raised or crashed in its process (``audit``: config near-misses that may explain it)."""
    hint = "".join(f"Config audit: {a}\n" for a in audit)
    fix = "Fix the config key (or the job)" if audit else "Fix the job"
    return (
        f"run {run} of {nodeid}: the job {what} in its process:\n{detail}{_log(run, log_tail)}\n{hint}"
        f"{fix} (the traceback above is from the job's own process), then rerun: {rerun_command(nodeid)}"
    )


def job_crashed(nodeid: str, run: int, detail: str, log_tail: str) -> str:
    """A job process that ended without a Python traceback (os._exit, a signal such as SIGSEGV, a dead worker)."""
    if log_tail.strip():
        output = f"Its output (stdout and stderr, last lines):\n{log_tail.rstrip()}\n"
    else:
        output = "Nothing was captured on its stdout or stderr.\n"
    if "Fatal Python error" in log_tail:  # faulthandler was on in the job: its stack is in the output
        happened = "no Python exception was raised; faulthandler's stack of the crash is in the output below"
    else:
        happened = "no Python traceback was produced"
    return (
        f"run {run} of {nodeid}: {detail}; {happened} (the process ended without raising: os._exit, a signal, "
        f"or a crash in native code).\n{output}"
        "Fix the job (for a crash in native code, run it with python -X faulthandler to see where), then rerun: "
        f"{rerun_command(nodeid)}"
    )


def unrecordable(nodeid: str, run: int, detail: str) -> str:
    """A job that returned, but whose result cannot be recorded."""
    last = detail.strip().splitlines()[-1] if detail.strip() else detail
    return (
        f"run {run} of {nodeid}: the job finished, but its result cannot be recorded: {last}\n"
        "A job returns a dict with losses (list of numbers), weights and outputs (name -> tensor), "
        "metrics (name -> number) and optionally meta (JSON). "
        f"Fix the returned value, then rerun: {rerun_command(nodeid)}"
    )


def orphans(run: int, count: int) -> str:
    """A job that left processes running after it returned."""
    return (
        f"run {run} left {count} process(es) running after the job returned; they were killed "
        "(join or terminate the processes a job starts before it returns)"
    )


def non_finite(
    nodeid: str, problems: Sequence[tuple[int, int | None, str]], section: str = "outputs", key: str | None = None
) -> str:
    """Runs whose results hold NaN or inf: (run, seed, problem) each; ``section``/``key``: where the first one is."""
    lines = "\n".join(f"  run {run} (seed {seed}): {problem}" for run, seed, problem in problems[:12])
    allow = '{"atol": 0, "equal_nan": True}'
    if key is None:  # losses: one tolerance for the whole trace
        where, tolerance = f"the {section}", f'{{"{section}": {allow}}}'
    else:
        where, tolerance = f"{section}[{key!r}]", f'{{"{section}": {{{json.dumps(key)}: {allow}}}}}'
    return (
        f"{nodeid}: the job returned non-finite values; nothing was compared or written:\n{lines}\n"
        "Fix: lower the learning rate, check the data and loss for division by zero or log(0), or use a "
        f"higher-precision dtype. If NaN is expected in {where}, allow it there with "
        f"@pytest.mark.reproducible(tolerance={tolerance}). "
        f"Then rerun: {rerun_command(nodeid)}"
    )


def tolerance_keys(nodeid: str, problems: Sequence[str], argument: str = "tolerance") -> str:
    """Per-key tolerances that name nothing the job returned (a typo would silently leave the key bitwise)."""
    return (
        f"{nodeid}: @pytest.mark.reproducible({argument}=…) names keys the job did not return; nothing was "
        "compared or written:\n"
        + "\n".join(f"  {p}" for p in problems)
        + f"\nFix: name keys the job returns in {argument}= (glob patterns such as 'layer.*' must match at least "
        "one; 'default' sets the tolerance of a whole section), then rerun: " + rerun_command(nodeid)
    )


def empty(nodeid: str, run: str) -> str:
    """A job whose result holds nothing to compare."""
    return (
        f"{run} of {nodeid}: the job returned nothing to compare (no losses, metrics, or tensor elements), "
        "so the check could never fail. Fix: return at least the per-step losses or the final weights."
    )


def diverged(
    nodeid: str, headline: str, described: str, seed: int, device: str, deterministic: bool, diagnosis: str
) -> str:
    """Runs of one seed that disagree with each other."""
    return (
        f"{nodeid} is not reproducible run-to-run: {headline}\n{described}\n"
        f"Both runs used seed {seed} on {device} (deterministic={deterministic}); "
        "nothing was compared with the reference.\n"
        f"{diagnosis}"
        "Fix: draw every random number from the seeded sources (ctx.seed, ctx.rng, ctx.generator()), "
        "keep determinism on (ini repro_deterministic = true), or loosen the tolerance with "
        "@pytest.mark.reproducible(tolerance=...) or pytest_repro.statistical(same_seed=True, margin=...)."
    )


def spread(nodeid: str, runs: int, seed: int, device: str, problems: Sequence[str]) -> str:
    """Same-seed statistical runs whose spread exceeds the margin."""
    return (
        f"{nodeid}: {runs} runs with seed {seed} on {device} spread more than the margin:\n"
        + "\n".join(f"  {p}" for p in problems)
        + "\nFix: turn determinism on (ini repro_deterministic = true), or widen the margin in "
        "pytest_repro.statistical(margin=..., same_seed=True)."
    )


def audit_failed(nodeid: str, problems: Sequence[str]) -> str:
    """The config audit in fail mode."""
    return (
        f"{nodeid}: the recorded config does not match what the job used:\n"
        + "\n".join(f"  {p}" for p in problems)
        + "\nFix: declare every key the job reads (and drop unused ones) in the config, "
        "or set ini repro_config_audit = warn."
    )


def corrupt(nodeid: str, problem: str) -> str:
    """A stored reference that cannot be trusted."""
    return (
        f"the reference for {nodeid} is corrupt and was not used: {problem}\n"
        "It was left untouched. Inspect it (git diff / git checkout), or rewrite it with: "
        f"{regen_command(nodeid)}"
    )


def unreadable(nodeid: str, exc: BaseException) -> str:
    """A record file (a run's or the reference's) that changed or failed while the check was reading it."""
    return (
        f"{nodeid}: a record file became unreadable while the check read it: {exc}\n"
        "Nothing was written. Something else changed the file during the check (a copy over a reference, "
        f"a cleanup of the temporary folder). Fix: leave reference files alone while tests run, then rerun: "
        f"{rerun_command(nodeid)}"
    )


def blocked(nodeid: str, problem: str) -> str:
    """Something that is not a reference stands where the reference folder should be."""
    return (
        f"the reference for {nodeid} cannot be used or written: {problem}. It was left untouched.\n"
        "Fix: move it out of the way (or point ini repro_reference_dir elsewhere), then rerun: "
        f"{rerun_command(nodeid)}"
    )


def reference_unreadable(nodeid: str, problem: str) -> str:
    """A reference the operating system would not let us read (permissions, open-file limit, I/O error)."""
    return (
        f"the reference for {nodeid} cannot be read: {problem}. It was left untouched.\n"
        "Fix: check the folder's permissions and the open-file limit (ulimit -n; a test that keeps many "
        f"open files), then rerun: {rerun_command(nodeid)}"
    )


def missing(nodeid: str, env_key: str, expected: str, unusable: Sequence[str]) -> str:
    """No reference for this environment and none usable from another."""
    also = f" (unusable: {'; '.join(unusable)})" if unusable else ""
    return (
        f"no reference for {nodeid} in environment {env_key!r}: expected one at {expected}{also}\n"
        f"Record it for this environment (after checking that the job is right) with: "
        f"{regen_command(nodeid, 'missing')}"
    )


DRIFT_UNKNOWN = "environment drift unknown"


def drift_unknown(problem: str) -> str:
    """The drift line of a reference whose manifest.yaml could not be read: its environment was not compared."""
    return f"{DRIFT_UNKNOWN}: manifest.yaml of the reference is unreadable ({problem})"


def context_block(lines: Sequence[str]) -> str:
    """The "Changed since the reference was recorded" block."""
    if not lines:
        return "Same config, seed, device, determinism and environment as the reference: the code or data changed.\n"
    if all(line.startswith(DRIFT_UNKNOWN) for line in lines):
        return "Same config, seed, device and determinism as the reference; " + "; ".join(lines) + ".\n"
    return "Changed since the reference was recorded:\n" + "\n".join(f"  {line}" for line in lines) + "\n"


def _audit(audit: Sequence[str], context: Sequence[str]) -> str:
    """The audit findings that bear on a difference: keys never read, and undeclared reads of changed keys."""
    relevant = [
        a for a in audit if "never read" in a or any(a.split("'")[1:2] and a.split("'")[1] in c for c in context)
    ]
    if not relevant:
        return ""
    return "Config audit (may explain it):\n" + "\n".join(f"  {a}" for a in relevant) + "\n"


def differs(nodeid: str, where: str, context: Sequence[str], described: str, audit: Sequence[str]) -> str:
    """A result that moved against this environment's own reference."""
    return (
        f"{nodeid} differs from its reference {where}.\n{context_block(context)}{_audit(audit, context)}"
        f"What differs:\n{described}\n"
        f"If the change is intended, regenerate the reference with: {regen_command(nodeid)}"
    )


def differs_cross_env(
    nodeid: str,
    env_key: str,
    other_key: str,
    tolerance: str,
    context: Sequence[str],
    described: str,
    audit: Sequence[str],
) -> str:
    """A result that differs from a reference recorded in another environment."""
    config = [line for line in context if line.startswith("config ")]
    if config:  # the user changed the job: that, more than the environment, explains a difference
        why = (
            "The config differs from the reference's (see below): that change, not only the environment, may be why.\n"
        )
        fix = (
            f"Fix: if the change is intended, record a reference for this environment with: "
            f"{regen_command(nodeid, 'missing')}\notherwise undo it."
        )
    else:
        why = "The reference comes from another environment: this does not mean your change broke anything.\n"
        fix = (
            f"Fix: record a reference for this environment with: {regen_command(nodeid, 'missing')}\n"
            "or loosen the cross-environment tolerance (@pytest.mark.reproducible(cross_env=...), "
            "ini repro_cross_env_tolerance)."
        )
    return (
        f"{nodeid}: no reference for environment {env_key!r}; compared with the one recorded in "
        f"{other_key!r} under the cross-environment tolerance ({tolerance}), not bitwise, and it differs.\n"
        f"{why}{context_block(context)}{_audit(audit, context)}"
        f"What differs:\n{described}\n{fix}"
    )


def statistical_problem(nodeid: str, problem: str) -> str:
    """A statistical comparison that cannot be made."""
    return (
        f"{nodeid}: {problem}\nFix: run more seeds (pytest_repro.statistical(seeds=...)), then {regen_command(nodeid)}"
    )


def unresolvable_margin(nodeid: str, reasons: list[str], lines: list[str]) -> str:
    """A statistical margin narrower than the seeds' spread can establish: inconclusive, not a change."""
    return (
        f"{nodeid}: the statistical check is inconclusive, not failed: its margin is narrower than the spread "
        "of these seeds can establish, so even an unchanged result could not be shown equivalent.\n"
        + "\n".join(f"  {r}" for r in reasons)
        + "\n"
        + "\n".join(lines)
        + "\nFix: widen the margin or run the seeds it needs (pytest_repro.statistical(margin=..., seeds=...)); "
        "regenerating the reference would not change this."
    )


def no_per_seed_values(nodeid: str, label: str) -> str:
    """A reference without per-seed values compared statistically."""
    return (
        f"{nodeid}: the {label} holds no per-seed values, so it cannot be compared statistically. "
        f"Record one in statistical mode with: {regen_command(nodeid)}"
    )


def write_failed(nodeid: str, path: str, exc: BaseException) -> str:
    """A reference that could not be written."""
    return (
        f"{nodeid}: the reference could not be written to {path}: {type(exc).__name__}: {exc}. "
        "Nothing was changed.\n"
        "Fix: make the reference folder writable (or move what blocks it), then rerun: "
        f"{regen_command(nodeid)}"
    )


def internal_error(nodeid: str, exc: BaseException) -> str:
    """Anything the plugin did not foresee: an error, never a pass."""
    return (
        f"{nodeid}: pytest-repro failed while checking: {type(exc).__name__}: {exc}\n"
        "The check is reported as ERROR (never as passed). Please report this with the traceback above; "
        f"rerun with: {rerun_command(nodeid)}"
    )


def swallowed(nodeid: str, labels: Sequence[str]) -> str:
    """A test that caught the check's failure and passed anyway."""
    return (
        f"{nodeid}: the reproducibility check failed ({', '.join(labels)}) but the test caught the failure "
        "and passed. A failed check always fails its test. Fix: do not catch the exception repro.check raises."
    )


def no_check(nodeid: str) -> str:
    """A reproducible test that checked nothing."""
    return (
        f"{nodeid} is marked reproducible and uses the repro fixture, but never called repro.check: it checks "
        "nothing, so it must not pass. Fix: call repro.check(job, ...) (or drop the marker and the fixture)."
    )


def usage(nodeid: str, problem: str) -> str:
    """A bad argument to repro.check or the marker."""
    return f"{nodeid}: {problem}"


def same_name(nodeid: str, name: str | None, where: str) -> str:
    """Two checks of one test that would share one name, and so one reference folder."""
    given = "without name=" if name is None else f"with the same name={name!r}"
    return (
        f"{nodeid}: repro.check is called {where} {given}: the checks would share one reference folder. "
        "Nothing was run or written for it.\n"
        'Fix: give each check of the test its own name, e.g. repro.check(job, config=..., name="small") '
        '(in a loop: name=f"steps{n}"), then rerun: '
        f"{rerun_command(nodeid)}"
    )


def config_invalid(nodeid: str, problem: str) -> str:
    """A config rejected by the job's schema or validator."""
    return f"{nodeid}: {problem}\nNothing was run. Fix the config passed to repro.check (see the job's docs)."


RESUME_STATE = (
    "the optimizer state, the LR scheduler, the RNG states of Python/NumPy/torch/CUDA, the data position "
    "(sampler or iterator state, e.g. a torch.Generator passed in extra=), and the gradient scaler"
)


def resume_mismatch(
    nodeid: str, at: int, headline: str, described: str, given: Sequence[str] | None, lightning: bool = False
) -> str:
    """Stop + resume that does not give the uninterrupted run (``given``: None for a checkpoint of another kind)."""
    if lightning:  # written by pytest_repro.jobs.lightning_callback: Lightning's own checkpoint plus RNG states
        return (
            f"{nodeid}: resume mismatch: stopping after step {at} and resuming in a fresh process does not give the "
            f"uninterrupted run: {headline}\n{described}\n"
            "The Lightning checkpoint written by lightning_callback(ctx) holds the model, optimizers, LR schedulers, "
            "the loop state and the RNG states of Python/NumPy/torch/CUDA. What else must match after the resume: "
            "the data order (Lightning restarts a mid-epoch checkpoint at the start of that epoch's data unless the "
            "DataLoader has state_dict/load_state_dict; an order drawn from a generator the checkpoint does not hold, "
            "as shuffle=True does, changes), and state kept outside the module and the Trainer.\n"
            "Fix: stop at an epoch boundary (at= a multiple of the steps per epoch) with an order that depends on the "
            "seed and epoch only (DistributedSampler(..., seed=ctx.seed)), train with "
            "callbacks=[lightning_callback(ctx)] and resume with trainer.fit(..., ckpt_path=lightning_ckpt_path(ctx)), "
            f"then rerun: {rerun_command(nodeid)}"
        )
    missing = [c for c in ("model", "optimizer", "scheduler", "scaler") if given is not None and c not in given]
    if given is None:
        not_given = "The checkpoint was not written by pytest_repro.checkpoint.save: check what it saves.\n"
    elif missing:
        not_given = f"checkpoint.save was not given: {', '.join(missing)} (needed if the job has one).\n"
    else:
        not_given = (
            "checkpoint.save was given model, optimizer, scheduler and scaler: look at the data position and "
            "at state kept outside them.\n"
        )
    return (
        f"{nodeid}: resume mismatch: stopping after step {at} and resuming in a fresh process does not give the "
        f"uninterrupted run: {headline}\n{described}\n"
        f"A checkpoint must restore {RESUME_STATE}. {not_given}"
        "Fix: pass every piece of training state to pytest_repro.checkpoint.save(ctx.checkpoint_dir, step=..., "
        "model=..., optimizer=..., scheduler=..., scaler=..., extra=...) and restore it with checkpoint.load(...), "
        f"then rerun: {rerun_command(nodeid)}"
    )


def resume_bad_stop(nodeid: str, at: int, got: int) -> str:
    """A job that does not honour ctx.stop_at."""
    return (
        f"{nodeid}: the run told to stop after step {at} (ctx.stop_at) returned {got} losses. A job in a resume check "
        "returns the losses of the steps it ran in this process only, stops at ctx.stop_at and calls "
        "checkpoint.save(ctx.checkpoint_dir, step=ctx.stop_at, ...). Fix the job's loop bounds."
    )


def resume_no_checkpoint(nodeid: str, at: int) -> str:
    """A job that stopped without writing a checkpoint."""
    return (
        f"{nodeid}: the run told to stop after step {at} wrote nothing into ctx.checkpoint_dir. "
        "Fix: when ctx.stop_at is set, call pytest_repro.checkpoint.save(ctx.checkpoint_dir, step=ctx.stop_at, ...)."
    )


def stored_floor_unusable(nodeid: str, where: str, problem: str) -> str:
    """A noise floor stored beside a reference that cannot be used: never silently ignored."""
    return (
        f"{nodeid}: the noise floor stored beside its reference, {where}, cannot be used: {problem}.\n"
        f"Fix: delete {where} (then, on the machine that recorded the reference, measure and store it again with: "
        f"pytest-repro calibrate {nodeid} --store)."
    )


def floor_run_failed(nodeid: str, failure: str, streams: bool = True, timed_out: bool = False) -> str:
    """A run that measures the noise floor failed, while the check's own runs passed."""
    how = "its module outputs moved by one ulp" + (" and other dropout masks" if streams else "")
    if timed_out:
        fix = (
            "Fix: give the runs more time (@pytest.mark.reproducible(timeout=SECONDS), ini repro_timeout; a "
            "noise-floor run gets 5 x it), or compare without a noise floor: an explicit tolerance."
        )
    else:
        fix = (
            "Fix: compare without a noise floor: an explicit tolerance, @pytest.mark.reproducible(tolerance=...) "
            "for this environment's reference, cross_env=\"close\" (or a map) for another environment's; the job "
            "must give the same structure and finite results under a global forward hook and a TorchDispatchMode "
            "to be measured."
        )
    return (
        f"{nodeid}: a run that measures the noise floor failed (the job ran with {how}; its own runs passed):\n"
        f"{failure}\n{fix}"
    )
