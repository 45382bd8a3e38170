"""storage: local folders, S3 prefixes and archives (local and on S3) listed and read in place."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from brainseg_ray import storage

FILES = {"kaggle_3m/P_A/P_A_1.tif": b"one", "kaggle_3m/P_A/P_A_2.tif": b"two" * 1000, "kaggle_3m/data.csv": b"x"}


def make_tree(root: Path) -> Path:
    for name, data in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def make_tar(path: Path, files: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def make_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def read_all(source: storage.Source) -> dict[str, bytes]:
    listing = source.list()
    assert not listing.problems
    return dict(source.read([m.path for m in listing.members]))


@pytest.mark.parametrize("kind", ["folder", "tar", "tar.gz", "tgz", "zip"])
def test_local_sources_list_and_read_every_file(tmp_path, kind):
    if kind == "folder":
        uri = str(make_tree(tmp_path / "tree"))
    elif kind == "zip":
        uri = str(make_zip(tmp_path / "a.zip", FILES))
    else:
        uri = str(make_tar(tmp_path / f"a.{kind}", FILES, "w" if kind == "tar" else "w:gz"))
    source = storage.open_source(uri)
    assert read_all(source) == FILES
    for member in source.list().members:  # every URI handed out reads back
        assert storage.read_bytes(member.uri) == FILES[member.path]


@pytest.mark.parametrize("kind", ["folder", "tar.gz", "zip"])
def test_s3_sources_list_and_read_every_file(tmp_path, s3_bucket, kind):
    if kind == "folder":
        for name, data in FILES.items():
            storage.write_bytes(f"{s3_bucket}/data/{name}", data)
        uri = f"{s3_bucket}/data"
    else:
        local = make_zip(tmp_path / "a.zip", FILES) if kind == "zip" else make_tar(tmp_path / "a.tar.gz", FILES)
        uri = f"{s3_bucket}/archives/{local.name}"
        storage.write_bytes(uri, local.read_bytes())
    source = storage.open_source(uri)
    assert read_all(source) == FILES
    member = source.list().members[0]
    assert member.uri.endswith(uri) or member.uri.startswith(uri)
    assert storage.read_bytes(member.uri) == FILES[member.path]


def test_tar_read_stops_streaming_once_batch_is_complete(tmp_path):
    files = {f"d/f{i}.tif": bytes([i]) * 10 for i in range(5)}
    source = storage.open_source(str(make_tar(tmp_path / "a.tar", files, "w")))
    got = list(source.read(["d/f1.tif", "d/f0.tif"]))
    assert dict(got) == {"d/f0.tif": files["d/f0.tif"], "d/f1.tif": files["d/f1.tif"]}


@pytest.mark.parametrize("name,reason", [
    ("../evil.tif", "escapes"),
    ("a/../../evil.tif", "escapes"),
    ("/etc/evil.tif", "absolute"),
])
@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_unsafe_archive_members_are_problems_not_files(tmp_path, name, reason, kind):
    files = {"k/P/P_1.tif": b"good", name: b"evil"}
    path = make_zip(tmp_path / "a.zip", files) if kind == "zip" else make_tar(tmp_path / "a.tar.gz", files)
    listing = storage.open_source(str(path)).list()
    assert [m.path for m in listing.members] == ["k/P/P_1.tif"]
    [problem] = listing.problems
    assert problem.code == "unsafe_member" and reason in problem.reason
    # Even asked for by name, an unsafe member is never read.
    [(_, result)] = list(storage.open_source(str(path)).read([name]))
    assert isinstance(result, Exception)


def test_tar_links_are_problems(tmp_path):
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("k/P/P_1.tif")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    listing = storage.open_source(str(path)).list()
    assert listing.members == [] and listing.problems[0].code == "not_regular_file"


@pytest.mark.parametrize("suffix", [".tar.gz", ".zip", ".tar"])
def test_corrupt_archive_is_a_problem_naming_the_archive(tmp_path, suffix):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"this is not an archive at all" * 10)
    listing = storage.open_source(str(path)).list()
    assert listing.members == []
    [problem] = listing.problems
    assert problem.code == "archive_unreadable" and problem.uri == str(path)


def test_truncated_tar_gz_keeps_the_members_before_the_damage(tmp_path):
    files = {f"k/P/P_{i}.tif": bytes(range(256)) * 40 for i in range(1, 40)}
    data = make_tar(tmp_path / "a.tar.gz", files).read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: len(data) * 2 // 3])
    listing = storage.open_source(str(cut)).list()
    assert 0 < len(listing.members) < len(files)
    assert [p.code for p in listing.problems] == ["archive_unreadable"]
    assert "after" in listing.problems[0].reason


def test_expand_globs_local_and_s3(tmp_path, s3_bucket):
    for name in ("b.tar.gz", "a.tar.gz", "c.zip"):
        (tmp_path / name).write_bytes(b"x")
        storage.write_bytes(f"{s3_bucket}/in/{name}", b"x")
    assert storage.expand(str(tmp_path / "*.tar.gz")) == [str(tmp_path / "a.tar.gz"), str(tmp_path / "b.tar.gz")]
    assert storage.expand(f"{s3_bucket}/in/*.tar.gz") == [f"{s3_bucket}/in/a.tar.gz", f"{s3_bucket}/in/b.tar.gz"]
    with pytest.raises(storage.StorageError, match="matches nothing"):
        storage.expand(str(tmp_path / "*.rar"))


def test_explicit_endpoint_overrides_environment(s3_bucket, monkeypatch):
    storage.write_bytes(f"{s3_bucket}/x.bin", b"abc")
    endpoint = storage.S3Options().resolved_endpoint()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    assert storage.read_bytes(f"{s3_bucket}/x.bin", storage.S3Options(endpoint_url=endpoint)) == b"abc"


def test_missing_things_are_storage_errors_naming_the_uri(tmp_path):
    with pytest.raises(storage.StorageError, match="no such folder"):
        storage.open_source(str(tmp_path / "absent")).list()
    with pytest.raises(storage.StorageError, match="absent.tif"):
        storage.read_bytes(str(tmp_path / "absent.tif"))
    with pytest.raises(storage.StorageError, match="unsupported URI scheme"):
        storage.filesystem("gs://bucket/x")


def test_local_folder_listing_follows_symlinked_patient_folders(tmp_path):
    real = make_tree(tmp_path / "real")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "P_A").symlink_to(real / "kaggle_3m" / "P_A", target_is_directory=True)
    paths = sorted(m.path for m in storage.open_source(str(linked)).list().members)
    assert paths == ["P_A/P_A_1.tif", "P_A/P_A_2.tif"]
