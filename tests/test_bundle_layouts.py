"""A bundle re-packed by hand (``tar -C dir -czf x.tgz .``, zip) still verifies; unsafe members are refused."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from pytest_repro import cli
from pytest_repro._publish.bundle.build import export
from pytest_repro._publish.bundle.verify import verify

ROOT = Path(__file__).resolve().parents[1]
TEST_DIR = ROOT / "reference_outputs/tests/test_reproducible/test_lora_is_reproducible"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The exported bundle's files by name inside its top folder, as `tar -xzf` would unpack them."""
    reference = next(p for p in sorted(TEST_DIR.iterdir()) if (p / "record.json").is_file())
    out = tmp_path_factory.mktemp("bundle") / "lora.tar.gz"
    export(reference, ROOT, out)
    with tarfile.open(out) as tar:
        return {m.name.split("/", 1)[1]: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]


def _tar(path: Path, members: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> Path:  # type: ignore[assignment]
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return path


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_tar_of_the_unpacked_folder_with_dot_names(files: dict[str, bytes], tmp_path: Path) -> None:
    unpacked = tmp_path / "unpacked"
    for name, data in files.items():
        (unpacked / "lora" / name).parent.mkdir(parents=True, exist_ok=True)
        (unpacked / "lora" / name).write_bytes(data)
    for source, first in ((unpacked, "./lora/"), (unpacked / "lora", "./")):  # tar -C SOURCE -czf x.tgz .
        archive = tmp_path / "repacked.tgz"
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(source, arcname=".")
        with tarfile.open(archive) as tar:
            assert any(n.startswith(first + "reference/") for n in tar.getnames())
        result = verify(archive)
        assert result.problems == [] and result.index["test"].endswith("::test_lora_is_reproducible"), first


@pytest.mark.parametrize(
    "layout", ["./lora/{}", "./{}", "{}", "lora/{}", "./././lora/{}", "lora//{}"], ids=lambda s: s.format("x")
)
@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_common_layouts_verify(
    files: dict[str, bytes], tmp_path: Path, layout: str, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    members = {layout.format(name): data for name, data in files.items()}
    archive = (_tar if kind == "tar" else _zip)(tmp_path / f"b.{'tar.gz' if kind == 'tar' else 'zip'}", members)
    assert cli.main(["verify", str(archive)]) == 0, capsys.readouterr()
    assert capsys.readouterr().out.rstrip().endswith("every hash matches")


def _link(name: str, kind: bytes, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../../outside.txt", "../../outside.txt: a path with '..': extracting the archive would write outside"),
        ("./lora/../../outside.txt", "./lora/../../outside.txt: a path with '..'"),
        ("/etc/outside.txt", "/etc/outside.txt: an absolute path: extracting the archive would write outside"),
    ],
)
def test_traversal_and_absolute_members_are_refused(
    files: dict[str, bytes], tmp_path: Path, name: str, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    members = {f"./lora/{n}": data for n, data in files.items()} | {name: b"x"}
    for archive in (_tar(tmp_path / "b.tgz", members), _zip(tmp_path / "b.zip", members)):
        assert cli.main(["verify", str(archive)]) == 1
        out = capsys.readouterr().out
        assert f"BAD  {why}" in out and "INCONSISTENT, 1 problem(s)" in out, out


def test_link_members_are_refused(files: dict[str, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    members = {f"./lora/{n}": data for n, data in files.items()}
    links = [_link("./lora/sym", tarfile.SYMTYPE, "/etc/passwd"), _link("./lora/hard", tarfile.LNKTYPE, "/etc/passwd")]
    assert cli.main(["verify", str(_tar(tmp_path / "b.tgz", members, links))]) == 1
    out = capsys.readouterr().out
    assert "BAD  sym: not a regular file" in out and "BAD  hard: not a regular file" in out
    archive = _zip(tmp_path / "b.zip", members)
    with zipfile.ZipFile(archive, "a") as zf:
        info = zipfile.ZipInfo("./lora/sym")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    assert cli.main(["verify", str(archive)]) == 1
    assert "BAD  sym: not a regular file (a link) in the archive" in capsys.readouterr().out
