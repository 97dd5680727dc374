"""Where the archive's files live: a local folder, or any fsspec URL (s3://, gs://, memory://, ...).

`write` returns once the file is durable under its final name, and a reader never sees part of one. In a local
folder the bytes go to a hidden temporary name, are fsynced, renamed into place, and the folder is fsynced. With
fsspec they are written under the final name: object stores publish an object whole when its upload completes,
and the name appears only then. Names starting with "." or "_" are the archive's own (temporary files, pending
markers, the label store's manifest) and are never listed as data.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any


class StorageError(ValueError):
    """The archive location cannot be used; the message names it and the fix."""


class Storage:
    """Files under one root, by paths relative to it with "/" separators."""

    def __init__(self, url: str) -> None:
        if not url:
            raise StorageError("no archive location: set archive_url (GPUWATCH_ARCHIVE_URL) or pass --archive, "
                               "a folder or an fsspec URL such as s3://bucket/gpuwatch")  # fmt: skip
        self.url = url
        self._fs: Any = None
        local = (
            url.removeprefix("file://") if url.startswith("file://") else (url if "://" not in url else None)
        )
        if local is not None:
            self.root = str(Path(local).resolve())
        else:
            try:
                import fsspec

                self._fs, self.root = fsspec.core.url_to_fs(url)
            except (ImportError, ValueError) as exc:
                raise StorageError(f"archive location {url}: {exc}; install the fsspec filesystem for it "
                                   "(s3fs for s3://, gcsfs for gs://) or use a folder") from None  # fmt: skip
            self.root = self.root.rstrip("/")

    @property
    def local(self) -> bool:
        return self._fs is None

    def path(self, rel: str) -> str:
        """The full path of `rel` (for the local filesystem or the fsspec filesystem)."""
        return f"{self.root}/{rel}" if rel else self.root

    @property
    def filesystem(self) -> Any:
        """The fsspec filesystem, or None for a local folder (pyarrow's `filesystem=` argument)."""
        return self._fs

    def write(self, rel: str, data: bytes) -> None:
        """Writes `data` to `rel` (replacing it); durable when this returns."""
        full = self.path(rel)
        if self._fs is not None:
            parent = full.rsplit("/", 1)[0]
            self._fs.makedirs(parent, exist_ok=True)
            with self._fs.open(full, "wb") as fh:
                fh.write(data)
            return
        folder, tmp = _synced_tmp(full, data)
        try:
            os.replace(tmp, full)
        except BaseException:
            _unlink(tmp)
            raise
        _fsync_dir(folder)

    def create(self, rel: str, data: bytes) -> bool:
        """Writes `data` to `rel` only if nothing is there (False if something is); durable on return. In a folder
        two writers cannot both create the same file; with fsspec the check and the write are two steps."""
        if self._fs is not None:
            if self.exists(rel):
                return False
            self.write(rel, data)
            return True
        full = self.path(rel)
        folder, tmp = _synced_tmp(full, data)
        try:
            os.link(tmp, full)  # fails if `full` exists: the exclusive step
        except FileExistsError:
            return False
        finally:
            _unlink(tmp)
        _fsync_dir(folder)
        return True

    def read(self, rel: str) -> bytes:
        if self._fs is not None:
            with self._fs.open(self.path(rel), "rb") as fh:
                return bytes(fh.read())
        return Path(self.path(rel)).read_bytes()

    def exists(self, rel: str) -> bool:
        full = self.path(rel)
        return bool(self._fs.exists(full)) if self._fs is not None else os.path.exists(full)

    def delete(self, rel: str) -> bool:
        """Removes the file `rel`; False if it was not there."""
        full = self.path(rel)
        if self._fs is not None:
            try:
                self._fs.rm_file(full)
                return True
            except FileNotFoundError:
                return False
        if not _unlink(full):
            return False
        _fsync_dir(os.path.dirname(full))
        return True

    def delete_tree(self, rel: str) -> None:
        """Removes the folder `rel` and everything in it."""
        full = self.path(rel)
        if self._fs is not None:
            if self._fs.exists(full):
                self._fs.rm(full, recursive=True)
            return
        shutil.rmtree(full, ignore_errors=True)

    def children(self, rel: str) -> list[str]:
        """Names of the folders directly in `rel` (none when it does not exist), sorted."""
        full = self.path(rel)
        if self._fs is not None:
            try:
                entries = self._fs.ls(full, detail=True)
            except FileNotFoundError:
                return []
            return sorted(
                e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory"
            )
        try:
            return sorted(e.name for e in os.scandir(full) if e.is_dir())
        except FileNotFoundError:
            return []

    def files(self, rel: str, suffix: str = "") -> list[str]:
        """Paths relative to the root of the data files under `rel` (any depth) ending in `suffix`, sorted;
        names starting with "." or "_" are left out."""
        full = self.path(rel)
        found: list[str] = []
        if self._fs is not None:
            try:
                names = self._fs.find(full)
            except FileNotFoundError:
                names = []
            prefix = self.root + "/"
            for name in names:
                below = name[len(full) :].split("/")
                if name.startswith(prefix) and not any(part.startswith((".", "_")) for part in below):
                    found.append(name[len(prefix) :])
        else:
            for folder, dirs, names in os.walk(full):
                dirs[:] = [d for d in dirs if not d.startswith((".", "_"))]
                base = os.path.relpath(folder, self.root).replace(os.sep, "/")
                found += [f"{base}/{n}" for n in names]
        return sorted(
            f for f in found if f.endswith(suffix) and not f.rsplit("/", 1)[-1].startswith((".", "_"))
        )


def _synced_tmp(full: str, data: bytes) -> tuple[str, str]:
    """(folder, tmp): `data` written and fsynced to a fresh temporary file beside `full` (removed on failure)."""
    folder = os.path.dirname(full)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(full)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        _unlink(tmp)
        raise
    return folder, tmp


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _fsync_dir(folder: str) -> None:
    """Makes a rename or unlink in `folder` durable (a crash could otherwise undo it)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
