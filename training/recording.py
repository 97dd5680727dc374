"""A recording that `gpuwatch score`, `eval` and `train` read: a `gpuwatch simulate` output folder (samples.jsonl,
labels.jsonl, meta.json) or a gpuwatch archive (a folder or fsspec URL; labels from its label store).

Both give the same things: the snapshot messages in time order, as (offset, raw bytes) pairs the replay decodes
exactly as it decodes JSONL lines, and the failure labels.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from gpuwatch.schemas.codecs import snapshot_head
from gpuwatch.training.dataset import Failures, RecordingError


@dataclass
class Recording:
    """Where samples and labels come from. `source` names the samples in dead letters and messages (a file path or
    an archive URL); `cache_dir` is where eval may keep scores (None: nowhere, e.g. a remote archive)."""

    name: str
    location: str  # as the user gave it
    source: str
    samples_path: Path | None = None  # a JSONL file (sharded scoring maps it)
    labels_path: Path | None = None
    meta_path: Path | None = None
    archive_url: str = ""
    cache_dir: Path | None = None
    # A time window of an archive (`gpuwatch train --archive` splits one by time): samples with since <= ts < until,
    # and only the failures before `labels_before` (None: no bound).
    since: float | None = None
    until: float | None = None
    labels_before: float | None = None

    def messages(self) -> Iterator[tuple[int, bytes]]:
        """(line number or ordinal, raw snapshot message), in the recording's order."""
        if self.samples_path is not None:
            from gpuwatch.training.score import file_messages

            return file_messages(self.samples_path)
        from gpuwatch.archive.reader import ArchiveReader

        return ArchiveReader(self.archive_url, since=self.since, until=self.until).snapshot_messages()

    def failures(self) -> Failures:
        """The failure labels (those before `labels_before`); RecordingError names a bad line or missing labels and
        the fix."""
        found = self._all_failures()
        return found if self.labels_before is None else found.before(self.labels_before)

    def _all_failures(self) -> Failures:
        if self.labels_path is not None:
            return Failures.load(self.labels_path)
        from gpuwatch.archive.labels import LabelStore, LabelStoreError
        from gpuwatch.archive.storage import Storage

        try:
            data = LabelStore(Storage(self.archive_url)).labels_jsonl()
        except LabelStoreError as exc:
            raise RecordingError(str(exc)) from None
        return Failures.parse(data.splitlines(), f"{self.archive_url} (label store)")

    def typical_interval_s(self, messages: int = 20_000) -> float | None:
        """The median time between a host's consecutive snapshots over the first `messages` messages (None: no
        host sent two): the sampling interval the model meets on this recording."""
        return typical_interval_s(self.messages(), messages)

    def meta(self) -> dict[str, Any]:
        """The simulator's meta.json ({} when there is none, as for an archive)."""
        if self.meta_path is None or not self.meta_path.exists():
            return {}
        return orjson.loads(self.meta_path.read_bytes())

    def fingerprint(self) -> Any:
        """Changes when the samples change (a cache key part)."""
        if self.samples_path is not None:
            return self.samples_path.stat().st_size
        from gpuwatch.archive.reader import ArchiveReader

        files = ArchiveReader(self.archive_url, since=self.since, until=self.until).files("samples")
        return files if self.since is None and self.until is None else [self.since, self.until, files]

    def label_version(self) -> int | None:
        """The label store version the labels come from (None for a labels.jsonl file)."""
        if self.labels_path is not None:
            return None
        from gpuwatch.archive.labels import LabelStore
        from gpuwatch.archive.storage import Storage

        return LabelStore(Storage(self.archive_url)).current()


def open_recording(location: str | Path, *, need_labels: bool = True) -> Recording:
    """The recording at `location`: a simulate output folder, or an archive. RecordingError says what is missing."""
    from gpuwatch.archive.reader import is_archive

    text = str(location)
    if is_archive(text):
        local = (
            Path(text.removeprefix("file://")) if "://" not in text or text.startswith("file://") else None
        )
        name = text.rstrip("/").rsplit("/", 1)[-1]
        return Recording(name=name, location=text, source=f"{text.rstrip('/')}/samples", archive_url=text,
                         cache_dir=local / ".gpuwatch" if local is not None else None)  # fmt: skip
    folder = Path(text)
    missing = [f for f in ("samples.jsonl", "labels.jsonl") if not (folder / f).is_file()
               and (need_labels or f == "samples.jsonl")]  # fmt: skip
    if missing:
        raise RecordingError(f"{text} has no {' or '.join(missing)} and is not an archive: pass a `gpuwatch simulate` "
                             "output folder or a `gpuwatch archive` location")  # fmt: skip
    return Recording(name=folder.name, location=text, source=str(folder / "samples.jsonl"), samples_path=folder / "samples.jsonl",
                     labels_path=folder / "labels.jsonl", meta_path=folder / "meta.json",
                     cache_dir=folder / ".gpuwatch")  # fmt: skip


def typical_interval_s(messages: Iterable[tuple[int, bytes]], limit: int = 20_000) -> float | None:
    """The median gap between consecutive snapshots of a host, over the first `limit` (offset, raw) messages
    (None: no host sent two it could read)."""
    last: dict[str, float] = {}
    gaps: list[float] = []
    for _, raw in islice(messages, limit):
        head = snapshot_head(raw)
        if head is None:
            continue
        host, ts = head
        if host in last and ts > last[host]:
            gaps.append(ts - last[host])
        last[host] = ts
    return float(np.median(gaps)) if gaps else None
