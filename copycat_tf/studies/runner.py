"""Running a study: one target, one embedded server, then every dataset, run and row of
the plan, recorded in study.json and written up as RESULTS.md by code.

Resumable: datasets and runs already measured (same settings) are taken from study.json;
interrupted ones resume from their workdirs (committed shards, finished epochs). So the
same command, re-run, regenerates RESULTS.md byte for byte from the same study.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import shutil
import time

from absl import logging

from copycat_tf import pipeline
from copycat_tf.data import fake_dataset as fd
from copycat_tf.recipe import FINETUNE_FIELDS, TRAINING_FIELDS, Recipe, TargetRecipe
from copycat_tf.studies import detection, results
from copycat_tf.studies.plan import (
    DEFENCES,
    PARTS,
    RATE_LIMITS,
    SELECTION_BUDGETS,
    SELECTION_STRATEGIES,
    DatasetSpec,
    Plan,
    PlanSettings,
    RunSpec,
    build_plan,
    slug,
)
from copycat_tf.workdir import atomic_write_json, init_workdir

STUDY_JSON = "study.json"
SCHEMA = 1


@dataclasses.dataclass
class StudyConfig:
    """Everything `run_study` needs.

    Attributes:
      name: the study's name (titles).
      results_dir: where study.json, RESULTS.md and the plots go (experiments/<name>);
        a hand-written PREFACE.md there is included at the top of RESULTS.md.
      workdir: the study's artefacts (fake datasets, copycats, evaluations).
      target_workdir, model_base_path: train_target's workdir and export root (reused).
      pd_data, data_dir: the problem domain and its data directory.
      recipe: the attack every row starts from.
      target_recipe: how the target is trained when it is missing.
      budgets: the budget curve's query budgets.
      variant_budget: budget of the preparation, generator and label-mode comparisons.
      data_free: the generator of the sources part's data-free row.
      pd_budget: target-labelled PD images of the NPD+PD and PD-only rows.
      parts: which parts to run (studies.plan.PARTS).
      selection_budgets, selections: the selection part's budgets and strategies.
      selection_full: strategies also run at the recipe's budget.
      detector_benign_images: problem-domain test images the detector part's benign
        clients share.
      defences, defence_budget: the defences part's served output defences and budget.
      rate_limits: the defences part's served rate limits (requests per second).
      command: the exact command line, recorded in RESULTS.md.
      render_only: only regenerate RESULTS.md and the plots from study.json.
    """

    name: str
    results_dir: str
    workdir: str
    target_workdir: str
    model_base_path: str
    pd_data: str = "fashion_mnist"
    data_dir: str | None = None
    recipe: Recipe = dataclasses.field(default_factory=Recipe)
    target_recipe: TargetRecipe = dataclasses.field(default_factory=TargetRecipe)
    budgets: tuple[int, ...] = (5_000, 10_000, 25_000, 50_000)
    variant_budget: int = 10_000
    data_free: str = "shapes"
    pd_budget: int = 54_000
    parts: tuple[str, ...] = tuple(PARTS)
    selection_budgets: tuple[int, ...] = SELECTION_BUDGETS
    selections: tuple[str, ...] = SELECTION_STRATEGIES
    selection_full: tuple[str, ...] = ()
    detector_benign_images: int = 10_000
    defences: tuple[str, ...] = DEFENCES
    defence_budget: int = 0
    rate_limits: tuple[float, ...] = RATE_LIMITS
    command: str = ""
    render_only: bool = False


def _machine() -> dict:
    """Facts about the machine a measurement ran on."""
    import tensorflow as tf

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpus = tf.config.list_physical_devices("GPU")
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "gpus": len(gpus),
        "tensorflow": tf.__version__,
        "python": platform.python_version(),
    }


def _today() -> str:
    return datetime.datetime.now(datetime.UTC).date().isoformat()


def _key(obj) -> dict:
    """A JSON-comparable description of a dataset or run spec (what makes it the same)."""
    return json.loads(json.dumps(dataclasses.asdict(obj), sort_keys=True))


def _field_default(spec, name: str):
    for field in dataclasses.fields(spec):
        if field.name == name and field.default is not dataclasses.MISSING:
            return field.default
    return object()


def _unused_fields(spec) -> tuple[str, ...]:
    """Recipe fields `spec` never reads: a steal reads no training field, a copycat without
    PD data no fine-tuning field."""
    if isinstance(spec, DatasetSpec):
        return TRAINING_FIELDS
    if isinstance(spec, RunSpec) and not spec.pd_dataset:
        return FINETUNE_FIELDS
    return ()


# Recipe fields added since a recording, with what a recorded key without the field did
# (not always the field's default: the jitter's place changed with its knob).
RECORDED_BEFORE = {
    "npd_jitter_on": "canvas",
    "selection": "random",
    "selection_random": 0.0,
    "invariance_probe": 0,
    "mixup": 0.0,
    "min_steps": 0,
}


def _as_now(recorded: dict) -> dict:
    """A recorded key with the fields added since, holding what the recording did."""
    recipe = recorded.get("recipe")
    if recipe is None or all(name in recipe for name in RECORDED_BEFORE):
        return recorded
    return {**recorded, "recipe": {**RECORDED_BEFORE, **recipe}}


def same_key(recorded: dict, spec) -> bool:
    """Whether a recorded key describes `spec`. Recipe fields the spec never reads are not
    compared (a new fine-tuning default leaves NPD-only copycats and every steal measured),
    and fields added since the recording count as the same when they hold their defaults
    (what the run did before they existed), so a new knob does not make every finished run
    look unfinished."""
    current = _key(spec)
    if recorded == current:
        return True
    recorded = _as_now(recorded)
    unused = _unused_fields(spec)
    if unused and "recipe" in recorded:
        recorded = {**recorded, "recipe": _without(recorded["recipe"], unused)}
        current = {**current, "recipe": _without(current["recipe"], unused)}
        if recorded == current:
            return True
    # Spec fields added since the recording, at their defaults, count as the same too.
    current = {k: v for k, v in current.items() if k in recorded or v != _field_default(spec, k)}
    defaults = _key(Recipe())
    old = recorded.get("recipe", {})
    current["recipe"] = {
        k: v for k, v in current["recipe"].items() if k in old or v != defaults.get(k, object())
    }
    return recorded == current


def _without(recipe: dict, fields) -> dict:
    return {k: v for k, v in recipe.items() if k not in fields}


def load_study(results_dir: str) -> dict:
    path = os.path.join(results_dir, STUDY_JSON)
    if not os.path.exists(path):
        return {"schema": SCHEMA, "datasets": {}, "runs": {}}
    with open(path) as f:
        return json.load(f)


class _Study:
    def __init__(self, cfg: StudyConfig, plan: Plan, study: dict):
        self.cfg = cfg
        self.plan = plan
        self.study = study
        self._serving = None  # (ExitStack, export base, model name, {defence: URL}) in serving()
        self.num_classes = 0  # the target's (known to an attacker of a label-only API)

    @contextlib.contextmanager
    def serving(self, base: str, name: str):
        """While the block runs, url_for serves the target (export `base`/`name`) with any
        output defence, each server started on first use and all stopped at the end."""
        with contextlib.ExitStack() as stack:
            self._serving = (stack, base, name, {})
            try:
                yield
            finally:
                self._serving = None

    def url_for(self, defense: str, rate_limit_qps: float = 0.0) -> str:
        """The gRPC URL of the target served with `defense` ("none": as it is) and the
        rate limit `rate_limit_qps` (0: none)."""
        if self._serving is None:
            raise RuntimeError("url_for outside serving()")
        stack, base, name, urls = self._serving
        if (defense, rate_limit_qps) not in urls:
            tags = [slug(defense)] if defense != "none" else []
            tags += [f"rate_{slug(f'{rate_limit_qps:g}')}"] if rate_limit_qps else []
            log = "-".join(["model_server", *tags]) + ".log"
            flags = [f"--output_defense={defense}"]
            flags += [f"--rate_limit_qps={rate_limit_qps:g}"] if rate_limit_qps else []
            served = stack.enter_context(
                pipeline.served(base, name, os.path.join(self.cfg.workdir, log), *flags)
            )
            urls[defense, rate_limit_qps] = served.grpc_url
        return urls[defense, rate_limit_qps]

    def save(self) -> None:
        """Writes study.json and RESULTS.md. The parts this run planned get this plan's
        rows; the rows of parts it did not plan stay as recorded (a `--parts` run updates
        its parts and keeps the rest of the report)."""
        ran = self.cfg.parts
        before = [p for p in self.study.get("parts", []) if p in PARTS]
        parts = before + [p for p in ran if p not in before]  # sections keep their places
        kept = [
            r for r in self.study.get("rows", []) if r["group"] in parts and r["group"] not in ran
        ]
        rows = kept + [dataclasses.asdict(r) for r in self.plan.rows]
        self.study["rows"] = sorted(rows, key=lambda row: parts.index(row["group"]))
        if "defences" in ran or "timed" not in self.study:  # the rate limits' steals
            self.study["timed"] = [{"label": label, "dataset": d} for label, d in self.plan.timed]
        self.study["parts"] = parts
        atomic_write_json(os.path.join(self.cfg.results_dir, STUDY_JSON), self.study)
        results.write_results(self.cfg.results_dir, self.study)

    def _measured(self, fields: dict) -> dict:
        self.study["machine"] = _machine()
        self.study["command"] = self.cfg.command
        return {**fields, "measured": _today()}

    def target(self, summary: dict) -> None:
        test = summary["test"]
        entry = {
            "model": summary["model"],
            "pd_data": summary["pd_data"],
            "epochs": summary["epochs_done"],
            "best_epoch": summary["best_epoch"],
            "accuracy": test["accuracy"],
            "macro_f1": test["macro_f1"],
            "test_images": test["num_examples"],
            "train_seconds": summary.get("train_seconds"),
            "export_dir": summary["export_dir"],
        }
        old = self.study.get("target") or {}
        if {k: old.get(k) for k in entry} != entry:
            if old:  # rows measured before copied that one: it stays on record
                self.study.setdefault("earlier_targets", []).append(old)
            self.study["target"] = self._measured(entry)

    def refresh_keys(self) -> None:
        """Recorded keys that describe the plan's specs (same_key) but differ in fields the
        spec never reads, or in fields added since at their defaults, are rewritten as the
        current spec's: what was measured stays, and study.json shows the current recipe."""
        for table, specs in (("datasets", self.plan.datasets), ("runs", self.plan.runs)):
            for name, spec in specs.items():
                recorded = self.study[table].get(name)
                if recorded and recorded["key"] != _key(spec) and same_key(recorded["key"], spec):
                    recorded["key"] = _key(spec)

    def done(self, run: str) -> bool:
        recorded = self.study["runs"].get(run)
        return bool(recorded) and same_key(recorded["key"], self.plan.runs[run])

    def dataset(self, name: str) -> None:
        """Steals (or resumes) a dataset unless study.json holds it and it is on disk."""
        spec = self.plan.datasets[name]
        if self.on_record(name):
            return
        logging.info("study: stealing dataset %s (%s)", name, spec.recipe.resolved_npd())
        out = os.path.join(self.cfg.workdir, f"fake_{name}")
        m = pipeline.steal(
            spec.recipe,
            self.url_for(spec.defense, spec.rate_limit_qps),
            out,
            data_dir=self.cfg.data_dir,
            num_classes=self.num_classes,
            max_qps=spec.rate_limit_qps,
        )
        self._record(name, m)

    def on_record(self, name: str) -> bool:
        """Whether study.json records this spec's dataset and it is on disk. When the steal
        on disk is not the recorded one (the same spec stolen again where the recorded one
        was missing, e.g. on another machine), it is recorded as it is: runs from now on
        train on it."""
        spec = self.plan.datasets[name]
        recorded = self.study["datasets"].get(name)
        out = os.path.join(self.cfg.workdir, f"fake_{name}")
        m = fd.read_manifest(out) if os.path.isdir(out) else None
        if not (recorded and same_key(recorded["key"], spec) and m is not None):
            return False
        if m.get("label_histogram") != recorded.get("label_histogram"):
            logging.info("study: dataset %s on disk differs from its record; re-recorded", name)
            self._record(name, m)
        return True

    def refresh_datasets(self) -> None:
        """Every recorded dataset of the plan as it is on disk (see _on_record)."""
        for name in self.plan.datasets:
            self.on_record(name)

    def _record(self, name: str, m: dict) -> None:
        spec = self.plan.datasets[name]
        self.study["datasets"][name] = self._measured(
            {
                "key": _key(spec),
                "npd": spec.recipe.resolved_npd(),
                "crops_per_image": spec.recipe.crops_per_image,
                "label_mode": spec.recipe.label_mode,
                "query_budget": m["query_budget"],
                "queries_spent": m["queries_spent"],
                "status": m["status"],
                "skipped": m["skipped"]["count"],
                "label_histogram": m["label_histogram"],
                "label_statistics": m["label_statistics"],
                "steal_seconds": m["steal_seconds"],
                "requests": m.get("requests"),
                "transient_errors": m.get("transient_errors"),
            }
        )
        self.save()

    def _reuse_npd_stage(self, spec) -> None:
        """An NPD+PD run starts from the finished NPD stage of the run that has the same
        data and recipe: its checkpoints are copied, so only the fine-tuning trains (the
        trainer resumes after the last epoch)."""
        if not spec.pd_dataset:
            return
        same = RunSpec(spec.name, spec.dataset, spec.recipe, spec.max_records)
        root = self.cfg.workdir
        stage = os.path.join(root, spec.name, "npd")
        for other in self.plan.runs.values():
            source = os.path.join(root, other.name, "npd")
            if (
                dataclasses.replace(other, name=spec.name) == same
                and self.done(other.name)
                and os.path.isdir(source)
                and not os.path.exists(stage)
            ):
                logging.info("study: %s starts from the NPD stage of %s", spec.name, other.name)
                shutil.copytree(source, stage)
                return

    def defence_cost(self, defense: str, export_dir: str) -> None:
        """The defender's cost: the target's test accuracy through the defended API, and
        how often it still answers what the model computed (the undefended export)."""
        recorded = self.study.setdefault("defence_costs", {}).get(defense)
        key = {"export_dir": export_dir, "pd_data": self.cfg.pd_data}
        if recorded and recorded["key"] == key:
            return
        report = pipeline.evaluate(
            self.url_for(defense),
            export_dir,
            f"{self.cfg.pd_data}:test",
            os.path.join(self.cfg.workdir, "eval", f"defence_{slug(defense)}"),
            data_dir=self.cfg.data_dir,
        )
        self.study["defence_costs"][defense] = self._measured(
            {
                "key": key,
                "accuracy": report["target"]["accuracy"],
                "macro_f1": report["target"]["macro_f1"],
                "agreement": report["agreement"],
            }
        )
        self.save()

    def detector_due(self, traffic) -> bool:
        recorded = self.study.get("detector") or {}
        return recorded.get("key") != detection.traffic_key(
            traffic, self.cfg.recipe.query_batch_size
        )

    def detection(self, traffic, model_base_path: str, model_name: str) -> None:
        """The detector part (studies.detection), after the datasets it replays."""
        record = detection.run_detection(
            traffic,
            model_base_path,
            model_name,
            self.cfg.workdir,
            self.cfg.pd_data,
            self.cfg.recipe.query_batch_size,
            self.cfg.data_dir,
        )
        self.study["detector"] = self._measured(record)
        self.save()

    def run(self, name: str, class_names: list[str]) -> None:
        """Trains and evaluates a copycat (stealing its datasets first when needed); it is
        compared with the target as it is (served without a defence)."""
        spec = self.plan.runs[name]
        if self.done(name):
            return
        url = self.url_for("none")
        for dataset in (spec.dataset, spec.pd_dataset):
            if dataset:
                self.dataset(dataset)
        logging.info("study: copycat %s", name)
        root = self.cfg.workdir
        if name in self.study["runs"]:  # measured with other settings: start over
            logging.info("study: %s changed since it was measured; trained from scratch", name)
            for stale in (os.path.join(root, name), os.path.join(root, "models", name)):
                shutil.rmtree(stale, ignore_errors=True)
            del self.study["runs"][name]
        self._reuse_npd_stage(spec)
        summary = pipeline.train_copycat(
            spec.recipe,
            [os.path.join(root, f"fake_{spec.dataset}")],
            os.path.join(root, name),
            model_base_path=os.path.join(root, "models"),
            model_name=name,
            pd_fake_dataset=[os.path.join(root, f"fake_{spec.pd_dataset}")]
            if spec.pd_dataset
            else [],
            max_records=spec.max_records,
            class_names=class_names,
        )
        start = time.monotonic()
        report = pipeline.evaluate(
            url,
            summary["export_dir"],
            f"{self.cfg.pd_data}:test",
            os.path.join(root, "eval", name),
            data_dir=self.cfg.data_dir,
        )
        stages = summary["stages"]
        queries = stages["npd"]["records"]
        if spec.pd_dataset:
            queries += stages["finetune"]["records"]
        self.study["runs"][name] = self._measured(
            {
                "key": _key(spec),
                "dataset": spec.dataset,
                "pd_dataset": spec.pd_dataset,
                "queries": queries,
                "accuracy": report["copycat"]["accuracy"],
                "macro_f1": report["copycat"]["macro_f1"],
                "agreement": report["agreement"],
                "ratio_accuracy": report["ratio"]["accuracy"],
                "ratio_macro_f1": report["ratio"]["macro_f1"],
                "target_accuracy": report["target"]["accuracy"],
                "target_macro_f1": report["target"]["macro_f1"],
                "test_images": report["num_examples"],
                "stages": {
                    stage: {
                        "records": info["records"],
                        "best_epoch": info["best_epoch"],
                        "epochs_done": info["epochs_done"],
                        "heldout_agreement": info["heldout_agreement"],
                        "train_seconds": info["train_seconds"],
                        **{k: info[k] for k in ("augment", "invariance_probe") if k in info},
                    }
                    for stage, info in stages.items()
                },
                "evaluate_seconds": round(time.monotonic() - start, 1),
            }
        )
        self.save()


def run_study(cfg: StudyConfig, flags_text: str = "") -> dict:
    """Runs (or resumes) the study; writes study.json, RESULTS.md and plots into
    cfg.results_dir; returns the study record.

    Raises:
      UserInputError: bad data, NPD spec, target or directories (from the steps).
    """
    plan = build_plan(
        PlanSettings(
            recipe=cfg.recipe,
            budgets=tuple(cfg.budgets),
            variant_budget=cfg.variant_budget,
            data_free=cfg.data_free,
            pd_budget=cfg.pd_budget,
            pd_data=cfg.pd_data,
            parts=tuple(cfg.parts),
            selection_budgets=tuple(cfg.selection_budgets),
            selections=tuple(cfg.selections),
            selection_full=tuple(cfg.selection_full),
            defences=tuple(cfg.defences),
            defence_budget=cfg.defence_budget,
            rate_limits=tuple(cfg.rate_limits),
        )
    )
    os.makedirs(cfg.results_dir, exist_ok=True)
    study = load_study(cfg.results_dir)
    study["name"] = cfg.name
    runner = _Study(cfg, plan, study)
    if cfg.render_only:
        runner.save()  # rows from this plan, measurements from study.json
        return study
    init_workdir(
        cfg.workdir, {"verb": "study", "name": cfg.name, "pd_data": cfg.pd_data}, flags_text
    )
    runner.refresh_keys()
    runner.refresh_datasets()
    todo = [run for run in plan.runs if not runner.done(run)]
    traffic = []
    if "detector" in cfg.parts:
        traffic = detection.plan_traffic(
            plan, cfg.recipe.query_budget, cfg.pd_data, cfg.detector_benign_images
        )
    detector_due = bool(traffic) and runner.detector_due(traffic)
    costs_due = "defences" in cfg.parts and any(
        d not in study.get("defence_costs", {}) for d in cfg.defences
    )
    timed_due = [d for _, d in plan.timed if not runner.on_record(d)]
    if not todo and not detector_due and not costs_due and not timed_due and study.get("target"):
        runner.save()  # everything measured: RESULTS.md from study.json alone
        return study
    target = pipeline.ensure_target(
        cfg.target_workdir,
        cfg.model_base_path,
        cfg.pd_data,
        cfg.target_recipe,
        data_dir=cfg.data_dir,
    )
    runner.target(target)
    runner.num_classes = len(target["class_names"])
    base, name = os.path.split(os.path.dirname(target["export_dir"]))
    with runner.serving(base, name):
        for dataset in timed_due:  # minutes, first, back to back: their times compare
            # A partial steal on disk would resume and time only its rest: stolen anew.
            shutil.rmtree(os.path.join(cfg.workdir, f"fake_{dataset}"), ignore_errors=True)
            runner.dataset(dataset)
        if "defences" in cfg.parts:
            for defense in cfg.defences:
                runner.defence_cost(defense, target["export_dir"])
        for run in todo:
            runner.run(run, target["class_names"])
        if detector_due:
            for dataset in sorted({t.dataset for t in traffic if t.dataset}):
                runner.dataset(dataset)
    if detector_due:
        runner.detection(traffic, base, name)
    runner.save()
    return study
