"""One fake dataset from the worker datasets of a split steal (`--shard_index/--num_shards`).

  python -m copycat_tf.steal --merge=DIR0,DIR1,... --output_dir=OUT

Each worker of a split steal writes its own dataset (its stream positions k with
k % num_shards == shard_index). Merging checks that the directories are every worker of
one run (same target, NPD spec, seed, preparation, label mode; each shard_index once) and
finished, verifies every shard against its manifest's checksum, and writes one dataset:
the shards under new names and one manifest (summed label histogram, queries and
requests; each worker's figures under "workers"). The merge is built in a temporary
directory beside OUT and renamed into place, so OUT is either absent or complete.

A merged dataset trains like any other; steal does not resume it (its identity says
"merged"): resume the workers, then merge again.
"""

from __future__ import annotations

import os
import shutil

from copycat_tf.attack.progress import LabelStats
from copycat_tf.data import fake_dataset as fd
from copycat_tf.errors import UserInputError

# What a worker may have ended as: a merge of unfinished workers would hide a hole.
FINISHED = ("complete", "exhausted")


def _worker_identity(manifest: dict) -> dict:
    """What every worker of one run shares (its own shard_index left out), flat: the NPD
    record's fields as "npd.<field>", so a difference names the field."""
    npd = {f"npd.{k}": v for k, v in manifest["npd"].items() if k != "shard_index"}
    return {
        "target": manifest["target"],
        "label_mode": manifest["label_mode"],
        "selection": manifest.get("selection", "random"),
        **npd,
    }


def _read_workers(directories: list[str]) -> list[tuple[str, dict]]:
    workers = []
    for directory in directories:
        manifest = fd.read_manifest(directory)
        if manifest is None:
            raise UserInputError(
                f"--merge: {directory} holds no fake dataset ({fd.MANIFEST} missing); pass "
                "the --output_dir of each steal worker"
            )
        if manifest["npd"].get("merged"):
            raise UserInputError(f"--merge: {directory} is already a merge; pass the workers")
        if manifest["status"] not in FINISHED:
            raise UserInputError(
                f"--merge: worker {directory} is {manifest['status']}; re-run its steal "
                "command until it completes, then merge"
            )
        workers.append((directory, manifest))
    return workers


def _check_one_run(workers: list[tuple[str, dict]]) -> int:
    """The run's num_shards, once every worker is known to belong to it."""
    first_dir, first = workers[0]
    reference = _worker_identity(first)
    for directory, manifest in workers[1:]:
        theirs = _worker_identity(manifest)
        differs = sorted(
            k for k in reference.keys() | theirs.keys() if theirs.get(k) != reference.get(k)
        )
        if differs:
            raise UserInputError(
                f"--merge: {directory} and {first_dir} are not workers of one steal "
                f"({', '.join(differs)} differ); merge the workers of one run only"
            )
    num_shards = int(first["npd"]["num_shards"])
    seen = sorted(int(m["npd"]["shard_index"]) for _, m in workers)
    if len(set(seen)) != len(seen):
        raise UserInputError(f"--merge: a worker is given twice (shard indices {seen})")
    missing = sorted(set(range(num_shards)) - set(seen))
    if missing:
        raise UserInputError(
            f"--merge: the run has --num_shards={num_shards} workers; shard_index "
            f"{', '.join(map(str, missing))} missing; pass every worker's --output_dir"
        )
    return num_shards


def _check_output(out: str) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserInputError(f"--output_dir {out} exists and is not empty; pass a new directory")


def merge(directories: list[str], out: str) -> dict:
    """Merges the worker datasets of one split steal into `out`; returns its manifest.

    Raises:
      UserInputError: a directory without a dataset, an unfinished worker, workers of
        different runs, a missing or repeated worker, a corrupt shard, or a non-empty `out`.
    """
    if len(directories) < 2:
        raise UserInputError("--merge: pass at least two worker directories, comma-separated")
    _check_output(out)
    workers = sorted(_read_workers(directories), key=lambda w: w[1]["npd"]["shard_index"])
    num_shards = _check_one_run(workers)
    sources = []
    for directory, manifest in workers:
        paths = fd.shard_paths(directory, manifest, verify=True)
        sources.extend(zip(paths, manifest["shards"], strict=True))
    first = workers[0][1]
    num_classes = int(first["target"]["num_classes"])
    labels = LabelStats(num_classes)
    for _, manifest in workers:
        labels.add_counts(manifest["label_histogram"])
    staging = out.rstrip(os.sep) + ".merging"
    shutil.rmtree(staging, ignore_errors=True)  # what a killed merge left
    os.makedirs(staging)
    shards = []
    for i, (path, shard) in enumerate(sources):
        name = fd.shard_name(i, len(sources))
        _link_or_copy(path, os.path.join(staging, name))
        shards.append({**shard, "file": name})
    statuses = {m["status"] for _, m in workers}
    manifest = {
        "schema_version": fd.SCHEMA_VERSION,
        "target": first["target"],
        "npd": {**first["npd"], "shard_index": None, "merged": True},
        "label_mode": first["label_mode"],
        "selection": first.get("selection", "random"),
        "records_per_shard": first.get("records_per_shard"),
        "target_details": first.get("target_details"),
        "query_budget": sum(m["query_budget"] for _, m in workers),
        "queries_spent": sum(m["queries_spent"] for _, m in workers),
        "records": sum(m["records"] for _, m in workers),
        "requests": sum(m.get("requests", 0) for _, m in workers),
        "retries": sum(m.get("retries", 0) for _, m in workers),
        "transient_errors": sum(m.get("transient_errors", 0) for _, m in workers),
        "skipped": {
            "count": sum(m["skipped"]["count"] for _, m in workers),
            "examples": [e for _, m in workers for e in m["skipped"]["examples"]][:10],
        },
        # Workers run side by side: the merge took as long as the slowest.
        "steal_seconds": max(m.get("steal_seconds", 0.0) for _, m in workers),
        "label_histogram": labels.counts.tolist(),
        "label_statistics": labels.summary(),
        "shards": shards,
        "status": "complete" if statuses == {"complete"} else "exhausted",
        "workers": [
            {
                "directory": os.path.abspath(directory),
                "shard_index": m["npd"]["shard_index"],
                "status": m["status"],
                "records": m["records"],
                "queries_spent": m["queries_spent"],
                "steal_seconds": m.get("steal_seconds", 0.0),
                "label_histogram": m["label_histogram"],
                **({"npd_adaptation": m["npd_adaptation"]} if "npd_adaptation" in m else {}),
            }
            for directory, m in workers
        ],
        "num_workers": num_shards,
        "created": min(m.get("created", "") for _, m in workers),
    }
    fd.write_manifest(staging, manifest)
    if os.path.isdir(out):
        os.rmdir(out)  # empty (checked above)
    os.rename(staging, out)
    return manifest


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link where the filesystem allows one (no second copy of the images)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def format_merge(manifest: dict, out: str) -> str:
    """The lines a user wants after a merge."""
    stats = manifest["label_statistics"]
    return "\n".join(
        [
            f"merged {manifest['num_workers']} workers ({manifest['status']}): "
            f"{manifest['records']} records in {len(manifest['shards'])} shard(s), "
            f"{manifest['queries_spent']}/{manifest['query_budget']} queries spent",
            f"  stolen labels per class {manifest['label_histogram']} (top class "
            f"{stats['top_class']} at {100 * stats['top_share']:.0f}%)",
            f"  fake dataset  {out}  ({fd.MANIFEST})",
        ]
    )
