"""What a running steal shows: the progress line, label-skew diagnostics, TensorBoard.

The stolen-label histogram is the attacker's only early signal: when the target answers
one class for most NPD images, the copycat will learn little, whatever its training.
"""

from __future__ import annotations

import datetime
import math
import os
import sys
import time

import numpy as np

TENSORBOARD_DIR = "tensorboard"
# Skew thresholds: one class above half of the answers, or a class never answered.
TOP_SHARE_WARNING = 0.5


def skew_advice(npd: str, preparation, selection: str) -> str:
    """What helps against skewed labels, naming only the knobs this steal does not use yet.

    Args:
      npd: the NPD spec.
      preparation: its data.preparation.Preparation (None: pictures are not prepared).
      selection: the query selection (attack.selection.SELECTIONS).
    """
    helps = []
    if preparation is not None and not preparation.legacy:
        knobs = []
        if len(preparation.backgrounds) < 5:
            knobs.append("--npd_background=random")
        if not preparation.invert:
            knobs.append("--npd_invert=0.5")
        if not preparation.jitter:
            knobs.append("--npd_jitter=0.3")
        elif preparation.jitter_on == "canvas":
            knobs.append("--npd_jitter_on=picture (backgrounds stay what the arms say)")
        if preparation.crop_area[0] > 0.05:
            knobs.append("smaller --npd_crop_area (e.g. 0.02,1.0)")
        if not preparation.adapt_after and len(preparation.arms) > 1:
            knobs.append("--npd_adapt_after=2048 (favour the arms answered most variously)")
        if knobs:
            helps.append(
                "NPD preparation that varies what the target sees (" + ", ".join(knobs) + ")"
            )
    elif preparation is not None:  # legacy: a dataset made before preparation existed
        helps.append(
            "a new steal with the NPD preparation (--npd_background=random, --npd_invert=0.5)"
        )
    if not npd.startswith("mix:"):
        helps.append("other NPD sources (--npd=mix:...)")
    if selection == "random":
        helps.append("query selection (--selection=class_balance or entropy)")
    elif selection != "class_balance":
        helps.append("--selection=class_balance (it favours the classes answered least)")
    else:
        helps.append("a larger --selection_pool")
    return "; ".join(helps) + "; class balancing at training time only partly makes up for it"


class LabelStats:
    """Histogram of the labels answered so far, and what it says about skew."""

    def __init__(self, num_classes: int, labels=()):
        self.counts = np.zeros(num_classes, np.int64)
        self.add(labels)

    def add(self, labels) -> None:
        labels = np.asarray(labels, np.int64)
        if labels.size:
            if labels.max() >= len(self.counts):
                self.counts = np.pad(self.counts, (0, int(labels.max()) + 1 - len(self.counts)))
            self.counts += np.bincount(labels, minlength=len(self.counts))

    def add_counts(self, counts) -> None:
        """Adds a histogram (e.g. the committed labels of a resumed dataset)."""
        counts = np.asarray(counts, np.int64)
        if len(counts) > len(self.counts):
            self.counts = np.pad(self.counts, (0, len(counts) - len(self.counts)))
        self.counts[: len(counts)] += counts

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def summary(self) -> dict:
        """Top class, its share, label entropy (bits, and its maximum), classes never seen."""
        total = max(self.total, 1)
        p = self.counts / total
        nz = p[p > 0]
        return {
            "answers": self.total,
            "top_class": int(self.counts.argmax()),
            "top_share": round(float(p.max()), 4),
            "entropy_bits": round(max(0.0, float(-(nz * np.log2(nz)).sum())), 4),
            "max_entropy_bits": round(math.log2(max(len(self.counts), 1)), 4),
            "empty_classes": [int(c) for c in np.flatnonzero(self.counts == 0)],
        }

    def warning(self, advice: str) -> str | None:
        """A one-line warning when the answers are skewed (see module docstring), ending with
        `advice` (skew_advice)."""
        s = self.summary()
        problems = []
        if s["top_share"] > TOP_SHARE_WARNING:
            problems.append(f"class {s['top_class']} holds {100 * s['top_share']:.0f}% of them")
        if s["empty_classes"]:
            problems.append(f"classes {s['empty_classes']} were never answered")
        if not problems:
            return None
        return (
            f"stolen labels are skewed after {s['answers']} queries: {'; '.join(problems)} "
            f"(label entropy {s['entropy_bits']:.2f} of {s['max_entropy_bits']:.2f} bits). "
            f"What helps: {advice}"
        )


class StealMonitor:
    """The progress line on stderr and TensorBoard summaries under <output_dir>/tensorboard.

    Args:
      output_dir: the fake dataset directory.
      budget: the query budget.
      spent: queries spent before this run.
      labels: the answers so far (LabelStats, updated by the caller).
      show_line: draw the progress line.
      summary_every: queries between TensorBoard summaries.
    """

    def __init__(
        self,
        output_dir: str,
        budget: int,
        spent: int,
        labels: LabelStats,
        show_line: bool,
        summary_every: int,
    ):
        self.output_dir = output_dir
        self.budget, self.spent0 = budget, spent
        self.labels = labels
        self.show_line = show_line
        self.tty = sys.stderr.isatty()
        self.summary_every = max(1, summary_every)
        self.start = self._last_line = time.monotonic()
        self.sent = 0
        self._next_summary = spent + self.summary_every
        self._writer = None
        self._samples_written = False
        self.round_text = ""  # the query selection's current round, on the progress line

    def selection_round(self, index: int, strategy: str, record: dict, previous: dict | None):
        """A query selection's round began: the line names it; TensorBoard gets its pool,
        times, predicted labels (a scout's) or arm rewards and shares (the bandit's), and
        the previous round scout's agreement with the target."""
        import tensorflow as tf

        self.round_text = f" | round {index} ({strategy})"
        step = record["after"]
        with self._summary_writer().as_default():
            tf.summary.scalar("selection/round", index, step=step)
            tf.summary.scalar("selection/pool", record["pool"], step=step)
            tf.summary.scalar("selection/seconds", record["seconds"], step=step)
            if "scout" in record:
                tf.summary.scalar("selection/scout_seconds", record["scout"]["seconds"], step=step)
                predicted = np.asarray(record["predicted_histogram"])
                tf.summary.histogram(
                    "selection/predicted_labels",
                    np.repeat(np.arange(len(predicted)), predicted),
                    step=step,
                    buckets=max(len(predicted), 1),
                )
            for arm, a in record.get("arms", {}).items():  # the adaptive bandit
                tag = arm.replace(" ", "_")  # a valid summary name
                tf.summary.scalar(f"selection/arm_reward/{tag}", a["reward"], step=step)
                tf.summary.scalar(f"selection/arm_chosen/{tag}", a["chosen"], step=step)
            if previous is not None and "scout_agreement" in previous:
                tf.summary.scalar(
                    "selection/scout_agreement", previous["scout_agreement"], step=step
                )
        self._writer.flush()

    def answered(self, n: int, retries: int, images=None, labels=None) -> None:
        """Called after each answered batch (images/labels: a sample for TensorBoard)."""
        self.sent += n
        now = time.monotonic()
        if not self._samples_written and images is not None and len(images):
            self._samples(images, labels)
        if self.spent0 + self.sent >= self._next_summary:
            self._next_summary = self.spent0 + self.sent + self.summary_every
            self.summaries(retries)
        if self.show_line and now - self._last_line >= (0.25 if self.tty else 10.0):
            self._last_line = now
            self._line(now, retries)

    def _line(self, now: float, retries: int) -> None:
        rate = self.sent / max(now - self.start, 1e-6)
        todo = self.budget - self.spent0 - self.sent
        eta = todo / rate if rate > 0 else float("inf")
        eta_text = str(datetime.timedelta(seconds=int(eta))) if math.isfinite(eta) else "?"
        spent = self.spent0 + self.sent
        s = self.labels.summary()
        line = (
            f"steal {spent}/{self.budget} queries ({100 * spent / self.budget:.0f}%) "
            f"{rate:.0f} img/s ETA {eta_text} retries {retries} | top class {s['top_class']} "
            f"{100 * s['top_share']:.0f}%, label entropy {s['entropy_bits']:.2f}/"
            f"{s['max_entropy_bits']:.2f} bits{self.round_text}"
        )
        sys.stderr.write(("\r" + line + "\033[K") if self.tty else line + "\n")
        sys.stderr.flush()

    def _summary_writer(self):
        import tensorflow as tf

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(
                os.path.join(self.output_dir, TENSORBOARD_DIR, "steal")
            )
        return self._writer

    def summaries(self, retries: int) -> None:
        """Queries spent, images/s, retries and the label histogram, at the current step."""
        import tensorflow as tf

        step = self.spent0 + self.sent
        elapsed = max(time.monotonic() - self.start, 1e-6)
        s = self.labels.summary()
        counts = self.labels.counts
        with self._summary_writer().as_default():
            tf.summary.scalar("steal/queries_spent", step, step=step)
            tf.summary.scalar("steal/images_per_second", self.sent / elapsed, step=step)
            tf.summary.scalar("steal/retries", retries, step=step)
            tf.summary.scalar("steal/top_class_share", s["top_share"], step=step)
            tf.summary.scalar("steal/label_entropy_bits", s["entropy_bits"], step=step)
            tf.summary.histogram(
                "steal/stolen_labels",
                np.repeat(np.arange(len(counts)), counts),
                step=step,
                buckets=max(len(counts), 1),
            )
        self._writer.flush()

    def _samples(self, images, labels) -> None:
        import tensorflow as tf

        from copycat_tf import viz

        grid = viz.image_grid(np.stack(images[:32]), [f"label {y}" for y in labels[:32]])
        with self._summary_writer().as_default():
            tf.summary.image("steal/npd_samples", grid[None], step=self.spent0 + self.sent)
        self._samples_written = True

    def close(self, retries: int) -> None:
        if self.sent:
            self.summaries(retries)
        if self._writer is not None:
            self._writer.close()
        if self.show_line and self.tty:
            sys.stderr.write("\n")
