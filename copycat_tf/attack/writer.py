"""Writing a fake dataset durably: the journal, ordered shard commits and the manifest.

Answers arrive out of order; each is appended to the journal the moment it arrives.
Records are committed in stream order as fixed-size shards (temp file, fsync, rename,
then the manifest, itself replaced atomically), after which the journal segments they
came from are deleted. A killed run is recovered from the manifest (what is committed)
plus the journal (what was answered since): nothing answered is lost or asked again.
"""

from __future__ import annotations

import collections
import datetime
import json
import math
import os
import time
from collections.abc import Callable

from copycat_tf.attack.journal import RECORD, SKIP, Journal, skip_payload
from copycat_tf.data import fake_dataset as fd
from copycat_tf.errors import UserInputError

JOURNAL_DIR = "journal"
MAX_SKIP_EXAMPLES = 100
# What makes a fake dataset's query selection its own (manifest key, value when absent).
SELECTION_IDENTITY = (
    ("selection", None),
    ("selection_random", 0),
    ("selection_reuse", False),
    ("selection_warm_start", False),
)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def check_output_dir(directory: str, identity: dict) -> dict | None:
    """The manifest to resume, None for a fresh directory; refuses anything else.

    Raises:
      UserInputError: a file, a non-empty directory without a fake dataset, or the
        dataset of another run (different target, NPD, seed, label mode, ...).
    """
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise UserInputError(f"--output_dir {directory} is a file; pass a directory")
    manifest = fd.read_manifest(directory) if os.path.isdir(directory) else None
    if manifest is None:
        if os.path.isdir(directory) and os.listdir(directory):
            raise UserInputError(
                f"--output_dir {directory} is not empty and holds no fake dataset "
                f"({fd.MANIFEST}); pass an empty or new directory"
            )
        return None
    # Selection settings are in an identity only when set: one made with them is not
    # this run's when they are unset now (nor the reverse).
    defaults = dict(SELECTION_IDENTITY)
    was, now = (
        {k: d.get(k, defaults.get(k)) for k in [*identity, *defaults]} for d in (manifest, identity)
    )
    differs = [k for k in was if was[k] != now[k]]
    if differs:
        detail = "; ".join(f"{k}: {was[k]} != {now[k]}" for k in differs)
        hint = ""
        npd = manifest.get("npd") or {}
        made = npd.get("preparation") or {}
        wanted = identity["npd"]["preparation"]
        if npd.get("merged"):
            hint = " (it is a merge of worker datasets: resume the workers, then merge again)"
        elif made == {"legacy": True}:
            hint = " (it was made before NPD preparation existed: resume it with --npd_legacy)"
        elif made.get("jitter_on") and made.get("jitter_on") != wanted.get("jitter_on"):
            on = made["jitter_on"]
            hint = f" (its jitter is on the {on}: resume it with --npd_jitter_on={on})"
        elif made.get("probe", 0) != wanted.get("probe", 0):
            probe = made.get("probe", 0)
            hint = f" (it was made with --invariance_probe={probe}: resume it with that)"
        elif any(k in defaults for k in differs):
            flag = f"--selection={manifest.get('selection')}"
            if manifest.get("selection_random"):
                flag += f" --selection_random={manifest['selection_random']:g}"
            for name in ("selection_reuse", "selection_warm_start"):
                flag += f" --{name}" if manifest.get(name) else ""
            hint = f" (it was made with {flag}: resume it with that)"
        raise UserInputError(
            f"--output_dir {directory} holds a fake dataset of another run ({detail}); use a "
            "new --output_dir, or the original --target/--npd/--seed/--label_mode and NPD "
            f"preparation flags to resume{hint}"
        )
    return manifest


class FakeDatasetWriter:
    """The fake dataset of one steal run, from its first answer to its final manifest.

    Args:
      directory: the output directory (created on the first answer).
      identity: what makes the dataset this run's (checked on resume).
      fields: the other manifest fields of a new dataset (target details, ...).
      num_classes: the label space.
      records_per_shard: records per committed shard.
    """

    def __init__(
        self,
        directory: str,
        identity: dict,
        fields: dict,
        num_classes: int,
        records_per_shard: int,
    ):
        self.directory = directory
        self.records_per_shard = records_per_shard
        manifest = check_output_dir(directory, identity)
        if manifest is None:
            manifest = {
                "schema_version": fd.SCHEMA_VERSION,
                **identity,
                "queries_spent": 0,
                "records": 0,
                "next_index": identity["npd"]["shard_index"],
                "shards": [],
                "label_histogram": [0] * num_classes,
                "skipped": {"count": 0, "examples": []},
                "requests": 0,
                "retries": 0,
                "transient_errors": 0,
                "steal_seconds": 0.0,
                "status": "in_progress",
                "created": _now(),
            }
        manifest.update(fields)
        self.manifest = manifest
        self.journal = Journal(os.path.join(directory, JOURNAL_DIR))
        # Answered or skipped stream positions not yet in shards: index -> (kind, payload,
        # label); label is None for skips.
        self.settled: dict[int, tuple[int, bytes, int | None]] = {}
        for entry in self.journal.recover():
            if entry.index >= manifest["next_index"]:
                label = fd.parse_example(entry.payload)["label"] if entry.kind == RECORD else None
                self.settled[entry.index] = (entry.kind, entry.payload, label)
        self.recovered = sum(1 for kind, _, _ in self.settled.values() if kind == RECORD)
        self.spent = manifest["records"] + self.recovered
        self._order: collections.deque[int] = collections.deque()
        self._ready: list[tuple[int, bytes, int]] = []
        self._pending_skips: list[tuple[int, dict]] = []
        self._frontier = manifest["next_index"]
        self._clock = time.monotonic()
        # Request counts since the last manifest write (set by the sender).
        self.take_counters: Callable[[], dict[str, int]] = dict

    @property
    def next_index(self) -> int:
        """The first stream position not committed."""
        return self.manifest["next_index"]

    def answered_labels(self) -> list[int]:
        """Labels answered but not committed (recovered from the journal or new)."""
        return [label for kind, _, label in self.settled.values() if kind == RECORD]

    # ------------------------------------------------------------------ answers

    def expect(self, indices: list[int]) -> None:
        """Stream positions, in order, that the commits must wait for."""
        self._order.extend(indices)

    def add_records(self, records: list[tuple[int, bytes, int]]) -> None:
        """Journals answered queries (index, serialized Example, label)."""
        self._journal([(k, RECORD, payload) for k, payload, _ in records])
        for k, payload, label in records:
            self.settled[k] = (RECORD, payload, label)
        self.spent += len(records)

    def add_skips(self, skips: list[tuple[int, str, str]]) -> None:
        """Journals unreadable NPD items (index, source id, error)."""
        entries = [(k, SKIP, skip_payload(source, error)) for k, source, error in skips]
        self._journal(entries)
        for k, kind, payload in entries:
            self.settled[k] = (kind, payload, None)

    def _journal(self, entries) -> None:
        # The first time, write the manifest that identifies the run, so a directory
        # holding a journal can always be checked before resuming.
        if not os.path.exists(os.path.join(self.directory, fd.MANIFEST)):
            self.write_manifest()
        self.journal.append(entries)

    # ------------------------------------------------------------------ commits

    def advance(self, final: bool = False) -> None:
        """Moves settled entries at the front of the order into shards; with `final`, also
        the last, partial shard."""
        while self._order and self._order[0] in self.settled:
            k = self._order.popleft()
            kind, payload, label = self.settled.pop(k)
            if kind == RECORD:
                self._ready.append((k, payload, label))
            else:
                self._pending_skips.append((k, json.loads(payload)))
            self._frontier = k + 1
            if len(self._ready) == self.records_per_shard:
                self._commit(self._ready, self._ready[-1][0] + 1)
                self._ready = []
        if final and not self._order:
            self._commit(self._ready, self._frontier)
            self._ready = []

    def _commit(self, records: list[tuple[int, bytes, int]], watermark: int) -> None:
        m = self.manifest
        if records:
            index = len(m["shards"])
            planned = index + math.ceil((m["query_budget"] - m["records"]) / self.records_per_shard)
            name = fd.shard_name(index, planned)
            os.makedirs(self.directory, exist_ok=True)
            digest = fd.write_shard(self.directory, name, [payload for _, payload, _ in records])
            hist = m["label_histogram"]
            labels = [label for _, _, label in records]
            for label in labels:
                if label >= len(hist):
                    hist.extend([0] * (label + 1 - len(hist)))
                hist[label] += 1
            m["shards"].append(
                {
                    "file": name,
                    "records": len(records),
                    "sha256": digest,
                    "first_index": records[0][0],
                    "last_index": records[-1][0],
                }
            )
            m["records"] += len(records)
        skips = [s for s in self._pending_skips if s[0] < watermark]
        self._pending_skips = [s for s in self._pending_skips if s[0] >= watermark]
        m["skipped"]["count"] += len(skips)
        room = MAX_SKIP_EXAMPLES - len(m["skipped"]["examples"])
        m["skipped"]["examples"].extend({"index": k, **info} for k, info in skips[: max(room, 0)])
        m["next_index"] = watermark
        self.write_manifest()
        self.journal.retire(watermark)

    # ------------------------------------------------------------------ manifest

    def write_manifest(self, **fields) -> None:
        """Replaces manifest.json, adding the request counts since the last write and
        setting `fields` (status, label statistics, ...)."""
        m = self.manifest
        m["queries_spent"] = self.spent
        for name, n in self.take_counters().items():
            m[name] += n
        now = time.monotonic()
        m["steal_seconds"] = round(m["steal_seconds"] + now - self._clock, 3)
        self._clock = now
        m.update(fields)
        m["updated"] = _now()
        os.makedirs(self.directory, exist_ok=True)
        fd.write_manifest(self.directory, m)

    def close(self, complete: bool) -> None:
        """Closes the journal (removed once nothing is pending)."""
        self.journal.close(remove_if_empty=complete)
