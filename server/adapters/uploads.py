"""Turning an upload into an adapter's two files, without trusting the upload.

An adapter arrives as its two files, or as one archive (zip, or tar with or without gzip, bzip2
or xz) holding them at its top level or in one top-level folder, as `save_pretrained` or a
training checkpoint leaves them. Nothing is extracted to disk: the two files are read into
memory and every other member is skipped, so no member name can write anywhere. Names that
would escape a folder (absolute, `..`) and links are refused all the same, since such an
archive is not what it claims to be. Sizes are counted while decompressing rather than taken
from headers, so a small archive cannot expand into more than the limit.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from plait.server.adapters.errors import AdapterFormatError, AdapterTooLarge
from plait.server.adapters.format import ADAPTER_CONFIG, ADAPTER_WEIGHTS

ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
MAX_ADAPTER_BYTES = 512 * 2**20  # the two files together
# Other members (README.md, training arguments, tokenizer files) are skipped if this small;
# a larger one (optimizer state, a whole model) means the wrong folder was packed.
MAX_SKIPPED_MEMBER_BYTES = 2**20
MAX_ARCHIVE_MEMBERS = 1000
# A tar stream is its members plus a 512-byte header and padding for each, and an end record.
_TAR_OVERHEAD_BYTES = MAX_ARCHIVE_MEMBERS * 1024 + 20 * 1024
_CHUNK = 2**20
# What reading a damaged archive raises; zipfile adds RuntimeError for an encrypted member and
# NotImplementedError for an unknown compression method.
_UNREADABLE = (
    zipfile.BadZipFile,
    tarfile.TarError,
    EOFError,
    OSError,
    zlib.error,
    lzma.LZMAError,
    RuntimeError,
    NotImplementedError,
)


def check_files(files: Mapping[str, bytes], max_bytes: int = MAX_ADAPTER_BYTES) -> dict[str, bytes]:
    """The adapter's two files given by name; any other name is refused, as is a total over `max_bytes`."""
    for name in files:
        if name not in ADAPTER_FILES:
            raise AdapterFormatError(
                f"unexpected file {name!r}: an adapter is {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}", name
            )
    for name in ADAPTER_FILES:
        if name not in files:
            raise AdapterFormatError(f"{name} is missing", name)
    total = sum(len(data) for data in files.values())
    if total > max_bytes:
        raise AdapterTooLarge(f"the adapter is {total} bytes, over the limit of {max_bytes}")
    return {name: files[name] for name in ADAPTER_FILES}


def files_from_folder(folder: Path, max_bytes: int = MAX_ADAPTER_BYTES) -> dict[str, bytes]:
    """The adapter's two files from a folder on this machine, their sizes checked before any is read."""
    present = [name for name in ADAPTER_FILES if (folder / name).is_file()]
    try:
        total = sum((folder / name).stat().st_size for name in present)
        if total > max_bytes:
            raise AdapterTooLarge(f"the adapter is {total} bytes, over the limit of {max_bytes}")
        files = {name: (folder / name).read_bytes() for name in present}
    except OSError as exc:
        raise AdapterFormatError(f"{exc.filename or folder} cannot be read: {exc.strerror or exc}") from None
    return check_files(files, max_bytes)


def files_from_archive(archive: BinaryIO, max_bytes: int = MAX_ADAPTER_BYTES) -> dict[str, bytes]:
    """The adapter's two files from a zip or tar archive (seekable file object).

    Raises AdapterFormatError (AdapterTooLarge for size) naming the member at fault.
    """
    try:
        if zipfile.is_zipfile(archive):
            archive.seek(0)
            with zipfile.ZipFile(archive) as zf:
                return _collect(_zip_members(zf), max_bytes)
        archive.seek(0)
        stream = _Limited(_decompressed(archive), max_bytes + _TAR_OVERHEAD_BYTES)
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            return _collect(_tar_members(tar), max_bytes)
    except _UNREADABLE as exc:
        raise AdapterFormatError(f"the upload is not a readable zip or tar archive: {exc}") from None


@dataclass(frozen=True)
class _Member:
    name: str
    size: int  # as the archive declares it
    kind: str  # "file", "dir", or what else it is
    open: Callable[[], BinaryIO]


def _zip_members(zf: zipfile.ZipFile) -> Iterator[_Member]:
    for info in zf.infolist():
        mode = info.external_attr >> 16  # Unix mode bits, when a Unix tool wrote the archive
        if info.is_dir():
            kind = "dir"
        elif stat.S_ISLNK(mode):
            kind = "symbolic link"
        else:
            kind = "file"
        yield _Member(info.filename, info.file_size, kind, lambda info=info: zf.open(info))


def _tar_members(tar: tarfile.TarFile) -> Iterator[_Member]:
    for info in tar:
        if info.isfile():
            kind = "file"
        elif info.isdir():
            kind = "dir"
        elif info.issym():
            kind = "symbolic link"
        elif info.islnk():
            kind = "hard link"
        else:
            kind = "special file"
        yield _Member(info.name, info.size, kind, lambda info=info: tar.extractfile(info))


def _collect(members: Iterator[_Member], max_bytes: int) -> dict[str, bytes]:
    found: dict[str, list[tuple[str, bytes]]] = {name: [] for name in ADAPTER_FILES}
    declared = taken = 0
    for count, member in enumerate(members, start=1):
        if count > MAX_ARCHIVE_MEMBERS:
            raise AdapterFormatError(f"the archive has more than {MAX_ARCHIVE_MEMBERS} members")
        parts = _safe_parts(member.name)
        if member.kind == "dir":
            continue
        if member.kind != "file":
            raise AdapterFormatError(f"archive member {member.name!r} is a {member.kind}; only files are accepted")
        declared += member.size
        if declared > max_bytes:
            raise AdapterTooLarge(f"the archive's members add up to more than the limit of {max_bytes} bytes")
        if parts[-1] in found and len(parts) <= 2:
            with member.open() as stream:
                data = _read(stream, member.name, max_bytes - taken)
            taken += len(data)
            found[parts[-1]].append((member.name, data))
        elif member.size > MAX_SKIPPED_MEMBER_BYTES:
            raise AdapterFormatError(
                f"archive member {member.name!r} is {member.size} bytes; an adapter archive holds {ADAPTER_CONFIG} "
                f"and {ADAPTER_WEIGHTS}, and other files only up to {MAX_SKIPPED_MEMBER_BYTES} bytes"
            )
    for name, copies in found.items():
        if not copies:
            raise AdapterFormatError(f"the archive has no {name} at its top level or in one top-level folder", name)
        if len(copies) > 1:
            names = ", ".join(member_name for member_name, _ in copies)
            raise AdapterFormatError(f"the archive holds more than one {name} ({names})", name)
    (config_name, config), (weights_name, weights) = (found[name][0] for name in ADAPTER_FILES)
    if _safe_parts(config_name)[:-1] != _safe_parts(weights_name)[:-1]:
        raise AdapterFormatError(f"{config_name!r} and {weights_name!r} are not in the same folder of the archive")
    return {ADAPTER_CONFIG: config, ADAPTER_WEIGHTS: weights}


def _safe_parts(name: str) -> list[str]:
    """A member name's path components; names that would leave the extraction folder are refused."""
    parts = [part for part in name.replace("\\", "/").split("/") if part not in ("", ".")]
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts or not parts:
        raise AdapterFormatError(f"archive member {name!r} has an absolute or escaping path")
    return parts


def _read(stream: BinaryIO, name: str, budget: int) -> bytes:
    """The member's bytes, counted as they come: a zip's declared sizes may lie."""
    data = bytearray()
    while chunk := stream.read(_CHUNK):
        data += chunk
        if len(data) > budget:
            raise AdapterTooLarge(f"archive member {name!r} expands past the size limit")
    return bytes(data)


def _decompressed(archive: BinaryIO) -> BinaryIO:
    """The archive's bytes with gzip, bzip2 or xz compression undone, recognised by magic number."""
    magic = archive.read(6)
    archive.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=archive)
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(archive)
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(archive)
    return archive


class _Limited(io.RawIOBase):
    """Reads through to `inner` and refuses once more than `limit` bytes came out of it.

    tarfile reads some headers whole (a pax header may declare any size), so the limit must sit
    under tarfile, on the decompressed stream, for a small archive not to fill memory.
    """

    def __init__(self, inner: BinaryIO, limit: int):
        self._inner = inner
        self._left = limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._inner.read(min(len(buffer), self._left + 1))
        self._left -= len(data)
        if self._left < 0:
            raise AdapterTooLarge("the archive expands to more than the size limit")
        buffer[: len(data)] = data
        return len(data)
