"""The invariance probe: is the target's answer unchanged by a horizontal mirror?

Flipping stolen images horizontally while training teaches a garment classifier's copycat
nothing wrong (a garment mirrored is the same garment) but would teach a digit or text
classifier's copycat wrong labels. The attacker does not know which kind of target it
faces; this probe asks the target, inside the query budget. (Against the Fashion-MNIST
target the flips the probe allows did not gain consistently: see the study's copycat part.)

With `probe` = N > 0 the NPD stream's positions N..2N-1 are the mirror images of positions
0..N-1, and positions 2N..3N-1 the same images shifted right by one pixel (a control: the
smallest change an image can undergo). Every probe answer is a stolen label like any other
(the images are training data too). A target is taken as mirror-invariant when the mirror
changes its answer no more often than the one-pixel shift does, within the pairs' sampling
noise: with m answers changed by the mirror and s by the shift among the same originals,
m <= s + 2 sqrt(m + s) (about two standard deviations of m - s). `train_copycat
--augment=auto` then trains with flips; otherwise with none.

Probe positions are never reordered by a query selection (steal shrinks the probe to fit
inside the selection's exploration), so query index and stream position coincide for them.
"""

from __future__ import annotations

import math

import numpy as np

MIRROR = "mirror"
SHIFT = "shift1"
# Fewer complete pairs than this decide nothing (augment=auto trains without flips).
MIN_PAIRS = 64


def kind_of(position: int, probe: int) -> tuple[str, int] | None:
    """(MIRROR or SHIFT, the original's position) of a probe copy; None for any other
    position."""
    if probe <= 0 or not probe <= position < 3 * probe:
        return None
    return (MIRROR if position < 2 * probe else SHIFT), position % probe


def transform(image: np.ndarray, kind: str) -> np.ndarray:
    """The probe copy of an [H, W, C] image: mirrored left-right, or shifted right by one
    pixel (the first column repeated)."""
    if kind == MIRROR:
        return np.ascontiguousarray(image[:, ::-1])
    if kind == SHIFT:
        return np.ascontiguousarray(np.concatenate([image[:, :1], image[:, :-1]], axis=1))
    raise ValueError(f"unknown probe kind {kind!r}")


def analyse(query_indices: np.ndarray, labels: np.ndarray, probe: int) -> dict:
    """What the probe's answers say: pairs answered, answers changed by the mirror and by
    the shift, and whether the target counts as mirror-invariant ("flip").

    Args:
      query_indices, labels: every record of a fake dataset (its stolen top-1 labels).
      probe: the dataset's probe size N (0: none).
    """
    result = {"probe": int(probe), "pairs": 0, "mirror_changed": 0, "shift_changed": 0}
    if probe <= 0:
        return {**result, "flip": False, "reason": "the fake dataset has no invariance probe"}
    label_of = {int(k): int(v) for k, v in zip(query_indices, labels, strict=True) if k < 3 * probe}
    pairs = [j for j in range(probe) if all(j + d in label_of for d in (0, probe, 2 * probe))]
    m = sum(label_of[j + probe] != label_of[j] for j in pairs)
    s = sum(label_of[j + 2 * probe] != label_of[j] for j in pairs)
    result.update(pairs=len(pairs), mirror_changed=int(m), shift_changed=int(s))
    if len(pairs) < MIN_PAIRS:
        reason = f"{len(pairs)} complete probe pairs answered, fewer than {MIN_PAIRS}"
        return {**result, "flip": False, "reason": reason}
    flip = m <= s + 2 * math.sqrt(m + s)
    reason = (
        f"of {len(pairs)} images, a mirror changed the target's answer for {m}, a one-pixel "
        f"shift for {s}: {'as' if flip else 'less'} invariant to mirrors "
        f"{'as' if flip else 'than'} to shifts"
    )
    return {**result, "flip": bool(flip), "reason": reason}


def describe_choice(stage: dict) -> str:
    """How a copycat stage's augmentation was chosen (train_copycat's stage record)."""
    probe = stage.get("invariance_probe")
    if probe is None:
        return f"--augment={stage.get('augment', 'none')}"
    return f"--augment=auto -> {stage['augment']}: {probe['reason']}"
