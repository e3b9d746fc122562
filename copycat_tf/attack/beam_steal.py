"""`steal --runner=<Beam runner>`: the steal as an Apache Beam pipeline.

The driver plans waves of stream-position ranges (attack.ranges.plan_wave) and runs each
wave as a pipeline: Create(ranges) | Reshuffle | ParDo(query and commit each range). The
first wave of an adaptive preparation is its exploration (positions below
`adapt_after`); the arm weights computed from its answers, exactly as the in-process
engine computes them, go with every later range. Later waves make up for unreadable
items, so the dataset holds the records the in-process engine would write for the same
target, NPD spec, seed and budget (only the shard layout differs), and never more
answers than the budget. Re-running the same command reuses every committed range and
every staged request; `train_copycat` reads the result unchanged.

Apache Beam is an optional dependency (requirements-beam.txt).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import time

import apache_beam as beam
import numpy as np
from absl import logging
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, WorkerOptions

from copycat_tf.attack import ranges as rg
from copycat_tf.attack.adaptation import Exploration
from copycat_tf.attack.label_modes import parse_label_mode
from copycat_tf.attack.progress import LabelStats
from copycat_tf.attack.steal import StealConfig, describe_target, identity_of, report_exhausted
from copycat_tf.attack.writer import MAX_SKIP_EXAMPLES
from copycat_tf.data import fake_dataset as fd
from copycat_tf.data.npd import NpdStream
from copycat_tf.data.preparation import Preparation
from copycat_tf.errors import UserInputError
from copycat_tf.recipe import Recipe

ENGINE = "beam"


class _RangeDoFn(beam.DoFn):
    """Queries and commits each range it is given (attack.ranges.RangeWorker)."""

    def __init__(self, cfg: StealConfig, input_shape, num_classes: int, max_qps: float):
        self._args = (cfg, tuple(input_shape), num_classes, max_qps)
        self._worker = None

    def setup(self):
        self._worker = rg.RangeWorker(*self._args)
        self._worker.open()

    def process(self, r: rg.Range):
        summary = self._worker.process(r)
        yield summary["start"], summary["records"]

    def teardown(self):
        if self._worker is not None:
            self._worker.close()


def num_workers(options: PipelineOptions) -> int:
    """The workers the runner will use, as far as its options tell (for --max_qps)."""
    runner = (options.get_all_options().get("runner") or "DirectRunner").rsplit(".", 1)[-1]
    if runner in ("DirectRunner", "BundleBasedDirectRunner", "FnApiRunner"):
        n = options.view_as(DirectOptions).direct_num_workers
        return n if n > 0 else os.cpu_count() or 1
    worker = options.view_as(WorkerOptions)
    return max(worker.num_workers or 0, worker.max_num_workers or 0, 1)


def _check_settings(cfg: StealConfig, range_size: int) -> None:
    if cfg.selection != "random":
        raise UserInputError(
            f"--runner with --selection={cfg.selection}: a query selection chooses each round "
            "from the answers of the round before; run it without --runner (in process)"
        )
    if cfg.num_shards != 1:
        raise UserInputError(
            "--runner splits the stream among its workers itself; drop --shard_index/--num_shards"
        )
    if range_size < 1:
        raise UserInputError(f"--range_size={range_size}; expected at least 1")


def _check_output(out: str, identity: dict) -> dict | None:
    """The manifest of an earlier run of this steal (None for a new one); refuses another
    run's directory. Records the identity before anything is sent."""
    fs = rg.gfile()
    manifest_path = os.path.join(out, fd.MANIFEST)
    identity_path = os.path.join(out, rg.RANGES_DIR, rg.IDENTITY)
    manifest = rg.read_json(manifest_path) if fs.exists(manifest_path) else None
    if manifest is not None and manifest.get("engine") != ENGINE:
        raise UserInputError(
            f"--output_dir {out} holds a fake dataset stolen in process; resume it without "
            "--runner, or pass a new --output_dir"
        )
    if fs.exists(identity_path):
        recorded = rg.read_json(identity_path)
        differs = sorted(
            k for k in identity.keys() | recorded.keys() if recorded.get(k) != identity.get(k)
        )
        if differs:
            detail = "; ".join(f"{k}: {recorded.get(k)} != {identity.get(k)}" for k in differs)
            raise UserInputError(
                f"--output_dir {out} holds a fake dataset of another run ({detail}); use a new "
                "--output_dir, or the original --target/--npd/--seed/--label_mode and NPD "
                "preparation flags to resume"
            )
        return manifest
    if fs.exists(out) and fs.listdir(out):
        raise UserInputError(
            f"--output_dir {out} is not empty and holds no fake dataset of --runner; pass an "
            "empty or new directory"
        )
    fs.makedirs(os.path.join(out, rg.RANGES_DIR))
    rg.write_json(identity_path, identity)
    return None


def _adapt(stream: NpdStream, summaries: list[dict], bound: int, num_classes: int):
    """The arm weights of positions past the exploration, from its answers (as the
    in-process engine computes them); returns (manifest record, weights)."""
    pairs = [(k, y) for s in summaries if s["start"] < bound for k, y in s["labels"] if k < bound]
    indices = np.array([k for k, _ in pairs], np.int64)
    labels = np.array([y for _, y in pairs], np.int64)
    exploration = Exploration(stream, bound, (indices, labels), num_classes, bound)
    record = exploration.adapt()
    return record, tuple(float(w) for w in stream.arm_weights)


def _run_wave(options, jobs: list[rg.Range], fn: _RangeDoFn, out: str) -> None:
    try:
        with beam.Pipeline(options=options) as p:
            _ = (
                p
                | "ranges" >> beam.Create(jobs)
                | "spread" >> beam.Reshuffle()
                | "steal" >> beam.ParDo(fn)
            )
    except UserInputError:
        raise
    except Exception as e:  # a worker's error, wrapped by the runner
        message = str(e).strip().splitlines()
        raise UserInputError(
            f"steal stopped: a range failed ({message[-1] if message else type(e).__name__}). "
            f"Every committed range and answered request is kept in {out} (re-run the same "
            "command to continue)"
        ) from e


def steal_beam(cfg: StealConfig, runner: str, beam_args: list[str], range_size: int) -> dict:
    """Runs (or resumes) a steal on a Beam runner; returns the final manifest.

    Args:
      cfg: the steal (random order; the in-process engine's configuration).
      runner: the Beam runner's name (DirectRunner, FlinkRunner, DataflowRunner, ...).
      beam_args: further Beam pipeline options (--direct_num_workers=2, --project=...).
      range_size: stream positions per unit of work (committed atomically).

    Raises:
      UserInputError: bad settings, target, NPD spec or output directory, or a range that
        failed (everything committed or staged is kept).
    """
    _check_settings(cfg, range_size)
    # Worker processes inherit it: TensorFlow's start-up notices stay out of the output.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    options = PipelineOptions([f"--runner={runner}", *beam_args])
    workers = num_workers(options)
    mode = parse_label_mode(cfg.label_mode)
    client, info, num_classes = describe_target(cfg, mode)
    client.close()
    prep = cfg.preparation or Preparation.of(Recipe())
    cfg = _with_preparation(cfg, prep)
    identity = identity_of(cfg, info, num_classes, prep)
    out = cfg.output_dir
    previous = _check_output(out, identity)
    stream = NpdStream(
        cfg.npd, info.input_shape, cfg.seed, cfg.crops_per_image, 0, 1, cfg.npd_data_dir, prep
    )
    bound = (prep.adapt_after or Recipe.npd_adapt_after) if stream.adapts else None
    fn = _RangeDoFn(cfg, info.input_shape, num_classes, cfg.max_qps / workers)
    started = time.monotonic()
    done: list[dict] = []
    weights = adaptation = ended_at = None
    position = answered = 0

    created = (previous or {}).get("created") or _now()

    def record(status: str) -> dict:  # the manifest of what is done so far
        seconds = _seconds(previous, started)
        return _write_manifest(
            cfg,
            identity,
            info,
            num_classes,
            done,
            position,
            status,
            runner,
            workers,
            seconds,
            adaptation,
            created,
        )

    committed = rg.committed_summaries(out)
    while answered < cfg.query_budget and ended_at is None:
        if bound is not None and position >= bound and weights is None:
            adaptation, weights = _adapt(stream, done, bound, num_classes)
            logging.info("steal: NPD preparation adapted after %d answers", adaptation["answers"])
        stop_at = bound if bound is not None and position < bound else None
        try:
            wave = rg.plan_wave(
                position, cfg.query_budget - answered, committed, range_size, stop_at
            )
        except ValueError as e:
            raise UserInputError(
                f"--output_dir {out}: {e}; re-run with the --query_budget that filled it (or a "
                "larger one), or use a new --output_dir"
            ) from e
        jobs = [
            rg.Range(a, b, weights if stop_at is None and bound is not None else None)
            for a, b in wave.new
        ]
        logging.info(
            "steal: positions %d-%d: %d range(s) committed before, %d to query on %d worker(s)",
            position,
            wave.end,
            len(wave.reused),
            len(jobs),
            workers,
        )
        if jobs:
            _run_wave(options, jobs, fn, out)
            for job in jobs:  # what the wave committed
                committed[(job.start, job.end)] = rg.read_json(rg.summary_path(out, job.name))
        for summary in sorted(wave.reused + [committed[(a, b)] for a, b in wave.new], key=_start):
            done.append(summary)
            answered += summary["records"]
            if summary["ended_at"] is not None and ended_at is None:
                ended_at = summary["ended_at"]
        position = wave.end if ended_at is None else ended_at
        record("in_progress")
    status = "exhausted" if ended_at is not None and answered < cfg.query_budget else "complete"
    if status == "exhausted":
        report_exhausted(cfg, answered)
    return record(status)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _start(summary: dict) -> int:
    return summary["start"]


def _with_preparation(cfg: StealConfig, prep: Preparation) -> StealConfig:
    return dataclasses.replace(cfg, preparation=prep, progress=False)


def _seconds(previous: dict | None, started: float) -> float:
    before = previous.get("steal_seconds", 0.0) if previous else 0.0
    return round(before + time.monotonic() - started, 3)


def _write_manifest(
    cfg: StealConfig,
    identity: dict,
    info,
    num_classes: int,
    summaries: list[dict],
    next_index: int,
    status: str,
    runner: str,
    workers: int,
    seconds: float,
    adaptation: dict | None,
    created: str,
) -> dict:
    labels = LabelStats(num_classes)
    for s in summaries:
        labels.add([y for _, y in s["labels"]])
    skips = [skip for s in summaries for skip in s["skips"]]
    per_worker: dict[str, dict] = {}
    for s in summaries:
        w = per_worker.setdefault(
            s["worker"], {"worker": s["worker"], "ranges": 0, "records": 0, "seconds": 0.0}
        )
        w["ranges"] += 1
        w["records"] += s["records"]
        w["seconds"] = round(w["seconds"] + s["seconds"], 3)
    manifest = {
        "schema_version": fd.SCHEMA_VERSION,
        **identity,
        "engine": ENGINE,
        "runner": runner,
        "num_workers": workers,
        "query_budget": cfg.query_budget,
        "queries_spent": labels.total,
        "records": labels.total,
        "next_index": next_index,
        "shards": [s["shard"] for s in summaries if "shard" in s],
        "label_histogram": labels.counts.tolist(),
        "label_statistics": labels.summary(),
        "skipped": {"count": len(skips), "examples": skips[:MAX_SKIP_EXAMPLES]},
        "requests": sum(s["requests"] for s in summaries),
        "retries": sum(s["retries"] for s in summaries),
        "transient_errors": sum(s["transient_errors"] for s in summaries),
        "steal_seconds": seconds,
        "status": status,
        "target_details": {"url": cfg.target, **info.details},
        "workers": sorted(per_worker.values(), key=lambda w: w["worker"]),
        "created": created,
        "updated": _now(),
        **({"npd_adaptation": adaptation} if adaptation else {}),
    }
    rg.write_json(os.path.join(cfg.output_dir, fd.MANIFEST), manifest)
    return manifest
