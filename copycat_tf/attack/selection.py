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
  entropy_kcenter  the two combined as ActiveThief (Pal et al., AAAI 2020) does: k-center
                 among the SHORTLIST x round most uncertain candidates (informative and
                 diverse: uncertainty alone picks near-duplicates along one boundary).
  dfal           the candidates closest to the scout's decision boundary, as ActiveThief's
                 DeepFool-based active learning (DFAL) ranks them, by the length of one
                 DeepFool step towards the scout's runner-up class: |z_1 - z_2| /
                 ||grad_x (z_1 - z_2)|| (logits z, in pixels): the smallest perturbation
                 that would make the scout change its answer, to first order. One gradient
                 per candidate (DeepFool iterates over every class; ActiveThief queries
                 the candidate, not its perturbation, and so does this).
  adaptive       no scout: a bandit over the NPD's arms (each part of a `mix:` spec and,
                 for prepared pictures, each background/polarity of the preparation),
                 each arm rewarded by how rare the labels its answers got are (mean
                 self-information in bits under the label frequencies so far, so the
                 reward of an arm falls as its classes fill up); the round's queries are
                 shared out by upper confidence bound (UCB1), the earliest candidates of
                 each arm first.

The candidate pool of a round is stream positions never scored before, and every round's
scout is trained from scratch. With `reuse` (steal --selection_reuse), a round's pool
starts with the newest unchosen candidates of the round before (up to the pool size less
the round's queries; this round's scout scores them again, as in a fixed-pool active
learner) and its scout starts from the round before's (warm start: WARM_EPOCHS epochs
instead of SCOUT_EPOCHS; the weights are kept in the fake dataset until the next round is
written): rounds after the first cost far less (benchmarks/README.md), but fewer distinct
candidates are scored in all. With `warm_start` alone (steal --selection_warm_start), every
round scores a fresh pool as without reuse, and only its scout starts from the round
before's: the scout's share of a round shrinks, the candidates stay fresh. Query k of a
round sends the candidate position the round chose for it. Every round's choice is
written to the fake dataset (SELECTION_FILE, atomically) before any of it is sent, and
read back on resume: a resumed run sends exactly what the first one chose. A kill before
a round is written trains its scout again on resume (nothing of it was sent).

Memory: the pool's scores (pool x classes floats; x 128 features for kcenter) and the
images of answered queries (and, with reuse, of unchosen candidates), kept between rounds
in an `ImageCache` of at most CACHE_BYTES (28x28 grey: ~1.2 million images; 224x224x3:
~7,000, past which images are computed again from their positions: slower, never
different); and the decoded pictures of a folder or TFDS source, kept for the steal's
life up to PICTURE_BYTES (NpdStream.keep_pictures: the first ones decoded; openclipart
at 28x28 is ~0.86 GB, all of it), since every round's pool crops the same pictures again:
in each of steal's worker processes for folder: and synthetic: sources (--npd_workers,
2 by default: so twice), in the steal's own process for tfds: ones.

Time: a round's pool is asked for while its scout trains (PoolAhead) and made by worker
processes (data.npd_processes; threads for a stream read in order), and the scout trains
EXECUTION_STEPS steps per call into TensorFlow, so the two share the cores instead of
queueing for Python (benchmarks/selection_overhead.py).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import numpy as np

from copycat_tf.errors import UserInputError
from copycat_tf.workdir import atomic_write_json

SELECTIONS = (
    "random",
    "class_balance",
    "entropy",
    "margin",
    "kcenter",
    "entropy_kcenter",
    "dfal",
    "adaptive",
)
# Strategies that train a scout copycat each round.
SCOUTED = ("class_balance", "entropy", "margin", "kcenter", "entropy_kcenter", "dfal")
# Strategies that need the scout's penultimate features of every candidate.
FEATURED = ("kcenter", "entropy_kcenter")
# Strategies that need the scout's input gradient at every candidate.
GRADIENT = ("dfal",)
# entropy_kcenter: k-center among this many times the round's queries, the most uncertain.
SHORTLIST = 4
SELECTION_FILE = "selection.json"
SCORE_CHUNK = 2048
SCORE_BATCH = 512  # candidates per call of the scout when scoring
# Candidates scored per query chosen: a larger pool holds more of the rare classes.
POOL_PER_QUERY = 10
SCOUT_EPOCHS = 10
SCOUT_MIN_STEPS = 300  # a small exploration is seen for more epochs
SCOUT_MAX_STEPS = 1500  # the scout's time per round stays bounded as labels accumulate
# Later rounds start from the round before's scout (warm start): fewer epochs, fewer steps.
WARM_EPOCHS = 3
WARM_MAX_STEPS = 500
SCOUT_BATCH = 64
EXECUTION_STEPS = 50  # scout training steps per call into TensorFlow, at most
# Each round's scout weights, kept in the fake dataset (the last round's only) so a resumed
# run warm-starts the next round from exactly what an uninterrupted run had.
SCOUT_WEIGHTS = "scout-{round}.weights.h5"
# Labels a scout trains on at most (rare classes kept whole): bounds its time and the
# images recomputed for it each round.
SCOUT_MAX_EXAMPLES = 10_000
# Pseudo-count added to every class when rating how rare a class still is.
RARITY_SMOOTHING = 10.0
# Greedy choice in this many steps, the predicted class counts updated after each.
GREEDY_STEPS = 50
# Images kept between rounds (candidates and answered queries), in bytes.
CACHE_BYTES = 1 << 30
# Decoded NPD pictures kept for the steal's life (NpdStream.keep_pictures), in bytes: every
# round's pool crops the same folder again (openclipart at 28x28: ~0.86 GB, all of it).
PICTURE_BYTES = 1 << 30
# UCB1 exploration weight of the adaptive bandit, in bits of reward.
UCB_WEIGHT = 1.0


class ImageCache:
    """Items of stream positions, kept up to `limit` bytes of pixels (then not added: a
    miss is computed again, which costs time only)."""

    def __init__(self, limit: int = CACHE_BYTES):
        self.limit = limit
        self.nbytes = 0
        self._items: dict[int, object] = {}
        self._lock = threading.Lock()

    def get(self, positions: list[int], compute: Callable[[list[int]], list]) -> list:
        """The items of `positions`, computing (and keeping) the missing ones."""
        with self._lock:
            found = {p: self._items[p] for p in positions if p in self._items}
        missing = [p for p in positions if p not in found]
        if missing:
            for p, item in zip(missing, compute(missing), strict=True):
                found[p] = item
                self.put(p, item)
        return [found[p] for p in positions]

    def drop(self, positions) -> None:
        """Forgets the items of positions no round will score or send again."""
        with self._lock:
            for p in positions:
                item = self._items.pop(p, None)
                if item is not None:
                    self.nbytes -= 64 + (0 if item.image is None else item.image.nbytes)

    def put(self, position: int, item) -> None:
        size = 64 + (0 if item is None or item.image is None else item.image.nbytes)
        with self._lock:
            if position not in self._items and self.nbytes + size <= self.limit:
                self._items[position] = item
                self.nbytes += size


class PoolAhead:
    """Makes the items of a round's pool from a thread of its own while the round's scout
    trains (they do not depend on it; steal's worker processes, or threads, work next to
    TensorFlow's): the scoring then finds them in the cache. Only while nothing else
    fetches, so streams that are not thread-safe are safe too. Same items, only sooner: a
    failure here is left for the scoring, which makes the item again and meets it itself."""

    def __init__(self, fetch: Callable[[list[int]], list], positions: list[int]):
        self._fetch = fetch
        self._positions = positions
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pool-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for i in range(0, len(self._positions), SCORE_CHUNK):
            if self._stop.is_set():
                return
            try:
                got = self._fetch(self._positions[i : i + SCORE_CHUNK])
            except Exception:  # met again, and reported, by the scoring
                return
            if any(item is None for item in got):  # the stream ends inside the pool
                return

    def wait(self) -> None:
        """Stops making items (after the chunk in hand) and waits for the thread: once
        the scout is trained, the scoring makes what is left itself."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def check_selection(
    selection: str,
    num_shards: int,
    round_queries: int = 0,
    max_pool: int = 0,
    random_share: float = 0.0,
) -> None:
    """Raises UserInputError for an unknown strategy, one this run cannot use, or round
    sizes that do not fit together (0: not checked). A random share means nothing to
    random order (see random_share)."""
    if selection not in SELECTIONS:
        raise UserInputError(f"--selection={selection}; expected one of {', '.join(SELECTIONS)}")
    if not 0.0 <= random_share <= 1.0:
        raise UserInputError(f"--selection_random={random_share}; expected a share in [0, 1]")
    if selection == "random":
        return
    if num_shards != 1:
        raise UserInputError(
            f"--selection={selection} chooses from one worker's candidates; run it with "
            "--num_shards=1 (or use --selection=random to split the stream across workers)"
        )
    if max_pool and round_queries > max_pool:
        raise UserInputError(
            f"--selection_round={round_queries} cannot be chosen from --selection_pool="
            f"{max_pool} candidates; raise --selection_pool (10 per query is the default "
            "share) or lower --selection_round"
        )


def random_share(selection: str, share: float) -> float:
    """The share of each round drawn at random that a steal uses and records: random order
    has no rounds to share out (the recipe's default share is for its strategy)."""
    return 0.0 if selection == "random" else share


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


def _train_scout(
    images: np.ndarray, labels: np.ndarray, num_classes: int, seed: int, warm: str | None
):
    """plain_cnn fitted on the labels so far (a balanced subset of them, see
    scout_subset), without class weights: its probabilities stay close to the target's
    answer rates, which the greedy class-balanced choice counts with. `warm`: weights
    of the round before's scout to start from (then fewer steps), or None."""
    import keras

    from copycat_tf.models.registry import plain_cnn

    keras.utils.set_random_seed(seed)
    model = plain_cnn(images.shape[1:], num_classes)
    if warm is not None:
        model.load_weights(warm)
    steps = scout_steps(len(labels), warm is not None)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=steps_per_execution(steps),
    )
    _fit(model, images, labels, steps)
    return model


def steps_per_execution(steps: int) -> int:
    """Training steps per call into TensorFlow: the largest divisor of `steps` up to
    EXECUTION_STEPS (so exactly `steps` run: Keras rounds a last partial execution up).
    The same updates, far fewer trips through Python, which the round's pool, made on
    another thread meanwhile, holds (PoolAhead)."""
    return max(d for d in range(1, EXECUTION_STEPS + 1) if steps % d == 0)


def scout_steps(examples: int, warm: bool = False) -> int:
    """Training steps of a scout on `examples` labels: SCOUT_EPOCHS epochs within
    [SCOUT_MIN_STEPS, SCOUT_MAX_STEPS]; warm-started, WARM_EPOCHS within
    [1, WARM_MAX_STEPS]."""
    per_epoch = -(-examples // SCOUT_BATCH)
    if warm:
        return min(WARM_EPOCHS * per_epoch, WARM_MAX_STEPS)
    return min(max(SCOUT_EPOCHS * per_epoch, SCOUT_MIN_STEPS), SCOUT_MAX_STEPS)


def _fit(model, images, labels, steps: int) -> None:
    import tensorflow as tf

    data = (
        tf.data.Dataset.from_tensor_slices((images.astype(np.float32), labels))
        .shuffle(len(labels), seed=0)
        .repeat()
        .batch(SCOUT_BATCH)
    )
    model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)


def _with_features(model):
    """The scout answering (penultimate features, logits): built once per round."""
    import keras

    return keras.Model(model.inputs, [model.layers[-2].output, model.output])


def boundary_scorer(model):
    """scores(images) -> (logits, DeepFool step length towards the runner-up class) of a
    batch: one gradient per image (the scout has no layer mixing the batch at inference)."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def scores(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            logits = tf.cast(model(x, training=False), tf.float32)
            top2 = tf.math.top_k(logits, k=2).values
            gap = top2[:, 0] - top2[:, 1]
            total = tf.reduce_sum(gap)
        grad = tape.gradient(total, x)
        norm = tf.sqrt(tf.reduce_sum(tf.square(tf.reshape(grad, [tf.shape(x)[0], -1])), 1))
        return logits, gap / (norm + 1e-12)

    return scores


def boundary_distance(scores, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class probabilities, DeepFool step length in pixels towards the scout's runner-up
    class) of images, SCORE_BATCH at a time (see dfal in the module docstring); `scores`
    is the scout's boundary_scorer, made once per round (one trace of its graph)."""
    x = images.astype(np.float32)
    outs = [scores(x[i : i + SCORE_BATCH]) for i in range(0, len(x), SCORE_BATCH)]
    logits = np.concatenate([o[0].numpy() for o in outs])
    distance = np.concatenate([o[1].numpy() for o in outs]).astype(np.float32)
    return _softmax(logits), distance


def _softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def _scores(model, images: np.ndarray, features: bool):
    """(class probabilities, penultimate features or None) of a batch of images; `model`
    is the scout, or with `features` its _with_features model."""
    x = images.astype(np.float32)
    # predict_on_batch per 512: the same numbers as predict(batch_size=512), without its
    # per-call input pipeline (~2x candidates scored per second at 28x28).
    outs = [model.predict_on_batch(x[i : i + SCORE_BATCH]) for i in range(0, len(x), SCORE_BATCH)]
    if features:
        feats = np.concatenate([f for f, _ in outs])
        logits = np.concatenate([g for _, g in outs])
    else:
        feats, logits = None, np.concatenate(outs)
    return _softmax(logits), None if feats is None else feats.astype(np.float32)


def random_rows(size: int, count: int, seed: int, round_index: int) -> np.ndarray:
    """`count` of `size` pool rows drawn uniformly without replacement (ascending), the
    same for the same seed and round."""
    rng = np.random.default_rng([seed, round_index, 0x5E1EC7])
    return np.sort(rng.choice(size, min(count, size), replace=False)).astype(np.int64)


def choose_uncertain(probs: np.ndarray, need: int, kind: str) -> np.ndarray:
    """The `need` rows of highest entropy ("entropy") or smallest top-2 margin
    ("margin"), ascending; ties broken by row (stable)."""
    if kind == "entropy":
        p = np.clip(probs, 1e-12, 1.0)
        score = -(p * np.log(p)).sum(axis=1)
    else:
        top2 = np.sort(probs, axis=1)[:, -2:]
        score = -(top2[:, 1] - top2[:, 0])
    return choose_nearest(-score, need)


def choose_nearest(distance: np.ndarray, need: int) -> np.ndarray:
    """The `need` rows of smallest distance (dfal: to the scout's boundary), ascending;
    ties by row (stable)."""
    return np.sort(np.argsort(distance, kind="stable")[: min(need, len(distance))])


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


def choose_diverse(
    probs: np.ndarray, feats: list[np.ndarray], centres: np.ndarray, need: int, uncertain: bool
) -> np.ndarray:
    """kcenter rows of the pool (ascending); with `uncertain`, k-center among the
    SHORTLIST x need candidates of highest entropy only (entropy_kcenter)."""
    if not feats:
        return np.zeros(0, np.int64)
    feats = np.concatenate(feats)
    if not uncertain:
        return choose_kcenter(feats, centres, need)
    shortlist = choose_uncertain(probs, SHORTLIST * need, "entropy")
    return shortlist[choose_kcenter(feats[shortlist], centres, need)]


def load_selection(directory: str) -> dict | None:
    """The recorded choice of a fake dataset, None when there is none yet."""
    import json

    path = os.path.join(directory, SELECTION_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def query_position(selection: dict | None, k: int) -> int:
    """The stream position query k sent (k itself before the first round)."""
    if not selection or not selection["rounds"] or k < selection["rounds"][0]["after"]:
        return k
    return position(selection, k)


def carried_over(rounds: list[dict], size: int, need: int) -> list[int]:
    """The candidates the next round takes over from the round before: its pool's unchosen
    positions, the newest `size - need` of them (rounds record how many they took)."""
    alive: list[int] = []
    for r in rounds:
        taken = r.get("carried", 0)  # rounds made before carrying over took none
        pool = (alive[len(alive) - taken :] if taken else []) + list(
            range(r["pool_start"], r["pool_end"])
        )
        chosen = set(r["chosen"])
        alive = [p for p in pool if p not in chosen]
    keep = max(0, size - need)
    return alive[max(0, len(alive) - keep) :]


def choose_adaptive(
    candidate_arms: list[str],
    answered_arms: list[str],
    answered_labels: np.ndarray,
    num_classes: int,
    need: int,
) -> tuple[np.ndarray, dict]:
    """UCB1 over arms rewarded by the self-information of their answers' labels (an arm
    without answers is tried once, rated at the mean reward).

    Returns:
      (chosen candidate rows ascending, {arm: {"answers", "reward", "chosen"}}).
    """
    counts = np.bincount(answered_labels, minlength=num_classes).astype(np.float64)
    info = -np.log2((counts + 1.0) / (counts.sum() + num_classes))  # bits per class
    rewards = info[answered_labels] if len(answered_labels) else np.zeros(0)
    overall = float(rewards.mean()) if len(rewards) else 0.0
    by_arm: dict[str, list[int]] = {}
    for row, arm in enumerate(candidate_arms):
        by_arm.setdefault(arm, []).append(row)
    answered = np.array(answered_arms, dtype=object)
    stats = {}
    for arm in sorted(set(by_arm) | set(answered_arms)):
        mask = answered == arm
        n = int(mask.sum())
        stats[arm] = {
            "answers": n,
            "reward": round(float(rewards[mask].mean()) if n else overall, 4),
            "chosen": 0,
        }
    total = max(len(answered_labels), 1)
    taken: list[int] = []
    next_row = dict.fromkeys(by_arm, 0)
    need = min(int(need), len(candidate_arms))
    while len(taken) < need:
        open_arms = [a for a in sorted(by_arm) if next_row[a] < len(by_arm[a])]
        pulls = {a: stats[a]["answers"] + stats[a]["chosen"] for a in open_arms}
        ucb = {  # an arm never pulled is pulled once first (UCB1)
            a: stats[a]["reward"] + UCB_WEIGHT * np.sqrt(2 * np.log(total + len(taken)) / pulls[a])
            if pulls[a]
            else np.inf
            for a in open_arms
        }
        best = max(open_arms, key=ucb.__getitem__)  # ties: the first arm by name
        taken.append(by_arm[best][next_row[best]])
        next_row[best] += 1
        stats[best]["chosen"] += 1
    return np.sort(np.array(taken, np.int64)), stats


def select(
    directory: str,
    strategy: str,
    round_index: int,
    after: int,
    need: int,
    max_pool: int,
    labeled: dict[int, int],
    fetch: Callable[[list[int]], list],
    arm_of: Callable[[int], str],
    num_classes: int,
    seed: int,
    reuse: bool = False,
    random_share: float = 0.0,
    warm_start: bool = False,
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
      fetch: stream positions -> their NpdItems (None past the stream's end).
      arm_of: stream position -> its arm's name (for `adaptive`).
      num_classes: the label space.
      seed: the scout's initialisation.
      reuse: take the round before's unchosen candidates over (the pool's newest, up to
        the pool size less `need`) and warm-start the scout from the round before's.
      random_share: this share of `need` is drawn uniformly from the pool first (seeded by
        `seed` and the round), the rest chosen by the strategy among the others.
      warm_start: warm-start the scout from the round before's on a fresh pool (implied
        by `reuse`).

    Returns:
      the whole selection ({"strategy", "rounds": [...]}); each round holds "after",
      "chosen" (stream positions in query order), "random" (those of them drawn at
      random, with random_share), "carried" (candidates taken over from
      the round before), "pool_start"/"pool_end" (the fresh positions it scored) and
      statistics.
    """
    selection = load_selection(directory) or {"strategy": strategy, "rounds": []}
    rounds = selection["rounds"]
    if round_index < len(rounds):
        return selection
    start = time.monotonic()
    queries = np.array(sorted(labeled), np.int64)
    every = np.array([labeled[k] for k in queries], np.int64)
    counts = np.bincount(every, minlength=num_classes)
    size = pool_size(need, max_pool)
    carried = carried_over(rounds, size, need) if reuse else []
    warm_start = warm_start or reuse  # the scout starts from the round before's
    pool_start = rounds[-1]["pool_end"] if rounds else after
    record: dict = {"after": after}
    if strategy in SCOUTED:
        fresh = range(pool_start, pool_start + size - len(carried))
        ahead = PoolAhead(fetch, carried + list(fresh))
        try:
            scout, images, trained_on, warm = _scout(
                selection,
                queries,
                every,
                labeled,
                fetch,
                seed,
                after,
                num_classes,
                directory,
                warm_start,
                ahead.start,
            )
        finally:
            ahead.wait()
        record["scout"] = {
            "model": "plain_cnn",
            "steps": scout_steps(trained_on, warm),
            "trained_on": trained_on,
            "warm_start": warm,
            "seconds": round(time.monotonic() - start, 1),
        }
    features = strategy in FEATURED
    if strategy in GRADIENT:
        scorer = boundary_scorer(scout)
    else:
        scorer = _with_features(scout) if features else scout if strategy in SCOUTED else None
    # feats: per scored chunk, the scout's features (kcenter) or boundary distances (dfal)
    probs, feats, candidates, arms = [], [], [], []

    def score(positions: list[int]) -> list:
        got = fetch(positions)
        ok = [(p, it) for p, it in zip(positions, got, strict=True) if it and it.image is not None]
        if ok:
            candidates.extend(p for p, _ in ok)
            if strategy in SCOUTED:
                batch = np.stack([it.image for _, it in ok])
                if strategy in GRADIENT:
                    p, f = boundary_distance(scorer, batch)
                else:
                    p, f = _scores(scorer, batch, features)
                probs.append(p)
                feats.append(f)
            else:
                arms.extend(arm_of(p) for p, _ in ok)
        return got

    for i in range(0, len(carried), SCORE_CHUNK):
        score(carried[i : i + SCORE_CHUNK])
    end = pool_start
    while len(candidates) < size:
        chunk = list(range(end, end + min(SCORE_CHUNK, size - len(candidates))))
        got = score(chunk)
        end = chunk[-1] + 1
        if any(it is None for it in got):  # the stream ends inside the pool
            break
    lucky = random_rows(len(candidates), round(random_share * need), seed, round_index)
    rest = np.setdiff1d(np.arange(len(candidates)), lucky)  # the strategy's to choose from
    if strategy in SCOUTED:
        probs = np.concatenate(probs) if probs else np.zeros((0, num_classes), np.float32)
        left = need - len(lucky)
        if strategy == "class_balance":
            # the random draws count as answers to come: the rarity is judged with them
            guessed = np.bincount(probs[lucky].argmax(axis=1), minlength=num_classes)
            picked = choose_balanced(probs[rest], counts + guessed, left)
        elif strategy in ("entropy", "margin"):
            picked = choose_uncertain(probs[rest], left, strategy)
        elif strategy == "dfal":
            picked = choose_nearest(np.concatenate(feats)[rest] if feats else np.zeros(0), left)
        else:
            centres = _scores(scorer, images, True)[1]
            if len(lucky):  # the random draws are centres already
                pool_feats = np.concatenate(feats)
                centres = np.concatenate([centres, pool_feats[lucky]])
                feats = [pool_feats[rest]]
            picked = choose_diverse(
                probs[rest], feats, centres, left, strategy == "entropy_kcenter"
            )
        rows = np.sort(np.concatenate([lucky, rest[np.asarray(picked, np.int64)]]))
        guesses = probs[rows].argmax(axis=1)
        record["predicted_histogram"] = np.bincount(guesses, minlength=num_classes).tolist()
        record["guesses"] = guesses.tolist()  # the scout's label for each choice
    else:
        answered_arms = [arm_of(query_position(selection, int(k))) for k in queries]
        if len(set(arms) | set(answered_arms)) < 2:
            raise UserInputError(
                f"--selection=adaptive needs NPD arms to choose between, and this stream has "
                f"one ({arms[0] if arms else 'none'}); use --npd=mix:... or a folder:/tfds: "
                "source with several --npd_background kinds or --npd_invert, or another "
                "--selection"
            )
        picked, record["arms"] = choose_adaptive(
            [arms[r] for r in rest], answered_arms, every, num_classes, need - len(lucky)
        )
        rows = np.sort(np.concatenate([lucky, rest[np.asarray(picked, np.int64)]]))
    if rounds:  # the scout of the last round, judged on what it chose (never trained on)
        _judge(rounds[-1], labeled)
    record.update(
        {
            "chosen": [int(candidates[r]) for r in rows],
            **({"random": [int(candidates[r]) for r in lucky]} if random_share else {}),
            **({"drawn_at_random": len(lucky)} if random_share else {}),
            "pool": len(candidates),
            "carried": len(carried),
            "pool_start": int(pool_start),
            "pool_end": int(end),
            "labels_before": counts.tolist(),
            "seconds": round(time.monotonic() - start, 1),
        }
    )
    if warm_start and strategy in SCOUTED:  # before the round is written: the next one needs it
        _save_scout(scout, directory, round_index)
        record["scout"]["saved"] = True
    rounds.append(record)
    atomic_write_json(os.path.join(directory, SELECTION_FILE), selection)
    for older in range(round_index):  # no round will start from these any more
        path = os.path.join(directory, SCOUT_WEIGHTS.format(round=older))
        if os.path.exists(path):
            os.remove(path)
    return selection


def _save_scout(scout, directory: str, round_index: int) -> None:
    path = os.path.join(directory, SCOUT_WEIGHTS.format(round=round_index))
    temp = path.replace(".weights.h5", ".partial.weights.h5")
    scout.save_weights(temp)
    os.replace(temp, path)


def _scout(
    selection, queries, every, labeled, fetch, seed, after, num_classes, directory, warms, trains
):
    """(the scout, its training images, their count) of a round: plain_cnn on a subset of
    the labels so far (scout_subset), the images of the positions their queries sent.
    `trains()` is called once those images are fetched, as the scout's training begins;
    `warms`: the scout starts from the round before's when that one was saved."""
    round_index = len(selection["rounds"])
    queries = queries[scout_subset(every, SCOUT_MAX_EXAMPLES, seed + round_index)].tolist()
    answered = fetch([query_position(selection, k) for k in queries])
    keep = [i for i, item in enumerate(answered) if item is not None and item.image is not None]
    if not keep:
        raise UserInputError(
            f"--selection={selection['strategy']}: none of the {len(queries)} answered queries "
            f"before query {after} has a readable NPD image to train the scout on; check --npd "
            "(its skipped items are listed in the manifest) or use --selection=random"
        )
    images = np.stack([answered[i].image for i in keep])
    labels = np.array([labeled[queries[i]] for i in keep], np.int64)
    # The round before's scout, saved with its round: none for round 0 and for rounds
    # chosen before warm starts existed (then this scout starts cold).
    warm = None
    if warms and round_index and _scouted(selection["rounds"][-1]):
        warm = os.path.join(directory, SCOUT_WEIGHTS.format(round=round_index - 1))
        if not os.path.exists(warm):
            raise UserInputError(
                f"{warm} is missing: round {round_index - 1}'s scout is needed to choose "
                f"round {round_index} as the first run would have; restore the file, or "
                "steal into a new directory"
            )
    trains()
    scout = _train_scout(images, labels, num_classes, seed + round_index, warm)
    return scout, images, len(labels), warm is not None


def _scouted(record: dict) -> bool:
    return record.get("scout", {}).get("saved", False)


def _judge(last: dict, labeled: dict[int, int]) -> None:
    """The previous round's scout agreement with the target on what it chose."""
    if "guesses" not in last:
        return
    answers = [labeled.get(last["after"] + j) for j in range(len(last["guesses"]))]
    pairs = [(g, a) for g, a in zip(last["guesses"], answers, strict=True) if a is not None]
    if pairs:
        last["scout_agreement"] = round(float(np.mean([g == a for g, a in pairs])), 4)


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
