"""URIs to things we can list and read: local folders, s3:// prefixes, and .tar/.tar.gz/.zip
archives (local or on S3) read in place, never unpacked to disk.

A file inside an archive is named with fsspec's chained-URL form, `tar://MEMBER::ARCHIVE_URI` or
`zip://MEMBER::ARCHIVE_URI`, so every URI this module hands out can be read back by `read_bytes`
(and by fsspec itself). S3 settings come from the standard AWS variables and config files
(credentials, AWS_REGION / AWS_DEFAULT_REGION, AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL) unless
`S3Options` names them explicitly.
"""

from __future__ import annotations

import glob as _glob
import os
import posixpath
import re
import tarfile
import zipfile
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence
from urllib.parse import urlparse

import fsspec

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip")
_GLOB_CHARS = re.compile(r"[*?\[]")
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")
# What a damaged archive raises while being read.
ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError)


class StorageError(Exception):
    """A URI that cannot be listed or read; the message names it and says why."""


@dataclass(frozen=True)
class S3Options:
    """How to reach S3. Empty fields fall back to the standard AWS variables and config."""

    endpoint_url: str | None = None  # None: AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL; e.g. a MinIO server
    region: str | None = None  # None: AWS_REGION, else AWS_DEFAULT_REGION

    def resolved_endpoint(self) -> str | None:
        return (
            self.endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or None
        )

    def resolved_region(self) -> str | None:
        return self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def is_archive(uri: str) -> bool:
    return uri.lower().endswith(ARCHIVE_SUFFIXES)


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URI."""
    if is_s3(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def filesystem(uri: str, s3: S3Options | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path inside it) for a local path or an s3:// URI."""
    if is_s3(uri):
        s3 = s3 or S3Options()
        client_kwargs = {}
        if s3.resolved_endpoint():
            client_kwargs["endpoint_url"] = s3.resolved_endpoint()
        if s3.resolved_region():
            client_kwargs["region_name"] = s3.resolved_region()
        fs = fsspec.filesystem("s3", client_kwargs=client_kwargs, use_listings_cache=False)
        return fs, uri[len("s3://") :].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"{uri}: unsupported URI scheme (use a local path or s3://)")
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return fsspec.filesystem("file"), os.path.abspath(path)


def arrow_filesystem(uri: str, s3: S3Options | None = None):
    """(pyarrow.fs.FileSystem, path) for Parquet reads and writes (Ray Data and pyarrow)."""
    import pyarrow.fs as pafs

    if is_s3(uri):
        s3 = s3 or S3Options()
        kwargs = {}
        endpoint = s3.resolved_endpoint()
        if endpoint:
            parsed = urlparse(endpoint)
            kwargs["endpoint_override"] = parsed.netloc or parsed.path
            kwargs["scheme"] = parsed.scheme or "https"
        if s3.resolved_region():
            kwargs["region"] = s3.resolved_region()
        return pafs.S3FileSystem(**kwargs), uri[len("s3://") :].rstrip("/")
    return pafs.LocalFileSystem(), filesystem(uri)[1]


def makedirs(uri: str, s3: S3Options | None = None) -> None:
    if not is_s3(uri):  # S3 has no directories
        fs, path = filesystem(uri, s3)
        fs.makedirs(path, exist_ok=True)


def exists(uri: str, s3: S3Options | None = None) -> bool:
    fs, path = filesystem(uri, s3)
    return fs.exists(path)


def write_bytes(uri: str, data: bytes, s3: S3Options | None = None) -> None:
    """Write a whole file; local writes go through a temporary name so readers never see half."""
    fs, path = filesystem(uri, s3)
    if is_s3(uri):
        fs.pipe_file(path, data)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def split_member_uri(uri: str) -> tuple[str, str, str] | None:
    """'tar://a/b.tif::s3://x/y.tar.gz' -> ('tar', 'a/b.tif', 's3://x/y.tar.gz'); None otherwise."""
    for kind in ("tar", "zip"):
        prefix = f"{kind}://"
        if uri.startswith(prefix) and "::" in uri:
            member, archive = uri[len(prefix) :].split("::", 1)
            return kind, member, archive
    return None


def read_bytes(uri: str, s3: S3Options | None = None) -> bytes:
    """Whole contents of a file: local, s3://, or an archive member URI."""
    member = split_member_uri(uri)
    if member is not None:
        _, name, archive = member
        [(_, result)] = list(open_source(archive, s3).read([name]))
        if isinstance(result, Exception):
            raise StorageError(f"{uri}: {result}") from result
        return result
    fs, path = filesystem(uri, s3)
    try:
        return fs.cat_file(path)
    except (OSError, ValueError) as exc:
        raise StorageError(f"{uri}: {exc}") from exc


@dataclass(frozen=True)
class Member:
    """A regular file of a source: `path` relative to the source root (posix), `uri` absolute."""

    path: str
    uri: str
    size: int


@dataclass(frozen=True)
class Problem:
    """Something found while listing that cannot be used, with the reason."""

    uri: str
    code: str
    reason: str


@dataclass
class Listing:
    members: list[Member] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


class Source(ABC):
    """A tree of files to list and read. Cheap to pickle: filesystems are made on use."""

    def __init__(self, uri: str, s3: S3Options | None = None):
        self.uri = uri
        self.s3 = s3 or S3Options()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    @property
    def sequential(self) -> bool:
        """True when reading a member means streaming the source from its start (tar)."""
        return False

    @abstractmethod
    def list(self) -> Listing:
        """Every regular file, plus problems (unsafe archive names, an unreadable archive)."""

    @abstractmethod
    def read(self, paths: Sequence[str]) -> Iterator[tuple[str, bytes | Exception]]:
        """(path, contents or the exception that stopped reading it) for each path asked for."""


class FolderSource(Source):
    """A local folder or an S3 prefix."""

    def list(self) -> Listing:
        fs, root = filesystem(self.uri, self.s3)
        if not fs.isdir(root):
            raise StorageError(f"{self.uri}: no such folder or prefix")
        listing = Listing()
        for rel, size in sorted(self._walk(fs, root)):
            listing.members.append(Member(rel, join(self.uri, *rel.split("/")), size))
        return listing

    def _walk(self, fs, root: str) -> Iterator[tuple[str, int]]:
        """(path relative to root, size) of every file."""
        if is_s3(self.uri):
            for path, info in fs.find(root, withdirs=False, detail=True).items():
                yield posixpath.relpath(path, root), int(info.get("size") or 0)
            return
        # os.walk rather than fsspec: data folders are often assembled from symlinked patients.
        for folder, _, names in os.walk(root, followlinks=True):
            for name in names:
                path = os.path.join(folder, name)
                if os.path.isfile(path):
                    yield os.path.relpath(path, root).replace(os.sep, "/"), os.path.getsize(path)

    def read(self, paths: Sequence[str]) -> Iterator[tuple[str, bytes | Exception]]:
        fs, root = filesystem(self.uri, self.s3)
        full = {posixpath.join(root.replace(os.sep, "/"), p): p for p in paths}
        if is_s3(self.uri):
            contents = fs.cat(list(full), on_error="return")  # concurrent GETs
        else:
            contents = {}
            for path in full:
                try:
                    with open(path, "rb") as f:
                        contents[path] = f.read()
                except OSError as exc:
                    contents[path] = exc
        for path, rel in full.items():
            yield rel, contents.get(path, StorageError(f"{path}: not read"))


def unsafe_member_reason(name: str) -> str | None:
    """Why an archive member name must not be used (it could escape the archive's root)."""
    if name.startswith("/") or _WINDOWS_DRIVE.match(name):
        return "absolute path in archive"
    if ".." in name.replace("\\", "/").split("/"):
        return "path escapes the archive root ('..')"
    return None


def _normalise_member(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


class _ArchiveSource(Source):
    kind = ""

    def member_uri(self, name: str) -> str:
        return f"{self.kind}://{name}::{self.uri}"

    def _open(self):
        fs, path = filesystem(self.uri, self.s3)
        try:
            return fs.open(path, "rb")
        except (OSError, ValueError) as exc:
            raise StorageError(f"{self.uri}: cannot open archive: {exc}") from exc

    def _listing(self, entries: Iterable[tuple[str, str, int]]) -> Listing:
        """entries: (name, 'file' | 'dir' | 'other', size) in archive order; may end in an error."""
        listing = Listing()
        try:
            for name, kind, size in entries:
                name = _normalise_member(name)
                if not name or name.endswith("/") or kind == "dir":
                    continue
                reason = unsafe_member_reason(name)
                if reason:
                    listing.problems.append(Problem(self.member_uri(name), "unsafe_member", reason))
                elif kind == "file":
                    listing.members.append(Member(name, self.member_uri(name), size))
                else:
                    listing.problems.append(
                        Problem(self.member_uri(name), "not_regular_file", "archive member is a link or device, not a file")
                    )
        except ARCHIVE_ERRORS as exc:
            done = f" after {len(listing.members)} members" if listing.members else ""
            listing.problems.append(
                Problem(self.uri, "archive_unreadable", f"cannot read archive{done}: {exc or type(exc).__name__}")
            )
        return listing


class TarSource(_ArchiveSource):
    """A .tar, .tar.gz, .tgz, .tar.bz2 or .tar.xz, streamed: reading needs no seeking."""

    kind = "tar"

    @property
    def sequential(self) -> bool:
        return True

    def list(self) -> Listing:
        def entries():
            with self._open() as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                for info in tar:
                    yield info.name, "file" if info.isfile() else "dir" if info.isdir() else "other", info.size

        return self._listing(entries())

    def read(self, paths: Sequence[str]) -> Iterator[tuple[str, bytes | Exception]]:
        wanted = set(paths)
        try:
            with self._open() as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                for info in tar:
                    name = _normalise_member(info.name)
                    if name in wanted and info.isfile() and not unsafe_member_reason(name):
                        wanted.discard(name)
                        yield name, tar.extractfile(info).read()
                        if not wanted:
                            return  # stop streaming once this batch is complete
        except ARCHIVE_ERRORS as exc:
            error: Exception = StorageError(f"{self.uri}: archive unreadable: {exc or type(exc).__name__}")
        else:
            error = StorageError(f"{self.uri}: not found in archive")
        for name in sorted(wanted):
            yield name, error


class ZipSource(_ArchiveSource):
    """A .zip: random access through its central directory."""

    kind = "zip"

    def list(self) -> Listing:
        def entries():
            with self._open() as f, zipfile.ZipFile(f) as zf:
                for info in zf.infolist():
                    # Unix symlinks in zip carry S_IFLNK in the high bits of external_attr.
                    is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
                    yield info.filename, "dir" if info.is_dir() else "other" if is_link else "file", info.file_size

        return self._listing(entries())

    def read(self, paths: Sequence[str]) -> Iterator[tuple[str, bytes | Exception]]:
        try:
            f = self._open()
            zf = zipfile.ZipFile(f)
        except ARCHIVE_ERRORS + (StorageError,) as exc:
            for name in paths:
                yield name, StorageError(f"{self.uri}: archive unreadable: {exc}")
            return
        names = {_normalise_member(n): n for n in zf.namelist()}
        with f, zf:
            for name in paths:
                if unsafe_member_reason(name) or name not in names:
                    yield name, StorageError(f"{self.member_uri(name)}: not found in archive")
                    continue
                try:
                    yield name, zf.read(names[name])
                except ARCHIVE_ERRORS as exc:
                    yield name, StorageError(f"{self.member_uri(name)}: {exc}")


def open_source(uri: str, s3: S3Options | None = None) -> Source:
    """The Source for a folder, an S3 prefix or one archive."""
    lower = uri.lower()
    if lower.endswith(".zip"):
        return ZipSource(uri, s3)
    if is_archive(lower):
        return TarSource(uri, s3)
    return FolderSource(uri, s3)


def expand(uri: str, s3: S3Options | None = None) -> list[str]:
    """A URI, or a glob of them (e.g. 's3://bucket/scans/*.tar.gz'), as a sorted list of URIs."""
    if not _GLOB_CHARS.search(uri):
        return [uri]
    if is_s3(uri):
        fs, path = filesystem(uri, s3)
        matches = [f"s3://{p}" for p in fs.glob(path)]
    else:
        matches = _glob.glob(uri)
    if not matches:
        raise StorageError(f"{uri}: the pattern matches nothing")
    return sorted(matches)
