"""Extraction detectors: per client, do the queries look like a model-stealing attack?

`--detector` names one or more signals (comma-separated); a client (its API key, else its
address) is flagged when any signal fires, once, and stays flagged:

  prada  Juuti et al., "PRADA: Protecting against DNN Model Stealing Attacks" (EuroS&P
         2019). Per client and per predicted class, a growing set of the client's queries;
         each new query's minimum L2 distance to its class's set is recorded, and the query
         joins the set when that distance exceeds the class's threshold (mean - std of the
         distances that made the set grow). Benign queries' distances look normally
         distributed; synthetic or crafted ones do not: the client is flagged when the
         Shapiro-Wilk W of its last `window` distances falls below `delta`, once at least
         `min_queries` distances are known. Exact repeats of a stored query (retries)
         are not counted: they teach an attacker nothing and would flag benign clients.
  ood    Share of a client's recent queries that lie outside the target's input
         distribution. A Gaussian model of block-averaged pixels (8x8 blocks per channel
         at most) is fitted when the server starts (per served image shape) on
         `calibration` (an NPD spec of in-distribution images, e.g.
         pd:fashion_mnist:train or folder:<dir>, each picture taken once, whole, as it
         is; at least 20 distinct images); a query is out of
         distribution when its Mahalanobis distance exceeds the `ood_quantile` of held-out
         calibration images. The client is flagged when more than `ood_share` of its last
         `window` queries (at least `min_queries`) are. Why this signal: the Copycat attack
         sends non-problem-domain images by definition, and a query-selection attack that
         balances its classes (defeating a class-histogram signal) or spaces its queries
         like natural images (defeating PRADA) still sends them; a benign client of the
         API sends images of the problem domain, of which about 1 - ood_quantile lie out.

Memory per tracked client (at most `max_clients`, the least recently seen forgotten):
prada keeps at most `max_set` query vectors of at most 1,024 values (float32; larger
images are block-averaged down to that size): 8 MiB at the defaults, plus `window`
distances; ood keeps `window` booleans. Both run on the model's own predictions, before
any output defence.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import re
import threading

import numpy as np
from absl import logging

SIGNALS = ("prada", "ood")
ACTIONS = ("log", "block", "degrade")
PRADA_DIMS = 1024  # values per stored query vector (larger images are block-averaged)
OOD_BLOCKS = 8  # the ood model's grid: at most 8x8 block averages per channel

# The server log's line when a client is flagged; flags_in_log reads it back.
FLAG_MESSAGE = "detector: client %s flagged by %s after %d queries (action: %s)"
_FLAG_LINE = re.compile(r"detector: client (\S+) flagged by (\w+) after (\d+) queries")


def _as_they_are():
    from copycat_tf.data.preparation import Preparation

    # Calibration pictures are taken whole, once each, as they are (no crops, inversion,
    # jitter or blur; transparency over black).
    return Preparation.parse("black", 0.0, 0.0, 0.0, "1,1", "1,1", cycle=False)


def flags_in_log(text: str) -> list[tuple[str, str, int]]:
    """(client, signal, queries) of every flag a server log reports, in order."""
    return [(m.group(1), m.group(2), int(m.group(3))) for m in _FLAG_LINE.finditer(text)]


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    """A parsed --detector and its settings (see the module docstring).

    Attributes:
      signals: the signals on (empty: no detector).
      action: log | block (refuse a flagged client) | degrade (answer it through
        `degrade`, an output defence).
      delta: prada flags when the Shapiro-Wilk W falls below this.
      min_queries: queries of a client before a signal may fire.
      window: the last distances (prada) or out-of-distribution marks (ood) judged.
      max_set: prada's stored queries per client.
      calibration: NPD spec of in-distribution images (ood).
      calibration_size: calibration images used (half fit the model, half set the
        threshold).
      ood_quantile: quantile of held-out calibration distances a query must exceed.
      ood_share: ood flags when more than this share of the window is out.
      max_clients: clients tracked at once.
      degrade: the output defence a flagged client gets with action degrade.
    """

    signals: tuple[str, ...] = ()
    action: str = "log"
    delta: float = 0.9
    min_queries: int = 100
    window: int = 5000
    max_set: int = 2048
    calibration: str = ""
    calibration_size: int = 2000
    ood_quantile: float = 0.99
    ood_share: float = 0.5
    max_clients: int = 256
    degrade: str = "gaussian:0.5"

    @property
    def enabled(self) -> bool:
        return bool(self.signals)


def parse_signals(spec: str) -> tuple[str, ...]:
    """--detector's value: "", "none" or a comma list of SIGNALS.

    Raises:
      ValueError: an unknown signal.
    """
    names = [s.strip() for s in spec.split(",") if s.strip() and s.strip() != "none"]
    unknown = [s for s in names if s not in SIGNALS]
    if unknown:
        raise ValueError(
            f"--detector={spec!r}: unknown signal(s) {', '.join(unknown)}; expected none or "
            f"a comma list of {', '.join(SIGNALS)}"
        )
    return tuple(dict.fromkeys(names))


def check_config(cfg: DetectorConfig) -> None:
    """One-line errors for settings that cannot work.

    Raises:
      ValueError: naming the flag.
    """
    if cfg.action not in ACTIONS:
        raise ValueError(f"--detector_action={cfg.action!r}; expected one of {', '.join(ACTIONS)}")
    if "ood" in cfg.signals and not cfg.calibration:
        raise ValueError(
            "--detector=ood needs --detector_calibration=<NPD spec of images the target "
            "expects>, e.g. pd:fashion_mnist:train or folder:<dir of in-distribution images>"
        )
    if not 0.0 < cfg.delta < 1.0:
        raise ValueError(f"--detector_delta={cfg.delta}; expected a W threshold in (0, 1)")
    if cfg.min_queries < 3 or cfg.window < cfg.min_queries:
        raise ValueError(
            f"--detector_min_queries={cfg.min_queries} / --detector_window={cfg.window}: "
            "expected 3 <= min_queries <= window"
        )
    if not 0.0 < cfg.ood_share < 1.0 or not 0.5 <= cfg.ood_quantile < 1.0:
        raise ValueError(
            f"--detector_ood_share={cfg.ood_share} must be in (0, 1) and "
            f"--detector_ood_quantile={cfg.ood_quantile} in [0.5, 1)"
        )
    if cfg.calibration_size < 20 or cfg.max_set < 1 or cfg.max_clients < 1:
        raise ValueError(
            "--detector_calibration_size must be >= 20, --detector_max_set and "
            "--detector_max_clients >= 1"
        )


def block_average(images: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """[N, H, W, C] -> [N, gh, gw, C]: the mean of each cell of a gh x gw grid (cells
    differ by at most one pixel where the size does not divide)."""
    n, h, w, c = images.shape
    gh, gw = grid
    if h % gh == 0 and w % gw == 0:  # equal cells: sums of rows, then of columns
        rows = images.astype(np.float32).reshape(n, gh, h // gh, w * c).sum(axis=2)
        cells = rows.reshape(n, gh, gw, w // gw, c).sum(axis=3)
        return cells / float((h // gh) * (w // gw))
    # Uneven cells: each axis's cell sums as one small 0/1 matrix product ([N, C, H, W]
    # @ ...; sums of whole pixel values are exact in float32), then one division.
    rows, row_counts = _cells(h, gh)
    cols, col_counts = _cells(w, gw)
    sums = rows @ images.astype(np.float32).transpose(0, 3, 1, 2) @ cols.T
    return (sums / np.outer(row_counts, col_counts)).transpose(0, 2, 3, 1)


@functools.lru_cache(maxsize=16)
def _cells(size: int, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """[cells, size] 0/1 matrix whose row k picks the k-th of `cells` near-equal runs of
    `size` pixels, and the runs' lengths."""
    starts = np.linspace(0, size, cells + 1).astype(int)
    member = np.zeros((cells, size), np.float32)
    for k in range(cells):
        member[k, starts[k] : starts[k + 1]] = 1.0
    member.flags.writeable = False
    return member, np.diff(starts).astype(np.float32)


def prada_features(images: np.ndarray) -> np.ndarray:
    """[N, H, W, C] uint8 -> [N, <= PRADA_DIMS] float32 in [0, 1] (raw pixels when they
    fit, else block averages)."""
    n, h, w, c = images.shape
    if h * w * c > PRADA_DIMS:
        side = max(1, int((PRADA_DIMS / c) ** 0.5))
        images = block_average(images, (min(h, side), min(w, side)))
    return np.multiply(images.reshape(n, -1), np.float32(1.0 / 255.0), dtype=np.float32)


def ood_features(images: np.ndarray) -> np.ndarray:
    """[N, H, W, C] -> [N, <= 64 C] block averages in [0, 1]."""
    _, h, w, _ = images.shape
    x = block_average(images, (min(h, OOD_BLOCKS), min(w, OOD_BLOCKS)))
    return x.reshape(len(x), -1) / 255.0


class OodModel:
    """A Gaussian of in-distribution features; its Mahalanobis distance and threshold."""

    def __init__(self, images: np.ndarray, quantile: float):
        feats = ood_features(images).astype(np.float64)
        fit, held = feats[0::2], feats[1::2]
        self.mean = fit.mean(axis=0)
        cov = np.cov(fit - self.mean, rowvar=False).reshape(feats.shape[1], feats.shape[1])
        cov += np.eye(len(cov)) * (1e-3 + 1e-2 * np.trace(cov) / len(cov))
        # Mahalanobis distance as a sum of squares: precision = W W^T (W from Cholesky).
        self.whiten = np.linalg.cholesky(np.linalg.inv(cov)).astype(np.float32)
        self.mean = self.mean.astype(np.float32)
        self.threshold = float(np.quantile(self.distance_of(held), quantile))

    def distance_of(self, feats: np.ndarray) -> np.ndarray:
        z = (feats.astype(np.float32) - self.mean) @ self.whiten
        return (z * z).sum(axis=1)

    def outside(self, images: np.ndarray) -> np.ndarray:
        return self.distance_of(ood_features(images)) > self.threshold


class _Client:
    """One client's detector state (see the module docstring for the bounds)."""

    def __init__(self, cfg: DetectorConfig):
        self.lock = threading.Lock()
        self.queries = 0
        self.flagged_by = ""
        self.flagged_at = 0
        self.sets: dict[int, np.ndarray] = {}
        # Per class: (count, sum, sum of squares) of the distances that grew its set.
        self.set_sums: dict[int, tuple[int, float, float]] = {}
        self.thresholds: dict[int, float] = {}
        self.stored = 0
        self.distances: collections.deque[float] = collections.deque(maxlen=cfg.window)
        self.outside: collections.deque[bool] = collections.deque(maxlen=cfg.window)
        self.last_w = float("nan")

    def prada(self, feats: np.ndarray, classes: np.ndarray, max_set: int) -> None:
        """PRADA's growing sets, a request at a time, as if its rows came one by one.

        Per class: the distances to the stored set by one matrix product; then the rows in
        order, in runs: a row can change the set only when its distance exceeds the
        threshold while the set has room, so the distances of every row before the next
        such row are recorded at once, and a row that joins the set lowers the distances
        of the rows after it (to itself) before the next run is sought. When the set is
        full (an attack's steady state) a request costs one product and one run.
        """
        for c in np.unique(classes):
            rows = np.flatnonzero(classes == c)
            x = feats[rows]
            stored = self.sets.get(int(c))
            sq = (x * x).sum(axis=1)
            if stored is not None:
                to_set = sq[:, None] - 2.0 * x @ stored.T + (stored * stored).sum(axis=1)[None]
                best = np.sqrt(np.maximum(to_set.min(axis=1), 0.0))
            else:
                best = np.full(len(rows), np.inf)
            added: list[int] = []
            count, total, squares = self.set_sums.get(int(c), (0, 0.0, 0.0))
            threshold = self.thresholds.get(int(c), 0.0)
            i = 0
            while i < len(rows):
                rest = best[i:]
                if self.stored + len(added) < max_set:
                    # the class's first query starts its set (inf); an exact repeat (a
                    # retry, 0) tells an attacker nothing new and is never counted
                    grows = np.flatnonzero((rest > threshold) & (rest != 0.0))
                    j = i + int(grows[0]) if len(grows) else len(rows)
                else:
                    j = len(rows)
                run = best[i:j]
                self.distances.extend(run[(run != 0.0) & np.isfinite(run)].tolist())
                if j == len(rows):
                    break
                d = float(best[j])
                if d != math.inf:
                    self.distances.append(d)
                    count, total, squares = count + 1, total + d, squares + d * d
                    mean = total / count  # threshold: mean - std of the set-growing distances
                    threshold = mean - math.sqrt(max(squares / count - mean * mean, 0.0))
                added.append(j)
                to_new = np.sqrt(np.maximum(sq - 2.0 * (x @ x[j]) + sq[j], 0.0))
                best = np.minimum(best, to_new)
                i = j + 1
            self.set_sums[int(c)] = (count, total, squares)
            if count:
                self.thresholds[int(c)] = threshold
            if added:
                new = x[added]
                self.sets[int(c)] = new if stored is None else np.concatenate([stored, new])
                self.stored += len(added)


class Detector:
    """Per-client extraction detection for the model server (thread-safe)."""

    def __init__(self, cfg: DetectorConfig, data_dir: str | None = None):
        check_config(cfg)
        self.cfg = cfg
        self.data_dir = data_dir
        self._clients: collections.OrderedDict[str, _Client] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._ood: dict[tuple, OodModel] = {}
        self._ood_lock = threading.Lock()
        self.on_flag = None  # callable(signal) when a client is flagged (metrics)

    def _client(self, who: str) -> _Client:
        with self._lock:
            state = self._clients.pop(who, None)
            if state is None:
                state = _Client(self.cfg)
                while len(self._clients) >= self.cfg.max_clients:
                    self._clients.popitem(last=False)
            self._clients[who] = state
            return state

    def tracked(self) -> int:
        with self._lock:
            return len(self._clients)

    def flagged(self, who: str) -> str:
        """The signal that flagged `who`, "" when none has."""
        with self._lock:
            state = self._clients.get(who)
        return state.flagged_by if state is not None else ""

    def status(self, who: str) -> dict:
        """What the detector knows of a client (tests, logs)."""
        with self._lock:
            state = self._clients.get(who)
        if state is None:
            return {"queries": 0, "flagged_by": "", "flagged_at": 0}
        with state.lock:
            return {
                "queries": state.queries,
                "flagged_by": state.flagged_by,
                "flagged_at": state.flagged_at,
                "stored": state.stored,
                "last_w": state.last_w,
                "outside_share": float(np.mean(state.outside)) if state.outside else 0.0,
            }

    def prepare(self, shape: tuple[int, int, int]) -> None:
        """Fits the ood model for images of `shape` now (the server does at start) rather
        than at the first request of that shape.

        Raises:
          ValueError: the calibration gives fewer than 20 images.
        """
        if "ood" in self.cfg.signals:
            self._ood_model(shape)

    def _ood_model(self, shape: tuple[int, int, int]) -> OodModel:
        """The ood model for images of `shape`, fitted on first use (or by prepare)."""
        with self._ood_lock:
            model = self._ood.get(shape)
            if model is None:
                from copycat_tf.data.npd import NpdStream

                stream = NpdStream(
                    self.cfg.calibration,
                    shape,
                    seed=0,
                    data_dir=self.data_dir,
                    preparation=_as_they_are(),
                )
                images = [
                    item.image
                    for item in (stream.item(k) for k in range(self.cfg.calibration_size))
                    if item is not None and item.image is not None
                ]
                distinct = len({image.tobytes() for image in images})
                if distinct < 20:
                    raise ValueError(
                        f"--detector_calibration={self.cfg.calibration!r} gave {distinct} "
                        f"distinct images of {shape}; expected at least 20: give a source "
                        "of in-distribution images (e.g. pd:<dataset>:train or a larger folder)"
                    )
                model = OodModel(np.stack(images), self.cfg.ood_quantile)
                self._ood[shape] = model
                logging.info(
                    "detector: ood model fitted on %d images of %s (threshold %.1f)",
                    len(images),
                    shape,
                    model.threshold,
                )
            return model

    def observe(self, who: str, images: np.ndarray, classes: np.ndarray) -> str:
        """Records one answered request of `who` (uint8 images [N, H, W, C], the model's
        classes [N]); returns the signal that flagged the client now, else ""."""
        cfg = self.cfg
        state = self._client(who)
        ood = self._ood_model(tuple(images.shape[1:])) if "ood" in cfg.signals else None
        with state.lock:
            state.queries += len(images)
            if state.flagged_by:
                return ""
            fired = ""
            if "prada" in cfg.signals:
                state.prada(prada_features(images), np.asarray(classes), cfg.max_set)
                if len(state.distances) >= cfg.min_queries:
                    state.last_w = shapiro_w(np.fromiter(state.distances, np.float64))
                    if state.last_w < cfg.delta:
                        fired = "prada"
            if ood is not None:
                state.outside.extend(ood.outside(images).tolist())
                share = sum(state.outside) / len(state.outside)
                if not fired and len(state.outside) >= cfg.min_queries and share > cfg.ood_share:
                    fired = "ood"
            if fired:
                state.flagged_by, state.flagged_at = fired, state.queries
        if fired:
            logging.warning(FLAG_MESSAGE, who, fired, state.queries, cfg.action)
            if self.on_flag is not None:
                self.on_flag(fired)
        return fired


def shapiro_w(values: np.ndarray) -> float:
    """The Shapiro-Wilk W statistic (1.0 for a constant sample: nothing to judge).

    W = (sum a_i x_(i))^2 / sum (x_i - mean)^2 with Royston's (1992, 1995: algorithm AS R94)
    approximation of the coefficients a, the one scipy.stats.shapiro uses, computed here
    because the detector judges a client's window at every request: the coefficients
    depend on the sample size only and are kept for the last size (a full window's), and
    the statistic is a sort and two sums. Samples under 12 values go to scipy.
    """
    x = np.sort(np.asarray(values, np.float64))
    if x[-1] == x[0]:
        return 1.0
    if len(x) < 12:
        from scipy import stats

        return float(stats.shapiro(x).statistic)
    x -= x.mean()
    w = float(np.dot(_shapiro_coefficients(len(x)), x)) ** 2 / float(np.dot(x, x))
    return min(w, 1.0)


_COEFFICIENTS: tuple[int, np.ndarray] | None = None  # (n, a) of the last sample size


def _shapiro_coefficients(n: int) -> np.ndarray:
    """Royston's coefficients a_1..a_n (ascending order statistics; a_i = -a_{n+1-i})."""
    global _COEFFICIENTS
    cached = _COEFFICIENTS
    if cached is not None and cached[0] == n:
        return cached[1]
    from scipy.special import ndtri

    m = ndtri((np.arange(1, n + 1) - 0.375) / (n + 0.25))
    summ2 = float(np.dot(m, m))
    u = 1.0 / math.sqrt(n)
    last = m[-1] / math.sqrt(summ2) + np.polyval(
        [-2.706056, 4.434685, -2.071190, -0.147981, 0.221157, 0.0], u
    )
    second = m[-2] / math.sqrt(summ2) + np.polyval(
        [-3.582633, 5.682633, -1.752461, -0.293762, 0.042981, 0.0], u
    )
    phi = (summ2 - 2.0 * m[-1] ** 2 - 2.0 * m[-2] ** 2) / (1.0 - 2.0 * last**2 - 2.0 * second**2)
    a = m / math.sqrt(phi)
    a[-1], a[-2], a[0], a[1] = last, second, -last, -second
    _COEFFICIENTS = (n, a)
    return a
