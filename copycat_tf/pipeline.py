"""The whole attack as one library call: target, server, steal, copycat, evaluation.

Used by `demo` (one command a newcomer runs) and the Fashion-MNIST study driver. Every
step is the same library call its verb makes, with the workdirs of DESIGN.md below one
root, so a re-run reuses whatever is already done (a trained target, committed shards,
finished copycat stages).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time

from absl import logging

from copycat_tf.attack.harvest import HarvestConfig, harvest
from copycat_tf.evaluation.report import EvaluateConfig, run_evaluate
from copycat_tf.server.process import ServerProcess
from copycat_tf.training.copycat import CopycatConfig, run_train_copycat
from copycat_tf.training.target import TargetConfig, run_train_target
from copycat_tf.training.trainer import TrainConfig

NATURAL_NPD = "/usr/share/openclipart/png"


def default_npd() -> str:
    """Natural images when the Debian openclipart-png pictures are there, else dead leaves."""
    if os.path.isdir(NATURAL_NPD) and os.listdir(NATURAL_NPD):
        return f"folder:{NATURAL_NPD}"
    return "synthetic:dead_leaves"


@dataclasses.dataclass
class AttackConfig:
    """One end-to-end attack on a freshly trained (or reused) target.

    Attributes:
      workdir: root of every artefact (target/, models/, fake_npd/, copycat/, eval/).
      pd_data: the problem domain (the target's training data and the test data).
      data_dir: its data directory (IDX folder), None for the default.
      npd: NPD spec for the attack.
      query_budget: NPD queries.
      target_epochs, copycat_epochs: training lengths.
      target_model, copycat_model: registry names.
      query_batch_size, max_in_flight, crops_per_image: steal settings.
      balance: copycat class balancing.
      pd_budget: >0 adds the NPD+PD stage with this many target-labelled PD images.
      finetune_epochs: epochs of that stage.
      eval_examples: test images for the evaluation (0: all).
      seed: one seed for everything.
    """

    workdir: str
    pd_data: str = "fashion_mnist"
    data_dir: str | None = None
    npd: str = ""
    query_budget: int = 50_000
    target_epochs: int = 10
    copycat_epochs: int = 10
    target_model: str = "small_cnn"
    copycat_model: str = "small_cnn"
    query_batch_size: int = 256
    max_in_flight: int = 4
    crops_per_image: int = 4
    balance: str = "replicate"
    pd_budget: int = 0
    finetune_epochs: int = 5
    eval_examples: int = 0
    seed: int = 0


class _Terminated(Exception):
    """SIGTERM, turned into an exception so `finally` blocks stop the server."""


def _raise_terminated(signum, frame):
    raise _Terminated(f"signal {signum}")


def run_attack(cfg: AttackConfig, verbose: int = 0) -> dict:
    """Runs the attack; returns timings, paths and the evaluation report.

    The model server is a child process on free localhost ports; it is stopped on
    success, failure, Ctrl-C and SIGTERM alike.
    """
    npd = cfg.npd or default_npd()
    root = cfg.workdir
    timings = {}
    start = time.monotonic()
    target = run_train_target(
        TargetConfig(
            pd_data=cfg.pd_data,
            model=cfg.target_model,
            workdir=os.path.join(root, "target"),
            model_base_path=os.path.join(root, "models"),
            model_name="target",
            data_dir=cfg.data_dir,
            train=TrainConfig(
                epochs=cfg.target_epochs,
                batch_size=128,
                learning_rate=2e-3,
                augment="flip",
                seed=cfg.seed,
                verbose=verbose,
            ),
        )
    )
    timings["target_seconds"] = round(time.monotonic() - start, 1)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    server = ServerProcess(
        f"--model_base_path={os.path.join(root, 'models', 'target')}",
        "--model_name=target",
        model="target",
        stderr_path=os.path.join(root, "model_server.log"),
    )
    try:
        server.start()
        url = f"grpc://{server.grpc_target}/target"
        logging.info("target served at %s (REST %s)", url, server.rest)
        t = time.monotonic()
        steal_settings = dict(
            target=url,
            query_batch_size=cfg.query_batch_size,
            max_in_flight=cfg.max_in_flight,
            seed=cfg.seed,
            progress=verbose > 0,
            records_per_shard=10_000,
            npd_data_dir=cfg.data_dir,
        )
        manifest = harvest(
            HarvestConfig(
                npd=npd,
                output_dir=os.path.join(root, "fake_npd"),
                query_budget=cfg.query_budget,
                crops_per_image=cfg.crops_per_image,
                **steal_settings,
            )
        )
        pd_fake = []
        if cfg.pd_budget:
            harvest(
                HarvestConfig(
                    npd=f"pd:{cfg.pd_data}:train",
                    output_dir=os.path.join(root, "fake_pd"),
                    query_budget=cfg.pd_budget,
                    **steal_settings,
                )
            )
            pd_fake = [os.path.join(root, "fake_pd")]
        timings["steal_seconds"] = round(time.monotonic() - t, 1)
        t = time.monotonic()
        copycat = run_train_copycat(
            CopycatConfig(
                fake_dataset=[os.path.join(root, "fake_npd")],
                model=cfg.copycat_model,
                workdir=os.path.join(root, "copycat"),
                model_base_path=os.path.join(root, "models"),
                model_name="copycat",
                balance=cfg.balance,
                pd_fake_dataset=pd_fake,
                train=TrainConfig(
                    epochs=cfg.copycat_epochs,
                    batch_size=128,
                    learning_rate=2e-3,
                    seed=cfg.seed,
                    verbose=verbose,
                ),
                finetune=TrainConfig(
                    epochs=cfg.finetune_epochs,
                    batch_size=128,
                    learning_rate=5e-4,
                    seed=cfg.seed,
                    verbose=verbose,
                ),
                class_names=target["class_names"],
            )
        )
        timings["copycat_seconds"] = round(time.monotonic() - t, 1)
        t = time.monotonic()
        report = run_evaluate(
            EvaluateConfig(
                target=url,
                copycat=copycat["export_dir"],
                test_data=f"{cfg.pd_data}:test",
                out=os.path.join(root, "eval"),
                data_dir=cfg.data_dir,
                max_examples=cfg.eval_examples,
            )
        )
        timings["evaluate_seconds"] = round(time.monotonic() - t, 1)
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)
    timings["total_seconds"] = round(time.monotonic() - start, 1)
    return {
        "npd": npd,
        "query_budget": cfg.query_budget,
        "queries_spent": manifest["queries_spent"],
        "stolen_label_histogram": manifest["label_histogram"],
        "timings": timings,
        "report": report,
        "paths": {
            "target": target["export_dir"],
            "fake_dataset": os.path.join(root, "fake_npd"),
            "copycat": copycat["export_dir"],
            "report": os.path.join(root, "eval", "report.md"),
            "tensorboard": root,
        },
    }
