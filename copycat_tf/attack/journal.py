"""Write-ahead journal of answered queries: a killed `steal` loses no paid query.

Every answer is appended here the moment it arrives, before it can be committed to a
shard (shards need records in stream order, answers come back out of order). A process
kill keeps what was written (the OS has it); `sync()` (fsync) runs at each shard commit
and every `sync_interval_s`, bounding what a machine crash can lose.

Layout: <dir>/segment-NNNNNN.log, each a sequence of entries
    <u32 payload length> <u32 crc32(payload)> <i64 query index> <u8 kind> <payload>
kind R: payload is the serialized tf.train.Example of an answered query;
kind S: payload is JSON {"source_id", "error"} of an NPD item that could not be read.
A torn or corrupt tail (a kill mid-write) is cut off when the journal is reopened.
A segment is deleted once every entry in it is committed to shards.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import time
import zlib

_HEADER = struct.Struct("<IIqB")
RECORD = 1
SKIP = 2


@dataclasses.dataclass
class Entry:
    index: int
    kind: int
    payload: bytes


def _read_segment(path: str) -> tuple[list[Entry], int]:
    """Valid entries of a segment and the byte offset where they end."""
    entries, offset = [], 0
    with open(path, "rb") as f:
        data = f.read()
    while offset + _HEADER.size <= len(data):
        length, crc, index, kind = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        payload = data[start : start + length]
        if len(payload) != length or zlib.crc32(payload) != crc or kind not in (RECORD, SKIP):
            break
        entries.append(Entry(index, kind, payload))
        offset = start + length
    return entries, offset


class Journal:
    """Append-only, segment-rotated log; see the module docstring."""

    def __init__(self, directory: str, sync_interval_s: float = 1.0):
        self.directory = directory
        self.sync_interval_s = sync_interval_s
        self._file = None
        self._segment_max: dict[str, int] = {}
        self._last_sync = time.monotonic()

    def recover(self) -> list[Entry]:
        """Reads every intact entry (and cuts torn tails); call once before appending."""
        entries = []
        if not os.path.isdir(self.directory):
            return entries
        for name in sorted(os.listdir(self.directory)):
            if not name.startswith("segment-"):
                continue
            path = os.path.join(self.directory, name)
            found, end = _read_segment(path)
            if end < os.path.getsize(path):
                with open(path, "r+b") as f:
                    f.truncate(end)
            entries.extend(found)
            self._segment_max[name] = max((e.index for e in found), default=-1)
        return entries

    def _open_segment(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        number = 1 + max((int(n[8:14]) for n in self._segment_max), default=0)
        name = f"segment-{number:06d}.log"
        self._file = open(os.path.join(self.directory, name), "ab", buffering=0)  # noqa: SIM115
        self._name = name
        self._segment_max[name] = -1

    def append(self, entries: list[tuple[int, int, bytes]]) -> None:
        """Appends (index, kind, payload) entries with one write (durable against kills)."""
        if not entries:
            return
        if self._file is None:
            self._open_segment()
        blob = b"".join(_HEADER.pack(len(p), zlib.crc32(p), i, k) + p for i, k, p in entries)
        self._file.write(blob)
        self._segment_max[self._name] = max(
            self._segment_max[self._name], max(i for i, _, _ in entries)
        )
        if time.monotonic() - self._last_sync >= self.sync_interval_s:
            self.sync()

    def sync(self) -> None:
        if self._file is not None:
            os.fsync(self._file.fileno())
        self._last_sync = time.monotonic()

    def retire(self, watermark: int) -> None:
        """Starts a new segment and deletes segments whose entries are all < watermark."""
        self.sync()
        if self._file is not None:
            self._file.close()
            self._file = None
        for name, highest in list(self._segment_max.items()):
            if highest < watermark:
                os.remove(os.path.join(self.directory, name))
                del self._segment_max[name]

    def close(self, remove_if_empty: bool = True) -> None:
        self.sync()
        if self._file is not None:
            self._file.close()
            self._file = None
        if remove_if_empty and not self._segment_max and os.path.isdir(self.directory):
            os.rmdir(self.directory)


def skip_payload(source_id: str, error: str) -> bytes:
    return json.dumps({"source_id": source_id, "error": error}).encode()
