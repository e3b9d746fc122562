"""The steal: NPD images in, a durable fake dataset of stolen labels out.

A producer thread walks the NPD stream (`attack.producer`); the dispatcher sends its
batches with up to `max_in_flight` concurrent requests, a client-side rate limit and
retries (`attack.dispatch`); each answer is journaled at once and records are committed in
stream order as shards (`attack.writer`). So a killed run resumes after the last committed
record, re-sends nothing answered, and ends with the same records and shard boundaries as
an uninterrupted run. The query budget (images answered) is never exceeded.
"""

from __future__ import annotations

import dataclasses
import functools
import os

from absl import logging

from copycat_tf.attack import selection as sel
from copycat_tf.attack.adaptation import Exploration, committed_labels
from copycat_tf.attack.dispatch import Dispatcher
from copycat_tf.attack.label_modes import LabelMode, parse_label_mode
from copycat_tf.attack.producer import NpdBatch, Producer
from copycat_tf.attack.progress import TENSORBOARD_DIR, LabelStats, StealMonitor, skew_advice
from copycat_tf.attack.writer import FakeDatasetWriter
from copycat_tf.data import fake_dataset as fd
from copycat_tf.data.npd import NpdStream
from copycat_tf.data.preparation import Preparation
from copycat_tf.errors import UserInputError
from copycat_tf.recipe import Recipe
from copycat_tf.targets.base import (
    PermanentError,
    Prediction,
    RateLimited,
    TargetError,
    TargetInfo,
    TransientError,
)
from copycat_tf.targets.registry import open_target
from copycat_tf.targets.retry import RetryPolicy, describe_with_retries


@dataclasses.dataclass
class StealConfig:
    """Everything `steal` needs (the steal flags, minus process state).

    Attributes:
      target: target URL (see targets.registry.open_target).
      npd: NPD spec (see data.npd).
      output_dir: the fake dataset directory (created; resumed when it holds this run).
      query_budget: images the target may answer in total (never exceeded).
      query_batch_size: images per request.
      max_in_flight: concurrent requests.
      max_qps: requests per second sent at most (0: no client-side limit).
      label_mode: "hard" (top-1), "topk:K" (K best scores kept) or "scores".
      seed: NPD order, crops and synthetic images.
      shard_index, num_shards: this worker's part of the NPD stream.
      crops_per_image: NPD items per source picture (in one pass).
      preparation: how natural NPD pictures are prepared (None: the Recipe's).
      records_per_shard: records in each committed shard.
      npd_workers: threads making NPD items; for a query selection on a folder: or
        synthetic: stream, worker processes (each keeping its own decoded pictures, up to
        attack.selection.PICTURE_BYTES). The same items whatever the count.
      retry: request timeout and retry policy.
      num_classes: the target's class count when its metadata does not tell (label-only).
      npd_data_dir: data dir for tfds: and pd: NPD sources.
      target_options: client options (api_key, request_template, ...).
      progress: draw a progress line on stderr.
      skew_check_after: answers after which skewed stolen labels are warned about.
      selection: which NPD items to send (attack.selection.SELECTIONS).
      selection_pool: candidates a query selection scores at most.
      selection_round: queries a selection round chooses (0: an eighth of the budget, at
        least the exploration).
      selection_reuse: rounds reuse the round before's candidates and scout
        (attack.selection.select).
      selection_warm_start: rounds warm-start their scout from the round before's, on
        fresh pools (implied by selection_reuse).
      selection_random: share of each round drawn at random from its pool (0 with random
        order, whatever is given: sel.random_share).
    """

    target: str
    npd: str
    output_dir: str
    query_budget: int
    query_batch_size: int = Recipe.query_batch_size
    max_in_flight: int = Recipe.max_in_flight
    max_qps: float = 0.0
    label_mode: str = Recipe.label_mode
    seed: int = Recipe.seed
    shard_index: int = 0
    num_shards: int = 1
    crops_per_image: int = Recipe.crops_per_image
    preparation: Preparation | None = None
    records_per_shard: int = 10_000
    npd_workers: int = 2
    retry: RetryPolicy = dataclasses.field(default_factory=RetryPolicy)
    num_classes: int = 0
    npd_data_dir: str | None = None
    target_options: dict = dataclasses.field(default_factory=dict)
    progress: bool = True
    skew_check_after: int = 2000
    selection: str = Recipe.selection
    selection_pool: int = Recipe.selection_pool
    selection_round: int = Recipe.selection_round
    selection_reuse: bool = Recipe.selection_reuse
    selection_warm_start: bool = Recipe.selection_warm_start
    selection_random: float = Recipe.selection_random

    def __post_init__(self):
        # Random order has no rounds to share out (the recipe's default share is for its
        # strategy): it uses and records none.
        self.selection_random = sel.random_share(self.selection, self.selection_random)


def describe_target(cfg: StealConfig, mode: LabelMode):
    """(client, TargetInfo, num_classes) with one-line errors for unusable targets."""
    client = open_target(cfg.target, **cfg.target_options)
    try:
        info = describe_with_retries(client, cfg.retry)
    except RateLimited as e:
        raise UserInputError(
            f"target {cfg.target} still refuses the metadata request for its rate limit after "
            f"{cfg.retry.max_retries} retries ({e}); wait and run again, or raise --max_retries"
        ) from e
    except TransientError as e:
        raise UserInputError(
            f"target {cfg.target} is unreachable or unavailable ({e}); start the model server "
            "or check the URL"
        ) from e
    except PermanentError as e:
        raise UserInputError(f"target {cfg.target} refused the metadata request: {e}") from e
    if mode.needs_scores and info.has_scores is False:
        raise UserInputError(
            f"target {cfg.target} answers labels only (no scores); --label_mode="
            f"{cfg.label_mode} needs scores. Use --label_mode=hard"
        )
    num_classes = cfg.num_classes or info.num_classes
    if num_classes < 2:
        raise UserInputError(
            f"target {cfg.target} does not say how many classes it has (label-only answers); "
            "pass --num_classes"
        )
    return client, info, num_classes


def identity_of(cfg: StealConfig, info: TargetInfo, num_classes: int, prep: Preparation) -> dict:
    # The model, not its address: a resumed run may reach the same model on another port
    # or over the other API (the URL used is kept in target_details).
    return {
        "target": {
            "model": info.details.get("model", cfg.target),
            "input_shape": list(info.input_shape),
            "num_classes": num_classes,
        },
        "npd": {
            "spec": cfg.npd,
            "seed": cfg.seed,
            "crops_per_image": cfg.crops_per_image,
            "shard_index": cfg.shard_index,
            "num_shards": cfg.num_shards,
            "preparation": prep.to_dict(),
        },
        "label_mode": cfg.label_mode,
        "records_per_shard": cfg.records_per_shard,
        "selection": cfg.selection,  # "random" for manifests written before it existed
        **({"selection_reuse": True} if cfg.selection_reuse else {}),
        **({"selection_warm_start": True} if cfg.selection_warm_start else {}),
        **({"selection_random": cfg.selection_random} if cfg.selection_random else {}),
    }


def answer_records(batch: NpdBatch, answer: Prediction, mode: LabelMode, shape) -> list:
    """(index, serialized Example, label) of each answered query."""
    out = []
    for i, k in enumerate(batch.query):
        label = int(answer.labels[i])
        scores = None if answer.scores is None else answer.scores[i]
        example = fd.make_example(
            batch.pngs[i],
            shape,
            batch.sources[i],
            k,
            label,
            mode.stored_scores(scores),
            chosen_by=batch.chosen_by[i] if batch.chosen_by else None,
        )
        out.append((k, example, label))
    return out


def steal(cfg: StealConfig) -> dict:
    """Runs (or resumes) a steal; returns the final manifest.

    Raises:
      UserInputError: bad target, NPD spec, output directory or flags; or a permanent
        query error (everything answered before it is kept, and a re-run continues).
      KeyboardInterrupt: Ctrl-C (everything answered is kept).
    """
    run = _StealRun(cfg)
    error: BaseException | None = None
    try:
        with run.producer:
            while True:
                # Keep up to max_in_flight requests going while the producer has batches.
                while error is None and run.dispatcher.has_room:
                    batch = run.producer.next(timeout_s=0.02 if run.dispatcher.busy else 0.5)
                    if batch is None:
                        break
                    run.send(batch)
                if not run.dispatcher.busy and (run.producer.done or error is not None):
                    break
                for batch, answer in run.dispatcher.completed(timeout_s=0.5):
                    error = error or run.receive(batch, answer)
                run.writer.advance()
    except KeyboardInterrupt as e:
        error = e
    return run.finish(error)


class _StealRun:
    """The parts of one steal and what happens to a batch on its way out and back."""

    def __init__(self, cfg: StealConfig):
        self.cfg = cfg
        self.mode = parse_label_mode(cfg.label_mode)
        if cfg.query_budget < 1:
            raise UserInputError(f"--query_budget={cfg.query_budget}; expected at least 1")
        prep = fit_probe(cfg.preparation or Preparation.of(Recipe()), cfg.selection)
        sel.check_selection(
            cfg.selection,
            cfg.num_shards,
            cfg.selection_round,
            cfg.selection_pool,
            cfg.selection_random,
        )
        self.client, self.info, num_classes = describe_target(cfg, self.mode)
        batch_size = cfg.query_batch_size
        if 0 < self.info.max_batch_size < batch_size:
            batch_size = self.info.max_batch_size
            logging.info(
                "target %s takes %d image(s) per request: batches of %d (each paid request "
                "journaled on its own, --max_qps counts requests)",
                cfg.target,
                batch_size,
                batch_size,
            )
        stream = NpdStream(
            cfg.npd,
            self.info.input_shape,
            cfg.seed,
            cfg.crops_per_image,
            cfg.shard_index,
            cfg.num_shards,
            cfg.npd_data_dir,
            prep,
        )
        details = {"url": cfg.target, **self.info.details}
        self.writer = writer = FakeDatasetWriter(
            cfg.output_dir,
            identity_of(cfg, self.info, num_classes, prep),
            {"query_budget": cfg.query_budget, "target_details": details},
            num_classes,
            cfg.records_per_shard,
        )
        if writer.recovered:
            logging.info(
                "resuming %s: %d records committed, %d answers recovered from the journal",
                cfg.output_dir,
                writer.manifest["records"],
                writer.recovered,
            )
        self.dispatcher = Dispatcher(
            self.client, num_classes, cfg.max_in_flight, cfg.retry, cfg.max_qps
        )
        writer.take_counters = self.dispatcher.stats.take
        self.labels = LabelStats(num_classes, writer.answered_labels())
        self.labels.add_counts(writer.manifest["label_histogram"])
        self.spent_before = writer.spent
        self.exploration = _exploration(stream, writer, num_classes, cfg.selection)
        select = None
        if cfg.selection != "random":
            select = functools.partial(
                _select, cfg, self.exploration.bound, num_classes=num_classes
            )
        self.producer = Producer(
            stream,
            writer.next_index,
            set(writer.settled),
            max(cfg.query_budget - writer.spent, 0),
            batch_size,
            capacity=cfg.max_in_flight + 2,
            exploration=self.exploration,
            workers=cfg.npd_workers,
            select=select,
            reuse=cfg.selection_reuse,
        )
        self.monitor = StealMonitor(
            cfg.output_dir,
            cfg.query_budget,
            writer.spent,
            self.labels,
            cfg.progress,
            summary_every=max(batch_size, cfg.query_budget // 100),
        )
        self.skew = _SkewCheck(
            self.labels,
            min(cfg.skew_check_after, max(1, cfg.query_budget // 2)),
            skew_advice(cfg.npd, stream.prepared_pictures(), cfg.selection),
        )
        self.exhausted = False
        self._rounds_shown = 0

    def _record_rounds(self) -> None:
        """Selection rounds begun since the last call, to the progress line and TensorBoard."""
        selection = self.producer.selection
        rounds = selection["rounds"][: self.producer.rounds_begun] if selection else []
        for i in range(self._rounds_shown, len(rounds)):
            previous = rounds[i - 1] if i else None
            self.monitor.selection_round(i, selection["strategy"], rounds[i], previous)
        self._rounds_shown = max(self._rounds_shown, len(rounds))

    def _settle(self, index: int, label: int | None) -> None:
        if self.exploration is not None:
            self.exploration.settle(index, label)

    def send(self, batch: NpdBatch) -> None:
        """Journals a batch's skips and sends its queries."""
        if batch.end and not self.exhausted:
            self.exhausted = True
            reachable = self.spent_before + self.producer.produced
            report_exhausted(self.cfg, reachable)
            self.writer.write_manifest(npd_exhausted_at=reachable)
        _record_npd_choices(self.producer, self.writer)
        self._record_rounds()
        self.writer.expect(batch.order)
        self.writer.add_skips(batch.skips)
        for k, _, _ in batch.skips:
            self._settle(k, None)
        if batch.query:
            self.dispatcher.submit(batch, _stack(batch), batch.pngs)
        self.writer.advance()

    def receive(self, batch: NpdBatch, answer) -> TargetError | None:
        """Journals an answered batch; returns the error that ended its retries, if any."""
        if isinstance(answer, TargetError):
            self.producer.stop()
            return answer
        records = answer_records(batch, answer, self.mode, self.info.input_shape)
        self.writer.add_records(records)
        for k, _, label in records:
            self._settle(k, label)
        self.labels.add([label for _, _, label in records])
        retries = _retries(self.writer, self.dispatcher)
        self.monitor.answered(len(records), retries, batch.images, answer.labels)
        self.skew.check(self.writer)
        return None

    def finish(self, error: BaseException | None) -> dict:
        """Final commits and manifest; raises what stopped the run, if anything did."""
        cfg, writer = self.cfg, self.writer
        self.dispatcher.shutdown()
        _record_npd_choices(self.producer, writer)
        self._record_rounds()
        self.monitor.close(_retries(writer, self.dispatcher))
        complete = error is None and self.producer.done
        writer.advance(final=complete)
        status = "in_progress"
        if complete:
            status = (
                "exhausted" if self.exhausted and writer.spent < cfg.query_budget else "complete"
            )
        elif error is not None:
            status = "stopped"
        writer.write_manifest(status=status, label_statistics=self.labels.summary())
        writer.close(complete)
        self.client.close()
        if isinstance(error, KeyboardInterrupt):
            raise error
        if error is not None:
            raise UserInputError(
                f"steal stopped: {error}. Everything answered is kept in {cfg.output_dir} "
                "(re-run the same command to continue)"
            )
        return writer.manifest


def _exploration(stream: NpdStream, writer: FakeDatasetWriter, num_classes: int, selection: str):
    """The exploration of an adaptive preparation or a query selection (None when there
    is neither), with what is already committed or journaled."""
    if not stream.adapts and selection == "random":
        return None
    bound = stream.preparation.adapt_after or Recipe.npd_adapt_after
    selects = selection != "random"  # its scout learns from every label, not only these
    committed = committed_labels(
        writer.directory, writer.manifest, writer.next_index if selects else bound
    )
    exploration = Exploration(
        stream, writer.next_index, committed, num_classes, bound, keep_all=selects
    )
    for k, (_, _, label) in writer.settled.items():
        exploration.settle(k, label)
    return exploration


def fit_probe(prep: Preparation, selection: str) -> Preparation:
    """The preparation with its invariance probe inside a query selection's exploration:
    the selection reorders the positions after it, and the probe's copies must stay where
    query index and position are the same (3N positions; N shrinks to fit)."""
    if selection == "random" or not prep.probe:
        return prep
    fitting = (prep.adapt_after or Recipe.npd_adapt_after) // 3
    if prep.probe <= fitting:
        return prep
    logging.info(
        "--invariance_probe=%d shrinks to %d: its copies must come before the %d-query "
        "exploration of --selection=%s",
        prep.probe,
        fitting,
        3 * fitting,
        selection,
    )
    return dataclasses.replace(prep, probe=fitting)


def _select(
    cfg: StealConfig,
    explored: int,
    round_index: int,
    after: int,
    labeled,
    fetch,
    arm_of,
    need: int,
    num_classes: int,
) -> dict:
    """One round of a query selection (attack.selection.select) with the run's settings."""
    size = sel.round_size(cfg.query_budget, explored, cfg.selection_round)
    logging.info(
        "steal: round %d of --selection=%s: choosing up to %d queries from %d answers",
        round_index,
        cfg.selection,
        min(size, need),
        len(labeled),
    )
    selection = sel.select(
        cfg.output_dir,
        cfg.selection,
        round_index,
        after,
        min(size, need),
        cfg.selection_pool,
        labeled,
        fetch,
        arm_of,
        num_classes,
        cfg.seed,
        reuse=cfg.selection_reuse,
        random_share=cfg.selection_random,
        warm_start=cfg.selection_warm_start,
    )
    if round_index and "scout_agreement" in selection["rounds"][round_index - 1]:
        logging.info(
            "steal: round %d's scout agreed with the target on %.1f%% of its choices",
            round_index - 1,
            100 * selection["rounds"][round_index - 1]["scout_agreement"],
        )
    r = selection["rounds"][round_index]
    if "scout" in r:
        how = f"scout {r['scout']['seconds']:.0f} s; predicted {r['predicted_histogram']}"
    else:
        how = "arms (reward bits, chosen) " + ", ".join(
            f"{arm} ({a['reward']:.2f}, {a['chosen']})" for arm, a in r["arms"].items()
        )
    logging.info(
        "steal: round %d: %d queries chosen from %d candidates (%d carried over) in %.0f s; "
        "labels so far %s; %s",
        round_index,
        len(r["chosen"]),
        r["pool"],
        r.get("carried", 0),
        r["seconds"],
        r["labels_before"],
        how,
    )
    return selection


def _record_npd_choices(producer: Producer, writer: FakeDatasetWriter) -> None:
    if producer.selection:
        writer.manifest["selection_record"] = producer.selection
    if producer.adaptation and "npd_adaptation" not in writer.manifest:
        writer.manifest["npd_adaptation"] = producer.adaptation
        arms = ", ".join(
            f"{a['background']}{'/inverted' if a['inverted'] else ''} {100 * a['weight']:.0f}%"
            for a in producer.adaptation["arms"]
        )
        answers = producer.adaptation["answers"]
        logging.info("steal: NPD preparation adapted after %d answers: %s", answers, arms)


def _stack(batch: NpdBatch):
    import numpy as np

    return np.stack(batch.images)


def _retries(writer: FakeDatasetWriter, dispatcher: Dispatcher) -> int:
    return writer.manifest["retries"] + dispatcher.stats.total("retries")


class _SkewCheck:
    """Warns once, after `after` answers, when the stolen labels are skewed."""

    def __init__(self, labels: LabelStats, after: int, advice: str):
        self.labels = labels
        self.after = after
        self.advice = advice
        self.done = labels.total >= after  # a resumed run was warned before

    def check(self, writer: FakeDatasetWriter) -> None:
        if self.done or self.labels.total < self.after:
            return
        self.done = True
        message = self.labels.warning(self.advice)
        writer.manifest["label_skew_warning"] = message
        if message:
            logging.warning("steal: %s", message)


def report_exhausted(cfg: StealConfig, reachable: int) -> None:
    logging.warning(
        "steal: the NPD stream %s ends before the budget: only %d of the %d queries can be "
        "spent. To reach the budget, give more NPD items: --npd_cycle (a folder starts over "
        "with new random crops), more --crops_per_image, a larger folder, or a mix: with "
        "another source",
        cfg.npd,
        reachable,
        cfg.query_budget,
    )


def format_summary(manifest: dict, output_dir: str) -> str:
    """The lines a user wants after steal."""
    hist = manifest["label_histogram"]
    seconds = manifest["steal_seconds"]
    rate = manifest["queries_spent"] / seconds if seconds else 0.0
    counted = LabelStats(len(hist))
    counted.add_counts(hist)
    stats = counted.summary()
    lines = [
        f"steal {manifest['status']}: {manifest['records']} records in "
        f"{len(manifest['shards'])} shard(s), {manifest['queries_spent']}/"
        f"{manifest['query_budget']} queries spent",
        f"  requests {manifest['requests']}, retries {manifest['retries']}, "
        f"skipped NPD items {manifest['skipped']['count']}, {rate:.0f} images/s",
        f"  stolen labels per class {hist} (top class {stats['top_class']} at "
        f"{100 * stats['top_share']:.0f}%, label entropy {stats['entropy_bits']:.2f} of "
        f"{stats['max_entropy_bits']:.2f} bits)",
    ]
    if manifest["status"] == "exhausted":
        lines.append(
            f"  the NPD stream ended before the budget: {manifest['queries_spent']} of "
            f"{manifest['query_budget']} queries spent; give more NPD items to reach it"
        )
    lines += [
        f"  fake dataset  {output_dir}  ({fd.MANIFEST})",
        f"  TensorBoard   tensorboard --logdir {os.path.join(output_dir, TENSORBOARD_DIR)}",
    ]
    return "\n".join(lines)
