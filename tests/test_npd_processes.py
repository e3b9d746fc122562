"""NPD items made in worker processes (a query selection's candidates): the stream's own
items bit for bit, workers that end with their parent, failures that name themselves."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from cli_util import REPO
from PIL import Image

from copycat_tf.data.npd import NpdStream
from copycat_tf.data.npd_processes import ItemProcesses, WorkerError
from copycat_tf.data.preparation import Preparation


def _folder(path):
    path.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        rgba = rng.integers(0, 256, (20 + i, 30, 4), dtype=np.uint8)
        Image.fromarray(rgba, "RGBA").save(path / f"{i}.png")
    (path / "broken.png").write_bytes(b"\x89PNG not really")  # an unreadable item
    return f"folder:{path}"


def _stream(spec):
    prep = Preparation.parse(
        background="black,white,texture",
        invert=0.5,
        jitter=0.2,
        blur=0.3,
        crop_area="0.3,1",
        crop_aspect="0.75,1.33",
        cycle=True,
        adapt_after=20,
        probe=8,  # mirrored and shifted copies of the first items
    )
    return NpdStream(spec, (12, 12, 1), seed=4, crops_per_image=3, preparation=prep)


def _same(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert (a.index, a.source_id, a.error) == (b.index, b.source_id, b.error)
        if b.image is None:
            assert a.image is None
        else:
            np.testing.assert_array_equal(a.image, b.image)


def test_worker_processes_make_the_streams_items_bit_for_bit(tmp_path):
    """Prepared folder pictures (crops, arms, jitter, blur, the invariance probe, an
    unreadable file) and arm weights changed between calls: every item a worker makes
    is the one the stream makes itself, in the order asked, whichever worker made it."""
    stream = _stream(_folder(tmp_path / "pictures"))
    stream.arm_weights = np.full(len(stream.preparation.arms), 1 / len(stream.preparation.arms))
    positions = [*range(90), 200, 3, 150, 7, 7]
    with ItemProcesses(stream, 2, 1 << 30) as workers:
        first = workers.items(positions)
        assert len(workers._procs) == 2
        lowest = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 19)  # the steal goes first
        assert [os.getpriority(os.PRIO_PROCESS, p.pid) for p in workers._procs] == [lowest] * 2
        _same(first, [stream.item_at_position(p) for p in positions])
        unreadable = {item.source_id for item in first if item.image is None}
        assert unreadable and all(s.startswith("broken.png") for s in unreadable)
        weights = np.zeros(len(stream.preparation.arms))
        weights[-1] = 1.0  # one arm only, past the exploration
        stream.arm_weights = weights
        again = workers.items(positions)
        _same(again, [stream.item_at_position(p) for p in positions])
        changed = [
            p
            for p, a, b in zip(positions, first, again, strict=True)
            if a.image is not None and not np.array_equal(a.image, b.image)
        ]
        assert changed and min(changed) >= 20  # the new weights reached the workers
        assert workers.items([]) == []
    spec = "synthetic:shapes"
    synthetic = NpdStream(spec, (10, 10, 3), seed=2)
    with ItemProcesses(synthetic, 3, 0) as workers:
        _same(workers.items(list(range(7))), [synthetic.item_at_position(p) for p in range(7)])


def test_a_failure_in_a_worker_names_itself_and_no_reply_is_read_after_it(tmp_path):
    """A worker that raises: its error reaches the caller; the other worker's reply to the
    same call is never read, so every later call fails too instead of taking it for the
    reply to its own positions."""
    stream = _stream(_folder(tmp_path / "pictures"))  # adapts after 20 positions
    workers = ItemProcesses(stream, 2, 0)
    with pytest.raises(WorkerError, match="failed: RuntimeError: NPD item .* arm weights"):
        workers.items(list(range(40)))  # the second block needs weights not set yet
    stream.arm_weights = np.full(len(stream.preparation.arms), 1 / len(stream.preparation.arms))
    with pytest.raises(WorkerError, match="arm weights"):
        workers.items(list(range(4)))
    workers.close()


def test_closed_or_dead_workers_are_clear_errors_and_close_ends_them():
    stream = NpdStream("synthetic:shapes", (8, 8, 1), seed=0)
    workers = ItemProcesses(stream, 2, 0)
    workers.items([0, 1, 2])
    procs = list(workers._procs)
    procs[1].kill()
    procs[1].wait()
    with pytest.raises(WorkerError, match=r"ended \(exit code -9\).*run the same command again"):
        workers.items([3, 4, 5, 6])
    workers.close()
    assert all(p.poll() is not None for p in procs)
    with pytest.raises(WorkerError, match="closed"):
        workers.items([0])


def test_a_stream_read_in_order_gets_no_workers(tmp_path):
    from tfds_fixtures import TinyShapes

    TinyShapes(data_dir=str(tmp_path)).download_and_prepare()
    stream = NpdStream("tfds:tiny_shapes", (8, 8, 1), data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="reads its sources in order"):
        ItemProcesses(stream, 2, 0)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_workers_end_when_their_parent_is_killed():
    """kill -9 of the process that started them (a killed steal): its workers see their
    stdin close and end, instead of holding their pictures' memory forever."""
    code = (
        "import sys, time\n"
        "from copycat_tf.data.npd import NpdStream\n"
        "from copycat_tf.data.npd_processes import ItemProcesses\n"
        "workers = ItemProcesses(NpdStream('synthetic:shapes', (8, 8, 1)), 2, 0)\n"
        "workers.items(list(range(4)))\n"
        "print(*[p.pid for p in workers._procs], flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 60  # a liveness bound, not a timing: they end at once
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)
