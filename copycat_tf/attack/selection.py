"""Query selection: which NPD items are worth sending (`steal --selection`).

`random` sends the stream in order. The other strategies choose, in rounds: once the
first `after` positions (the exploration) are answered, a small *scout* copycat is trained
on every label stolen so far, scores a pool of unsent candidate items (candidates cost
nothing: only chosen ones are sent) and a round of candidates is chosen; those are sent,
and the next round starts from all the labels again, until the budget is spent.

  class_balance  candidates most likely answered with the classes stolen least so far
                 (greedy, each choice's predicted class counted): the answer to the label
                 skew of NPD queries, where most pictures get one or two classes.
  entropy        the scout's most uncertain candidates (highest predictive entropy).
  margin         smallest gap between the scout's two best classes.
  kcenter        greedy core-set on the scout's penultimate features: candidates far from
                 everything stolen or chosen so far (diversity).

Query k of a round sends the candidate position the round chose for it. Every round's
choice is written to the fake dataset (SELECTION_FILE, atomically) before any of it is
sent, and read back on resume: a resumed run sends exactly what the first one chose. A
kill before a round is written trains its scout again on resume (nothing of it was sent).
Memory is bounded by the pool's scores (pool x classes floats; x feature size for
kcenter); candidate images are scored a chunk at a time and not kept.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np

from copycat_tf.errors import UserInputError
from copycat_tf.workdir import atomic_write_json

SELECTIONS = ("random", "class_balance", "entropy", "margin", "kcenter")
SELECTION_FILE = "selection.json"
SCORE_CHUNK = 2048
# Candidates scored per query chosen: a larger pool holds more of the rare classes.
POOL_PER_QUERY = 10
SCOUT_EPOCHS = 10
SCOUT_MIN_STEPS = 300  # a small exploration is seen for more epochs
SCOUT_MAX_STEPS = 1500  # the scout's time per round stays bounded as labels accumulate
SCOUT_BATCH = 64
# Labels a scout trains on at most (rare classes kept whole): bounds its time and the
# images recomputed for it each round.
SCOUT_MAX_EXAMPLES = 10_000
# Pseudo-count added to every class when rating how rare a class still is.
RARITY_SMOOTHING = 10.0
# Greedy choice in this many steps, the predicted class counts updated after each.
GREEDY_STEPS = 50


def check_selection(selection: str, num_shards: int) -> None:
    """Raises UserInputError for an unknown strategy or one this run cannot use."""
    if selection not in SELECTIONS:
        raise UserInputError(f"--selection={selection}; expected one of {', '.join(SELECTIONS)}")
    if selection != "random" and num_shards != 1:
        raise UserInputError(
            f"--selection={selection} chooses from one worker's candidates; run it with "
            "--num_shards=1 (or use --selection=random to split the stream across workers)"
        )


def pool_size(need: int, max_pool: int) -> int:
    """Candidates scored for `need` choices: POOL_PER_QUERY per choice, at most max_pool,
    at least the choices themselves."""
    return max(need, min(POOL_PER_QUERY * need, max_pool))


def round_size(budget: int, after: int, requested: int) -> int:
    """Queries per round: `requested`, or (0) an eighth of the budget, at least `after`."""
    if requested:
        return requested
    return max(after, -(-budget // 8))


def scout_subset(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Indices of at most `limit` labels, classes filled from the rarest up with an equal
    share of what is left each (a rare class is kept whole), drawn at random within a
    class; ascending."""
    if len(labels) <= limit:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    kept, left = [], limit
    for n, (c, count) in enumerate(sorted(zip(classes, counts, strict=True), key=lambda t: t[1])):
        take = min(int(count), left // (len(classes) - n))
        members = np.flatnonzero(labels == c)
        kept.append(rng.choice(members, size=take, replace=False))
        left -= take
    return np.sort(np.concatenate(kept))


def choose_balanced(probs: np.ndarray, counts: np.ndarray, need: int) -> np.ndarray:
    """Greedy class-balanced choice of `need` rows of `probs` (candidates x classes).

    Each step takes the candidates of highest expected rarity sum_c p_c / (n_c + s), then
    adds their predicted probabilities to the counts n. Deterministic (stable ties).

    Returns:
      the chosen row indices, ascending.
    """
    need = min(int(need), len(probs))
    counts = np.asarray(counts, np.float64).copy()
    taken = np.zeros(len(probs), bool)
    step = max(1, -(-need // GREEDY_STEPS))
    chosen = 0
    while chosen < need:
        score = probs @ (1.0 / (counts + RARITY_SMOOTHING))
        score[taken] = -np.inf
        k = min(step, need - chosen)
        top = np.argsort(-score, kind="stable")[:k]
        taken[top] = True
        counts += probs[top].sum(axis=0)
        chosen += k
    return np.flatnonzero(taken)


def _train_scout(images: np.ndarray, labels: np.ndarray, num_classes: int, seed: int):
    """plain_cnn fitted on the labels so far (a balanced subset of them, see
    scout_subset), without class weights: its probabilities stay close to the target's
    answer rates, which the greedy class-balanced choice counts with."""
    import keras

    from copycat_tf.models.registry import plain_cnn

    keras.utils.set_random_seed(seed)
    model = plain_cnn(images.shape[1:], num_classes)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    _fit(model, images, labels)
    return model


def scout_steps(examples: int) -> int:
    """Training steps of a scout on `examples` labels: SCOUT_EPOCHS epochs, within
    [SCOUT_MIN_STEPS, SCOUT_MAX_STEPS]."""
    per_epoch = -(-examples // SCOUT_BATCH)
    return min(max(SCOUT_EPOCHS * per_epoch, SCOUT_MIN_STEPS), SCOUT_MAX_STEPS)


def _fit(model, images, labels) -> None:
    import tensorflow as tf

    data = (
        tf.data.Dataset.from_tensor_slices((images.astype(np.float32), labels))
        .shuffle(len(labels), seed=0)
        .repeat()
        .batch(SCOUT_BATCH)
    )
    model.fit(data, epochs=1, steps_per_epoch=scout_steps(len(labels)), verbose=0, shuffle=False)


def _scores(model, images: np.ndarray, features: bool):
    """(class probabilities, penultimate features or None) of a batch of images."""
    import keras

    if features:
        head = keras.Model(model.inputs, [model.layers[-2].output, model.output])
        feats, logits = head.predict(images.astype(np.float32), batch_size=512, verbose=0)
    else:
        feats, logits = None, model.predict(images.astype(np.float32), batch_size=512, verbose=0)
    logits = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    probs = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    return probs, None if feats is None else feats.astype(np.float32)


def choose_uncertain(probs: np.ndarray, need: int, kind: str) -> np.ndarray:
    """The `need` rows of highest entropy ("entropy") or smallest top-2 margin
    ("margin"), ascending; ties broken by row (stable)."""
    if kind == "entropy":
        p = np.clip(probs, 1e-12, 1.0)
        score = -(p * np.log(p)).sum(axis=1)
    else:
        top2 = np.sort(probs, axis=1)[:, -2:]
        score = -(top2[:, 1] - top2[:, 0])
    return np.sort(np.argsort(-score, kind="stable")[: min(need, len(probs))])


def choose_kcenter(candidates: np.ndarray, centres: np.ndarray, need: int) -> np.ndarray:
    """Greedy k-center: repeatedly the candidate farthest from its nearest centre (the
    labelled points, then the chosen ones); ascending row indices."""
    need = min(need, len(candidates))
    nearest = np.full(len(candidates), np.inf, np.float32)
    for i in range(0, len(centres), 1024):
        block = centres[i : i + 1024]
        d = (candidates**2).sum(1)[:, None] - 2 * candidates @ block.T + (block**2).sum(1)[None, :]
        nearest = np.minimum(nearest, d.min(axis=1))
    chosen = []
    for _ in range(need):
        j = int(np.argmax(nearest))
        chosen.append(j)
        d = ((candidates - candidates[j]) ** 2).sum(axis=1)
        nearest = np.minimum(nearest, d)
        nearest[j] = -np.inf
    return np.sort(np.array(chosen, np.int64))


def load_selection(directory: str) -> dict | None:
    """The recorded choice of a fake dataset, None when there is none yet."""
    import json

    path = os.path.join(directory, SELECTION_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def select(
    directory: str,
    strategy: str,
    round_index: int,
    after: int,
    need: int,
    max_pool: int,
    labeled: dict[int, int],
    items: Callable[[list[int]], list],
    candidate_items: Callable[[list[int]], list],
    num_classes: int,
    seed: int,
) -> dict:
    """Chooses round `round_index` (queries after..after+need-1), or reads it when it was
    chosen before; writes it to the fake dataset before returning.

    Args:
      directory: the fake dataset (where SELECTION_FILE is kept).
      strategy: one of SELECTIONS other than "random".
      round_index: 0 for the first round (`after` is then the exploration's end).
      after: the round's first query index.
      need: queries this round chooses.
      max_pool: candidates scored at most.
      labeled: {query index: stolen label} of every answer before `after`.
      items: query indices -> the NpdItems they sent.
      candidate_items: stream positions -> NpdItems (None past the stream's end).
      num_classes: the label space.
      seed: the scout's initialisation.

    Returns:
      the whole selection ({"strategy", "rounds": [...]}); each round holds "after",
      "chosen" (stream positions in query order), "pool_start"/"pool_end" (the candidate
      positions it scored) and statistics.
    """
    selection = load_selection(directory) or {"strategy": strategy, "rounds": []}
    rounds = selection["rounds"]
    if round_index < len(rounds):
        return selection
    start = time.monotonic()
    queries = np.array(sorted(labeled), np.int64)
    every = np.array([labeled[k] for k in queries], np.int64)
    counts = np.bincount(every, minlength=num_classes)
    queries = queries[scout_subset(every, SCOUT_MAX_EXAMPLES, seed + round_index)].tolist()
    answered = items(queries)
    keep = [i for i, item in enumerate(answered) if item is not None and item.image is not None]
    if not keep:
        raise UserInputError(
            f"--selection={strategy}: none of the {len(queries)} answered queries before "
            f"query {after} has a readable NPD image to train the scout on; check --npd (its "
            "skipped items are listed in the manifest) or use --selection=random"
        )
    images = np.stack([answered[i].image for i in keep])
    labels = np.array([labeled[queries[i]] for i in keep], np.int64)
    scout = _train_scout(images, labels, num_classes, seed + round_index)
    trained = time.monotonic()

    features = strategy == "kcenter"
    pool_start = rounds[-1]["pool_end"] if rounds else after
    size = pool_size(need, max_pool)
    probs, feats, candidates, end = [], [], [], pool_start
    while len(candidates) < size:
        chunk = list(range(end, end + min(SCORE_CHUNK, size - len(candidates))))
        got = candidate_items(chunk)
        ok = [(k, it) for k, it in zip(chunk, got, strict=True) if it and it.image is not None]
        if ok:
            candidates.extend(k for k, _ in ok)
            p, f = _scores(scout, np.stack([it.image for _, it in ok]), features)
            probs.append(p)
            feats.append(f)
        end = chunk[-1] + 1
        if any(it is None for it in got):  # the stream ends inside the pool
            break
    probs = np.concatenate(probs) if probs else np.zeros((0, num_classes), np.float32)
    if strategy == "class_balance":
        rows = choose_balanced(probs, counts, need)
    elif strategy in ("entropy", "margin"):
        rows = choose_uncertain(probs, need, strategy)
    else:
        centres = _scores(scout, images, True)[1]
        rows = choose_kcenter(np.concatenate(feats), centres, need) if feats else []
    guesses = probs[rows].argmax(axis=1)
    predicted = np.bincount(guesses, minlength=num_classes)
    if rounds:  # the scout of the last round, judged on what it chose (never trained on)
        last = rounds[-1]
        answers = [labeled.get(last["after"] + j) for j in range(len(last["guesses"]))]
        pairs = [(g, a) for g, a in zip(last["guesses"], answers, strict=True) if a is not None]
        if pairs:
            last["scout_agreement"] = round(float(np.mean([g == a for g, a in pairs])), 4)
    rounds.append(
        {
            "after": after,
            "chosen": [int(candidates[r]) for r in rows],
            "pool": len(candidates),
            "pool_start": int(pool_start),
            "pool_end": int(end),
            "scout": {
                "model": "plain_cnn",
                "steps": scout_steps(len(labels)),
                "trained_on": len(labels),
                "seconds": round(trained - start, 1),
            },
            "labels_before": counts.tolist(),
            "predicted_histogram": predicted.tolist(),
            "guesses": guesses.tolist(),  # the scout's label for each choice
            "seconds": round(time.monotonic() - start, 1),
        }
    )
    atomic_write_json(os.path.join(directory, SELECTION_FILE), selection)
    return selection


def position(selection: dict, k: int) -> int:
    """The stream position query k sends (k at or past the first round): the choice of
    the round it falls in; past the last round's choices, the positions after its pool."""
    rounds = selection["rounds"]
    for r in rounds:
        j = k - r["after"]
        if 0 <= j < len(r["chosen"]):
            return r["chosen"][j]
    last = rounds[-1]
    return last["pool_end"] + (k - last["after"] - len(last["chosen"]))
