"""The ``pytest-repro`` command: manifests and drift, reports, migrate, bundles (export/verify/accept), bisect, demo."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import yaml

if TYPE_CHECKING:
    from ._judge.drift import Drift

MANIFEST_FILE = "manifest.yaml"
RECORD_FILE = "record.json"
LEGACY_CPU_KEY = "cpu"
_MANIFEST_KEYS = frozenset({"schema", "python", "cpu", "torch", "packages", "env"})


class CliError(Exception):
    """A user error: printed as one line ``pytest-repro <command>: <problem>; <fix>``, exit code 2."""

    def __init__(self, problem: str, fix: str) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line ending with the fix."""

    def error(self, message: str) -> NoReturn:
        """Print ``<prog>: <message>; see <prog> --help`` on stderr and exit with code 2."""
        self.exit(2, f"{self.prog}: {message}; see '{self.prog} --help'\n")


def _where(exc: Exception) -> str:
    """Return ' (line L, column C: problem)' for a YAML/JSON parse error, on one line."""
    if isinstance(exc, json.JSONDecodeError):
        return f" (line {exc.lineno}, column {exc.colno}: {exc.msg})"
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or type(exc).__name__
    if mark is not None:
        return f" (line {mark.line + 1}, column {mark.column + 1}: {problem})"
    return f" ({' '.join(str(exc).split())})"


def _read_text(path: Path, what: str, fix: str) -> str:
    """Read a text file, turning every way it can be unreadable into a CliError."""
    if not path.exists():
        raise CliError(f"{path} does not exist", fix)
    if path.is_dir():
        raise CliError(f"{path} is a folder, not {what}", fix)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CliError(f"{path} is not a text file (not UTF-8)", fix) from None
    except OSError as exc:
        raise CliError(f"cannot read {path} ({exc.strerror or exc})", fix) from None


def _children_with(folder: Path, filename: str) -> list[str]:
    """Return the names of ``folder``'s sub-folders that hold ``filename``."""
    try:
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and (p / filename).is_file())
    except OSError:
        return []


def _environment_folder_error(folder: Path, filename: str, command: str, generic_fix: str) -> CliError:
    """Explain a folder that lacks ``filename``: name its environment folders when it is a test folder."""
    envs = _children_with(folder, filename)
    if envs:
        return CliError(
            f"{folder} is a test folder holding the environment folder(s) {', '.join(envs)}, not a reference",
            f"pass one of them, e.g. pytest-repro {command} {folder / envs[0]}",
        )
    return CliError(f"{folder} holds no {filename}", generic_fix)


def load_manifest(path: str) -> dict[str, Any]:
    """Load a manifest from a YAML/JSON file, or the manifest.yaml inside a reference folder."""
    from .storage import parse_yaml

    fix = (
        "pass a file written by 'pytest-repro manifest' or a reference environment folder "
        "(reference_outputs/<test module>/<test>/<environment>, the one holding manifest.yaml)"
    )
    p = Path(path)
    if p.is_dir():
        if not (p / MANIFEST_FILE).is_file():
            raise _environment_folder_error(p, MANIFEST_FILE, "diff", fix)
        p = p / MANIFEST_FILE
    text = _read_text(p, "a manifest file", fix)
    try:
        data = json.loads(text) if p.suffix == ".json" else parse_yaml(text)  # JSON is YAML too; no aliases (bombs)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        kind = "JSON" if p.suffix == ".json" else "YAML or JSON"
        raise CliError(f"{p} is not valid {kind}{_where(exc)}", "fix the file, or write it again: " + fix) from None
    if not isinstance(data, dict) or len(_MANIFEST_KEYS & set(data)) < 3 or "tensors" in data:
        raise CliError(f"{p} does not hold a pytest-repro manifest (a mapping with schema, python, torch, ...)", fix)
    return data


def load_report(path: str) -> dict[str, Any]:
    """Load a JSON report written by ``pytest --repro-report=PATH.json``; CliError when it is not one."""
    from ._publish.report import REPORT_SCHEMA_VERSION

    fix = "pass the file written by 'pytest --repro --repro-report=PATH.json'"
    p = Path(path)
    text = _read_text(p, "a JSON report", fix)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{p} is not valid JSON{_where(exc)}", fix) from None
    if not isinstance(data, dict) or "schema_version" not in data or not isinstance(data.get("tests"), list):
        raise CliError(f"{p} is not a pytest-repro report (no schema_version and tests list)", fix)
    version = data["schema_version"]
    if not isinstance(version, int) or version > REPORT_SCHEMA_VERSION:
        raise CliError(
            f"{p} has report schema_version {version!r}; this pytest-repro reads up to {REPORT_SCHEMA_VERSION}",
            "upgrade pytest-repro, or render the report with the version that wrote it",
        )
    return data


def _write_bytes(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    except OSError as exc:
        raise CliError(f"cannot write {path} ({exc.strerror or exc})", "choose a writable path with -o") from None


def _missing_matplotlib(exc: ModuleNotFoundError) -> CliError:
    if (exc.name or "").split(".")[0] != "matplotlib":
        raise exc
    from ._publish.extras import extra_install

    return CliError("matplotlib is not installed (it draws the loss plots)", extra_install("report"))


def _cmd_html(args: argparse.Namespace) -> int:
    from ._publish.report_html import write_html

    report = load_report(args.report)
    out = Path(args.output)
    try:
        write_html(out, report)
    except ModuleNotFoundError as exc:
        raise _missing_matplotlib(exc) from None
    except OSError as exc:
        raise CliError(f"cannot write {out} ({exc.strerror or exc})", "choose a writable path with -o") from None
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise CliError(
            f"{args.report} is a malformed pytest-repro report ({type(exc).__name__}: {exc})",
            "write it again with 'pytest --repro --repro-report=PATH.json'",
        ) from None
    print(f"wrote {out}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from ._publish.report_plots import loss_plot_png
    from .record import CorruptRecordError, load_record

    folder = Path(args.reference)
    fix = "pass a reference environment folder (reference_outputs/<test module>/<test>/<environment>)"
    if not folder.exists():
        raise CliError(f"{folder} does not exist", fix)
    if not folder.is_dir():
        raise CliError(f"{folder} is a file, not a reference folder", fix)
    if not (folder / RECORD_FILE).is_file():
        raise _environment_folder_error(folder, RECORD_FILE, "plot", fix + ", the one holding record.json")
    try:
        record = load_record(folder)
    except CorruptRecordError as exc:
        raise CliError(
            f"the reference {folder} is corrupt ({exc.detail})", "regenerate it with pytest --repro --repro-regen"
        ) from None
    title = f"{folder} (seed {record.seed}, {record.device})"
    try:
        png = loss_plot_png({"reference": record.losses}, None, title)
    except ModuleNotFoundError as exc:
        raise _missing_matplotlib(exc) from None
    _write_bytes(Path(args.output), png)
    print(f"wrote {args.output}")
    return 0


def _cmd_manifest(args: argparse.Namespace) -> int:
    from .manifest import collect_manifest

    manifest = collect_manifest(extra_packages=args.package, identity=args.identity, kind="cli")
    if args.json:
        print(json.dumps(manifest, sort_keys=True, indent=2))
    else:
        print(yaml.safe_dump(manifest, sort_keys=True), end="")
    return 0


def _change(drift: Drift) -> dict[str, Any]:
    """One change as JSON: a side where the field is absent has no old/new key (null is an explicit null).

    A list of plain values also says the items ``added`` and ``removed``.
    """
    out: dict[str, Any] = {"path": drift.path, "category": drift.category, "change": drift.change}
    if drift.change != "added":
        out["old"] = drift.old
    if drift.change != "removed":
        out["new"] = drift.new
    items = drift.list_items()
    if items is not None:
        out["added"], out["removed"] = items
    return out


def _cmd_diff(args: argparse.Namespace) -> int:
    from ._judge.drift import diff_manifests, run_only_fields, run_only_note

    old, new = load_manifest(args.a), load_manifest(args.b)
    drifts = diff_manifests(old, new)
    note = run_only_note(old, new)
    numeric = any(x.category == "numeric" for x in drifts)
    if args.json:
        body: dict[str, Any] = {
            "numeric_drift": numeric,
            "changes": [_change(x) for x in drifts],
        }
        if note:
            body["not_compared"] = {"fields": run_only_fields(old, new), "reason": note}
        print(json.dumps(body, sort_keys=True, indent=2, default=str))
        return 1 if numeric else 0
    for x in drifts:
        print(x.describe())
    if note:
        print(note)
    if not drifts:
        print("no drift: the compared fields are identical" if note else "no drift: the manifests are identical")
    else:
        print(f"{len(drifts)} change(s); numeric drift: {'yes' if numeric else 'no'}")
    return 1 if numeric else 0


def migrate_cpu_folders(root: Path, dry_run: bool = False, echo: Callable[[str], None] = print) -> int:
    """Rename legacy ``cpu`` reference folders under ``root`` to their vendor/capability key; return how many stayed.

    Each folder's new key comes from its own manifest.yaml (``environment_key(manifest, "cpu")``). A folder
    is left as is when the target exists or its manifest cannot say which CPU recorded it.
    """
    from .manifest import environment_key

    folders = sorted(
        p.parent
        for p in root.rglob(RECORD_FILE)
        if p.parent.name == LEGACY_CPU_KEY and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not folders:
        echo(f"no legacy '{LEGACY_CPU_KEY}' reference folders under {root}; nothing to migrate")
        return 0
    kept = 0
    for folder in folders:
        manifest, problem = _legacy_manifest(folder)
        key = environment_key(manifest, "cpu")
        if problem is None and (folder.parent / key).exists():
            problem = f"{key} already exists beside it; compare the two, delete one, then run migrate again"
        if problem is not None:
            kept += 1
            echo(f"kept {folder} (still used, as a reference from another environment): {problem}")
        elif dry_run:
            echo(f"would rename {folder} -> {key}")
        else:
            os.rename(folder, folder.parent / key)
            _update_provenance_key(folder.parent / key, key)
            echo(f"renamed {folder} -> {key}")
    echo(f"{len(folders) - kept} folder(s) {'would be renamed' if dry_run else 'renamed'}, {kept} kept")
    return kept


def _legacy_manifest(folder: Path) -> tuple[dict[str, Any], str | None]:
    """Return a legacy folder's manifest, and why it cannot give the new key (None when it can)."""
    from .manifest import cpu_capability, cpu_vendor

    path = folder / MANIFEST_FILE
    fix = "re-record it on that machine type with pytest --repro --repro-regen"
    if not path.is_file():
        return {}, f"it holds no {MANIFEST_FILE}; {fix}"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        return {}, f"its {MANIFEST_FILE} is unreadable{_where(exc)}; {fix}"
    if not isinstance(data, dict):
        return {}, f"its {MANIFEST_FILE} is not a mapping; {fix}"
    missing = [
        name
        for name, value in (("cpu.vendor/cpu.model", cpu_vendor(data)), ("torch.cpu_capability", cpu_capability(data)))
        if value == "unknown"
    ]
    if missing:
        return data, f"its {MANIFEST_FILE} lacks {' and '.join(missing)}, so its CPU is unknown; {fix}"
    return data, None


def _update_provenance_key(folder: Path, key: str) -> None:
    """Point provenance.yaml's environment_key at the new folder name, leaving the rest of the file as is."""
    path = folder / "provenance.yaml"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return
    new = re.sub(rf"^environment_key: {LEGACY_CPU_KEY}$", f"environment_key: {key}", text, count=1, flags=re.M)
    if new != text:
        from .record import write_text_atomic

        write_text_atomic(path, new)


def _cmd_migrate(args: argparse.Namespace) -> int:
    root = Path(args.reference_dir)
    fix = "pass the reference folder (ini repro_reference_dir, default reference_outputs)"
    if not root.exists():
        raise CliError(f"{root} does not exist", fix)
    if not root.is_dir():
        raise CliError(f"{root} is a file, not a folder", fix)
    return 1 if migrate_cpu_folders(root, args.dry_run) else 0


def _export_source(args: argparse.Namespace) -> Path:
    """Return the reference environment folder named by a folder path or a test node id."""
    from .storage import environment_dirs, reference_path

    target = Path(args.target)
    fix = "pass a reference environment folder (reference_outputs/<test module>/<test>/<environment>) or a node id"
    if target.is_dir():
        if not (target / RECORD_FILE).is_file():
            raise _environment_folder_error(target, RECORD_FILE, "export", fix)
        return target
    if target.exists():
        raise CliError(f"{target} is a file, not a reference folder", fix)
    if "::" not in args.target:
        raise CliError(f"{args.target} is neither a reference folder nor a test node id (path::test)", fix)
    root = Path(args.reference_dir) if args.reference_dir else Path(args.rootdir) / "reference_outputs"
    test_dir = reference_path(root, args.target, args.name)
    envs = {k: v for k, v in environment_dirs(test_dir).items() if (v / RECORD_FILE).is_file()}
    regen = f"pytest --repro --repro-regen {shlex.quote(args.target)}"
    if not envs:
        raise CliError(
            f"no reference for {args.target} under {root} (looked in {test_dir})",
            f"record one with {regen}, or pass --rootdir/--reference-dir (and --name for a named check)",
        )
    if args.env:
        if args.env not in envs:
            raise CliError(
                f"{args.target} has no reference for environment {args.env!r} (it has: {', '.join(envs)})",
                f"pass one of them with --env, e.g. --env {next(iter(envs))}",
            )
        return envs[args.env]
    if len(envs) > 1:
        raise CliError(
            f"{args.target} has references for several environments: {', '.join(envs)}",
            f"pick one with --env, e.g. --env {next(iter(envs))}",
        )
    return next(iter(envs.values()))


def _cmd_export(args: argparse.Namespace) -> int:
    from ._publish.bundle import INDEX_FILE, BundleError
    from ._publish.bundle.build import export

    out = Path(args.output)
    try:
        folder = _export_source(args)
        bundle = export(folder, Path(args.rootdir), out)
    except BundleError as exc:
        raise CliError(exc.problem, exc.fix) from None
    except OSError as exc:
        raise CliError(f"cannot write {out} ({exc.strerror or exc})", "choose a writable path with -o") from None
    index = bundle.index
    size = out.stat().st_size
    print(
        f"wrote {out}: {index['test']} ({index['environment_key']}), {len(index['files'])} files + {INDEX_FILE}, "
        f"{size / 1024:.0f} KiB"
    )
    for note in bundle.notes:
        print(f"note: {note}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from ._publish.bundle import BundleError
    from ._publish.bundle.verify import verify

    try:
        result = verify(Path(args.bundle))
    except BundleError as exc:
        raise CliError(exc.problem, exc.fix) from None
    index = result.index
    if index:
        check = f" [{index['check']}]" if index.get("check") else ""
        print(
            f"bundle of {index.get('test')}{check} (environment {index.get('environment_key')}), "
            f"written {index.get('created')} by pytest-repro {index.get('plugin_version')}"
        )
    for line in result.checked:
        print(f"  ok   {line}")
    for line in result.problems:
        print(f"  BAD  {line}")
    if result.problems:
        files = ", ".join(result.bad_files)
        print(f"{args.bundle}: INCONSISTENT, {len(result.problems)} problem(s) in: {files}")
        return 1
    print(f"{args.bundle}: OK, {len(index.get('files') or {})} files + bundle.json, every hash matches")
    return 0


def _cmd_accept(args: argparse.Namespace) -> int:
    from ._cli.accept import AcceptError, accept

    def confirm(question: str) -> bool:
        if not sys.stdin.isatty():
            return False
        try:
            return input(question).strip().lower() in ("y", "yes")
        except EOFError:
            return False

    try:
        return accept(
            args.bundles, Path(args.rootdir), args.reference_dir and Path(args.reference_dir), args.yes, confirm
        )
    except AcceptError as exc:
        raise CliError(exc.problem, exc.fix) from None


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._cli.demo import run

    return run(Path(args.keep) if args.keep else None)


def _cmd_history(args: argparse.Namespace) -> int:
    from ._publish.extras import extra_install
    from ._publish.history import format_history, read_history
    from ._publish.mlflow import LOCAL_DB, LOCAL_STORE, local_uri
    from ._publish.trackers import experiment_name

    rootdir = Path(args.rootdir)
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or local_uri(rootdir)
    if uri == local_uri(rootdir) and not (rootdir / LOCAL_STORE / LOCAL_DB).is_file():
        raise CliError(
            f"no MLflow store at {rootdir / LOCAL_STORE / LOCAL_DB}",
            "log some runs first with pytest --repro --repro-mlflow, or pass --tracking-uri URI (or --rootdir)",
        )
    experiment = args.experiment or experiment_name(rootdir)
    try:
        rows = read_history(uri, experiment, args.nodeid, args.name, args.limit)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in ("mlflow", "sqlalchemy", "alembic"):
            raise
        raise CliError(
            f"{exc.name} is not installed (history reads the MLflow store)", extra_install("mlflow")
        ) from None
    except LookupError:
        raise CliError(
            f"the MLflow store at {uri} has no experiment {experiment!r}",
            "pass --experiment NAME (default: the project's name), or log runs with pytest --repro --repro-mlflow",
        ) from None
    except Exception as exc:  # MLflow's client raises its own errors for unreachable or invalid stores
        raise CliError(
            f"cannot read the MLflow store at {uri} ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})",
            "check --tracking-uri and that the tracking server is reachable",
        ) from None
    if not rows:
        named = f" [{args.name}]" if args.name else ""
        raise CliError(
            f"no runs of {args.nodeid}{named} in experiment {experiment!r} at {uri}",
            "check the node id (as pytest prints it), or log runs with pytest --repro --repro-mlflow",
        )
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return 0
    for line in format_history(rows, args.nodeid, experiment, uri):
        print(line)
    return 0


_BISECT_HELP = """\
Find the first commit between --good and --bad whose reproducibility results differ from the
reference committed at --good (later commits may have regenerated theirs). Each step runs
'python -m pytest --repro ARGS -o repro_reference_dir=<copy of --good's reference>' in a temporary
worktree, with that commit's code first on PYTHONPATH. Commits that do not collect or import are
skipped; a commit whose runs diverge is run 3 times and the majority decides. Your checkout, HEAD,
index and any bisect of your own are never touched.

  pytest-repro bisect --good v1.2 -- tests/test_eval.py::test_eval_loss

exit codes: 0 found; 1 only untestable commits left next to it (candidates listed);
2 usage error or failed preflight (--good does not pass, --bad does not differ);
130 interrupted (Ctrl-C), 143 stopped (SIGTERM); the temporary worktree is removed either way.
"""


def _cmd_bisect(args: argparse.Namespace) -> int:
    from ._cli.bisect import BisectError, run

    pytest_args = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    try:
        return run(args.good, args.bad, pytest_args, Path.cwd(), args.repro_timeout, args.step_timeout)
    except BisectError as exc:
        for line in exc.output:
            print(f"  | {line}", file=sys.stderr)
        raise CliError(exc.problem, exc.fix) from None


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pytest-repro", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    o = sub.add_parser("demo", help="the gate in ~20 s: record a reference, pass, change the job, fail (temp project)")
    o.add_argument("--keep", metavar="DIR", help="build the demo project in DIR and keep it (default: a temp folder)")
    o.set_defaults(func=_cmd_demo)
    m = sub.add_parser("manifest", help="print this machine's environment manifest (YAML)")
    m.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    m.add_argument("--package", action="append", default=[], help="also record this package's version (repeatable)")
    m.add_argument(
        "--identity",
        choices=("hash", "omit", "plain"),
        default="hash",
        help="how hostname and user name appear (default: hashed)",
    )
    m.set_defaults(func=_cmd_manifest)
    d = sub.add_parser("diff", help="classified drift between two manifests (files or reference folders)")
    d.add_argument("a")
    d.add_argument("b")
    d.add_argument("--json", action="store_true", help="print JSON instead of aligned lines")
    d.set_defaults(func=_cmd_diff)
    h = sub.add_parser("html", help="render the HTML report from a saved JSON report (--repro-report)")
    h.add_argument("report")
    h.add_argument("-o", "--output", default="repro-report.html")
    h.set_defaults(func=_cmd_html)
    p = sub.add_parser("plot", help="plot a reference's loss trace to PNG")
    p.add_argument("reference", help="a reference environment folder (the one holding record.json)")
    p.add_argument("-o", "--output", default="loss.png")
    p.set_defaults(func=_cmd_plot)
    g = sub.add_parser("migrate", help="rename legacy 'cpu' reference folders to cpu-<vendor>-<capability>")
    g.add_argument("reference_dir", nargs="?", default="reference_outputs", help="default: ./reference_outputs")
    g.add_argument("--dry-run", action="store_true", help="print what would be renamed, rename nothing")
    g.set_defaults(func=_cmd_migrate)
    e = sub.add_parser("export", help="write one self-describing bundle (.tar.gz or .zip) of a reference")
    e.add_argument("target", help="a reference environment folder, or a test node id (path::test)")
    e.add_argument("-o", "--output", default="bundle.tar.gz", help="*.tar.gz or *.zip (default: bundle.tar.gz)")
    e.add_argument("--env", help="the environment key, when the test has references for several")
    e.add_argument("--name", help="the check's name=, for a test that calls repro.check more than once")
    e.add_argument("--rootdir", default=".", help="the project's rootdir (config and data paths; default: .)")
    e.add_argument("--reference-dir", help="default: <rootdir>/reference_outputs")
    e.set_defaults(func=_cmd_export)
    v = sub.add_parser("verify", help="check every hash in a bundle; exit 1 when anything is inconsistent")
    v.add_argument("bundle")
    v.set_defaults(func=_cmd_verify)
    a = sub.add_parser(
        "accept",
        help="install references from bundles recorded on another runner, after showing what they change",
        description="Verify every hash, refuse bundles of unknown tests, clashing environment keys or paths outside "
        "the reference folder, show what each adds or replaces (and how much it differs), then install them "
        "atomically. Exit codes: 0 installed (or nothing to change), 1 refused (nothing changed), 2 usage error, "
        "3 not confirmed (nothing changed; add --yes).",
    )
    a.add_argument("bundles", nargs="+", metavar="BUNDLE|DIR", help="bundle files, or folders of them (artifacts)")
    a.add_argument("--yes", action="store_true", help="install without asking (otherwise: asks on a TTY, else exit 3)")
    a.add_argument("--rootdir", default=".", help="the project's rootdir (default: .)")
    a.add_argument("--reference-dir", help="default: the ini's repro_reference_dir (reference_outputs)")
    a.set_defaults(func=_cmd_accept)
    y = sub.add_parser("history", help="a check's verdicts, environments and final losses across logged runs")
    y.add_argument("nodeid", help="the test's node id, as pytest prints it")
    y.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else the local store in <rootdir>/mlruns")
    y.add_argument("--experiment", help="default: MLFLOW_EXPERIMENT_NAME, else the project's name")
    y.add_argument("--name", help="only the check with this name=")
    y.add_argument("--rootdir", default=".", help="the project's rootdir (default: .)")
    y.add_argument("--limit", type=int, default=50, help="the latest N runs (default: 50)")
    y.add_argument("--json", action="store_true", help="print JSON instead of a table")
    y.set_defaults(func=_cmd_history)
    b = sub.add_parser(
        "bisect",
        help="the first commit whose results differ from --good's reference (exit 0 found, 1 not narrowed to one)",
        description=_BISECT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("--good", required=True, metavar="REV", help="a commit whose results are right (e.g. v1.2)")
    b.add_argument("--bad", default="HEAD", metavar="REV", help="a commit whose results differ (default: HEAD)")
    b.add_argument("--repro-timeout", metavar="SECONDS", help="per-run time limit, passed to each step's pytest")
    b.add_argument("--step-timeout", type=float, metavar="SECONDS", help="kill a step's pytest after this (skip)")
    b.add_argument("pytest_args", nargs=argparse.REMAINDER, help="pytest arguments or node ids (after --)")
    b.set_defaults(func=_cmd_bisect)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (diff: 1 on numeric drift; 2 on a usage or input error)."""
    args = _parser().parse_args(argv)
    try:
        code: int = args.func(args)
        sys.stdout.flush()  # a closed pipe (| head) surfaces here, inside the handler
    except CliError as exc:
        print(f"pytest-repro {args.command}: {exc.problem}; {exc.fix}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (e.g. `| head -1`): stop quietly, as Unix tools do. Point stdout at devnull
        # so that the interpreter's final flush does not raise again (Python docs, "Note on SIGPIPE").
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the closed pipe
    return code


if __name__ == "__main__":
    sys.exit(main())
