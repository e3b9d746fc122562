"""The attack as composable steps: target, server, steal, copycat, evaluation.

Each step is the library call its verb makes, taking a `Recipe` (copycat_tf.recipe) and
plain arguments; `demo`, the study and the benchmarks compose them. Every step resumes
from its workdir, so re-running a composition reuses whatever is already done (a trained
target, committed shards, finished copycat epochs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from collections.abc import Iterator

from absl import logging

from copycat_tf.errors import Terminated
from copycat_tf.recipe import Recipe, TargetRecipe


def _raise_terminated(signum, frame):
    raise Terminated(f"signal {signum}")


@dataclasses.dataclass(frozen=True)
class Served:
    """A model served by the embedded server on local ports."""

    grpc_url: str  # grpc://host:port/<model>
    rest_url: str  # http://host:port/v1/models/<model>
    grpc_address: str  # host:port
    log_path: str


def ensure_target(
    workdir: str,
    model_base_path: str,
    pd_data: str,
    recipe: TargetRecipe,
    *,
    data_dir: str | None = None,
    model_name: str = "target",
    verbose: int = 0,
) -> dict:
    """Trains the target, or reuses the run (and export) already in `workdir`.

    Returns:
      train_target's summary (test metrics, export_dir, class_names, ...).
    """
    from copycat_tf.training.target import TrainTargetConfig, run_train_target

    return run_train_target(
        TrainTargetConfig(
            pd_data=pd_data,
            model=recipe.model,
            workdir=workdir,
            model_base_path=model_base_path,
            model_name=model_name,
            data_dir=data_dir,
            train=recipe.train_config(verbose),
        )
    )


@contextlib.contextmanager
def served(
    model_base_path: str, model_name: str, log_path: str, *server_flags: str, api_key=None
) -> Iterator[Served]:
    """Serves <model_base_path>/<model_name> with the embedded server (a child process on
    free localhost ports) for the duration of the block.

    The server is stopped on success, failure, Ctrl-C and SIGTERM alike (SIGTERM is raised
    as `Terminated` in the main thread while the block runs).

    Args:
      model_base_path: the export root.
      model_name: the model to serve.
      log_path: where the server's log goes.
      *server_flags: more model_server flags (e.g. --output_defense=top1).
      api_key: the key the readiness check sends (a server with --api_keys_file).
    """
    from copycat_tf.server.process import ServerProcess

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    server = ServerProcess(
        f"--model_base_path={os.path.join(model_base_path, model_name)}",
        f"--model_name={model_name}",
        *server_flags,
        model=model_name,
        stderr_path=log_path,
        api_key=api_key,
    )
    try:
        server.start()
        served_model = Served(
            grpc_url=f"grpc://{server.grpc_target}/{model_name}",
            rest_url=f"{server.rest}/v1/models/{model_name}",
            grpc_address=server.grpc_target,
            log_path=log_path,
        )
        logging.info("%s served at %s (REST %s)", model_name, served_model.grpc_url, server.rest)
        yield served_model
    finally:
        server.stop()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def steal(
    recipe: Recipe,
    target_url: str,
    output_dir: str,
    *,
    data_dir: str | None = None,
    progress: bool = False,
    target_options: dict | None = None,
    num_classes: int = 0,
    max_qps: float = 0.0,
) -> dict:
    """Steals labels from `target_url` as the recipe says; returns the manifest.
    `num_classes` is the label space of a target whose answers carry no scores (0: from
    its metadata); `max_qps` paces the requests (0: as fast as the target answers)."""
    from copycat_tf.attack.steal import StealConfig
    from copycat_tf.attack.steal import steal as run_steal
    from copycat_tf.data.preparation import Preparation

    return run_steal(
        StealConfig(
            target=target_url,
            npd=recipe.resolved_npd(),
            output_dir=output_dir,
            query_budget=recipe.query_budget,
            query_batch_size=recipe.query_batch_size,
            max_in_flight=recipe.max_in_flight,
            label_mode=recipe.label_mode,
            seed=recipe.seed,
            crops_per_image=recipe.crops_per_image,
            preparation=Preparation.of(recipe),
            selection=recipe.selection,
            selection_pool=recipe.selection_pool,
            selection_round=recipe.selection_round,
            selection_reuse=recipe.selection_reuse,
            selection_warm_start=recipe.selection_warm_start,
            selection_random=recipe.selection_random,
            npd_data_dir=data_dir,
            target_options=target_options or {},
            progress=progress,
            num_classes=num_classes,
            max_qps=max_qps,
        )
    )


def pd_recipe(recipe: Recipe, pd_data: str, budget: int) -> Recipe:
    """The recipe of the NPD+PD stage's steal: problem-domain images, as they are."""
    return dataclasses.replace(
        recipe, npd=f"pd:{pd_data}:train", query_budget=budget, crops_per_image=1
    )


def train_copycat(
    recipe: Recipe,
    fake_dataset: list[str],
    workdir: str,
    *,
    model_base_path: str = "",
    model_name: str = "copycat",
    pd_fake_dataset: list[str] | None = None,
    max_records: int = 0,
    class_names: list[str] | None = None,
    verbose: int = 0,
) -> dict:
    """Trains (or resumes) the copycat as the recipe says; returns its summary."""
    from copycat_tf.training.copycat import TrainCopycatConfig, run_train_copycat

    return run_train_copycat(
        TrainCopycatConfig(
            fake_dataset=list(fake_dataset),
            model=recipe.model,
            workdir=workdir,
            model_base_path=model_base_path,
            model_name=model_name,
            balance=recipe.balance,
            max_replication=recipe.max_replication,
            soft_labels=recipe.label_mode != "hard",
            holdout_percent=recipe.holdout_percent,
            train=recipe.train_config(verbose),
            pd_fake_dataset=list(pd_fake_dataset or []),
            finetune=recipe.finetune_config(verbose),
            class_names=list(class_names or []),
            max_records=max_records,
        )
    )


def evaluate(
    target_url: str,
    copycat: str,
    test_data: str,
    out: str,
    *,
    data_dir: str | None = None,
    max_examples: int = 0,
) -> dict:
    """Compares the copycat with the target on labelled test data; returns the report."""
    from copycat_tf.evaluation.report import EvaluateConfig, run_evaluate

    return run_evaluate(
        EvaluateConfig(
            target=target_url,
            copycat=copycat,
            test_data=test_data,
            out=out,
            data_dir=data_dir,
            max_examples=max_examples,
        )
    )


@dataclasses.dataclass
class AttackConfig:
    """One end-to-end attack on a freshly trained (or reused) target.

    Attributes:
      workdir: root of every artefact (target/, models/, fake_npd/, copycat/, eval/).
      recipe: the attack.
      target_recipe: how the target is trained.
      pd_data: the problem domain (the target's training data and the test data).
      data_dir: its data directory (IDX folder), None for the default.
      pd_budget: > 0 adds the NPD+PD stage with this many target-labelled PD images.
      eval_examples: test images for the evaluation (0: all).
    """

    workdir: str
    recipe: Recipe = dataclasses.field(default_factory=Recipe)
    target_recipe: TargetRecipe = dataclasses.field(default_factory=TargetRecipe)
    pd_data: str = "fashion_mnist"
    data_dir: str | None = None
    pd_budget: int = 0
    eval_examples: int = 0


def run_attack(cfg: AttackConfig, verbose: int = 0) -> dict:
    """Target, server, steal (+ PD steal), copycat, evaluation; returns timings, paths,
    the steal manifest and the evaluation report."""
    root = cfg.workdir
    models = os.path.join(root, "models")
    timings = {}
    start = t = time.monotonic()
    target = ensure_target(
        os.path.join(root, "target"),
        models,
        cfg.pd_data,
        cfg.target_recipe,
        data_dir=cfg.data_dir,
        verbose=verbose,
    )
    timings["target_seconds"] = round(time.monotonic() - t, 1)
    with served(models, "target", os.path.join(root, "model_server.log")) as server:
        t = time.monotonic()
        manifest = steal(
            cfg.recipe,
            server.grpc_url,
            os.path.join(root, "fake_npd"),
            data_dir=cfg.data_dir,
            progress=verbose > 0,
        )
        pd_fake = []
        if cfg.pd_budget:
            pd_fake = [os.path.join(root, "fake_pd")]
            steal(pd_recipe(cfg.recipe, cfg.pd_data, cfg.pd_budget), server.grpc_url, pd_fake[0])
        timings["steal_seconds"] = round(time.monotonic() - t, 1)
        t = time.monotonic()
        copycat = train_copycat(
            cfg.recipe,
            [os.path.join(root, "fake_npd")],
            os.path.join(root, "copycat"),
            model_base_path=models,
            pd_fake_dataset=pd_fake,
            class_names=target["class_names"],
            verbose=verbose,
        )
        timings["copycat_seconds"] = round(time.monotonic() - t, 1)
        t = time.monotonic()
        report = evaluate(
            server.grpc_url,
            copycat["export_dir"],
            f"{cfg.pd_data}:test",
            os.path.join(root, "eval"),
            data_dir=cfg.data_dir,
            max_examples=cfg.eval_examples,
        )
        timings["evaluate_seconds"] = round(time.monotonic() - t, 1)
    timings["total_seconds"] = round(time.monotonic() - start, 1)
    return {
        "npd": cfg.recipe.resolved_npd(),
        "manifest": manifest,
        "timings": timings,
        "report": report,
        "copycat": copycat["stages"]["npd"],
        "paths": {
            "target": target["export_dir"],
            "fake_dataset": os.path.join(root, "fake_npd"),
            "copycat": copycat["export_dir"],
            "report": os.path.join(root, "eval", "report.md"),
            "tensorboard": root,
        },
    }
