"""What a study measures: fake datasets to steal, copycats to train, rows to report.

A study is a plan of three kinds of things:

  DatasetSpec  one steal (its recipe's NPD, budget, crops, label mode, seed)
  RunSpec      one copycat trained on a dataset (optionally NPD+PD), then evaluated
  Row          one line of a results table: a group (part), a label and the run it shows

Several rows may show the same run (the 50k natural-NPD copycat is the paper table's NPD
row, a point of the budget curve and the reference of the other comparisons), and several
runs may train on the same dataset (a budget curve trains on the first N queries of one
steal), so nothing is stolen or trained twice.
"""

from __future__ import annotations

import dataclasses
import math

from copycat_tf.attack.selection import SELECTIONS
from copycat_tf.data.augment import AUTO
from copycat_tf.data.generators import GENERATOR_NAMES
from copycat_tf.data.preparation import JITTER_ON
from copycat_tf.recipe import Recipe

# The parts a study can run, in report order, with their titles.
PARTS = {
    "table": "The paper's table",
    "budget": "Query-budget curve (NPD only)",
    "sources": "NPD sources",
    "preparation": "NPD preparation",
    "generators": "Data-free generators",
    "label_modes": "Label modes",
    "balance": "Class balancing",
    "copycat": "Copycat recipes: accuracy against training time",
    "selection": "Query selection: rounds chosen by a scout copycat, against random order",
    "defaults": "The recipe's defaults: the attack as steal and train_copycat run it unflagged",
    "defences": "Output defences: the copy against each served defence and label mode",
    "detector": "Extraction detector: queries until a client is flagged",
}

# The defences part's served output defences (model_server --output_defense): reverse
# sigmoid with Lee et al.'s (2019) beta=0.7, gamma=0.4 and a stronger one.
DEFENCES = (
    "none",
    "top1",
    "topk:3",
    "round:1",
    "reverse_sigmoid:0.7,0.4",
    "reverse_sigmoid:1.0,0.2",
    "gaussian:0.1",
    "gaussian:0.3",
)
DEFENCE_LABEL_MODES = ("hard", "scores", "topk:3")
# The defences part's served rate limits (model_server --rate_limit_qps, requests per
# second per client), each against the same steal unlimited: what a limit costs an attacker
# in wall time (the copy is the same: the same queries get the same answers).
RATE_LIMITS = (2.0, 1.0)


# The selection part's defaults: strategies (each against random order) and budgets.
# Every query selection but random (the reference each is compared to).
SELECTION_STRATEGIES = tuple(s for s in SELECTIONS if s != "random")
SELECTION_BUDGETS = (5000, 10000)


def copycat_variants(base: Recipe) -> tuple:
    """Other copycat trainings than the recipe's (cheaper ones, augmentation), on the same
    stolen labels."""
    half = max(1, base.epochs // 2)
    return (
        ("plain", "`plain_cnn`", {"model": "plain_cnn"}),
        ("half_epochs", f"{half} epochs", {"epochs": half}),
        (
            "fastest",
            f"`plain_cnn`, balance=resample, {half} epochs",
            {"model": "plain_cnn", "balance": "resample", "epochs": half},
        ),
        (
            "augment",
            "on-the-fly augmentation of the stolen images (`flip_translate`)",
            {"augment": "flip_translate"},
        ),
        # The recipe's copycat once more: its row beside the reference shows the spread of
        # two trainings (and, where the reference was measured against an earlier steal,
        # the recipe on the steal the rows after it trained on).
        ("again", "the recipe's copycat, trained again", {}),
        ("flip", "horizontal flips of the stolen images (`--augment=flip`)", {"augment": "flip"}),
        ("mixup", "mixup of the stolen images (`--mixup=0.2`)", {"mixup": 0.2}),
    )


# The copycat part's invariance-probe steal: the probe (data.invariance) with the
# preparation of the recipe's defaults (the study's reference pins the older canvas jitter).
PROBE_ROW = {"npd_jitter_on": "picture", "invariance_probe": 512}


# Preparation variants against the recipe's: (name, row label, recipe fields).
PREPARATION_VARIANTS = (
    (
        "white",
        "transparency over white, no inversion/jitter/blur, crops 25-100% (before preparation)",
        {
            "npd_background": "white",
            "npd_invert": 0.0,
            "npd_jitter": 0.0,
            "npd_blur": 0.0,
            "npd_crop_area": "0.25,1.0",
        },
    ),
    (
        "black",
        "transparency over black, no inversion/jitter/blur, crops 25-100%",
        {
            "npd_background": "black",
            "npd_invert": 0.0,
            "npd_jitter": 0.0,
            "npd_blur": 0.0,
            "npd_crop_area": "0.25,1.0",
        },
    ),
    ("no_adapt", "no adaptation: arms keep their base weights", {"npd_adapt_after": 0}),
    ("no_invert", "no polarity inversion", {"npd_invert": 0.0}),
    ("no_jitter_blur", "no jitter, no blur", {"npd_jitter": 0.0, "npd_blur": 0.0}),
    ("crops_25", "crops of 25-100% of the picture", {"npd_crop_area": "0.25,1.0"}),
)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A fake dataset: `recipe`'s NPD spec, budget, crops, label mode and seed, stolen
    from the target served with the output defence `defense` and the rate limit
    `rate_limit_qps` (0: none; the attacker then sends at most that many requests per
    second, as a client of a documented limit does)."""

    name: str
    recipe: Recipe
    defense: str = "none"
    rate_limit_qps: float = 0.0


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """A copycat: `recipe`'s training on `dataset` (its first `max_records` queries, 0 =
    all), fine-tuned on `pd_dataset` when set."""

    name: str
    dataset: str
    recipe: Recipe
    max_records: int = 0
    pd_dataset: str = ""


@dataclasses.dataclass(frozen=True)
class Row:
    """A line of the results table of `group`."""

    group: str
    label: str
    run: str


@dataclasses.dataclass
class Plan:
    """Datasets, runs and rows of a study, in the order they were added."""

    datasets: dict[str, DatasetSpec] = dataclasses.field(default_factory=dict)
    runs: dict[str, RunSpec] = dataclasses.field(default_factory=dict)
    rows: list[Row] = dataclasses.field(default_factory=list)
    # (label, dataset) of steals timed for their own sake (the rate limits), no copycat.
    timed: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def dataset(
        self, name: str, recipe: Recipe, defense: str = "none", rate_limit_qps: float = 0.0
    ) -> str:
        """Adds a dataset; the same name again must mean the same steal (the largest
        budget asked for wins, so smaller budgets train on its first queries)."""
        old = self.datasets.get(name)
        if old is not None:
            same = dataclasses.replace(old.recipe, query_budget=recipe.query_budget)
            if (
                _steal_fields(same) != _steal_fields(recipe)
                or old.defense != defense
                or old.rate_limit_qps != rate_limit_qps
            ):
                raise ValueError(f"dataset {name!r} planned twice with different steals")
            if recipe.query_budget <= old.recipe.query_budget:
                return name
        self.datasets[name] = DatasetSpec(name, recipe, defense, rate_limit_qps)
        return name

    def run(self, spec: RunSpec) -> str:
        """Adds a run; the same name again must be the same run."""
        old = self.runs.get(spec.name)
        if old is not None and old != spec:
            raise ValueError(f"run {spec.name!r} planned twice with different settings")
        self.runs[spec.name] = spec
        return spec.name

    def row(self, group: str, label: str, run: str) -> None:
        self.rows.append(Row(group, label, run))


def _steal_fields(recipe: Recipe) -> tuple:
    return (
        recipe.resolved_npd(),
        recipe.crops_per_image,
        recipe.label_mode,
        recipe.seed,
        recipe.query_batch_size,
        recipe.selection,
        recipe.selection_round,
    )


@dataclasses.dataclass(frozen=True)
class PlanSettings:
    """The knobs of the standard parts.

    Attributes:
      recipe: the attack everything is compared to.
      budgets: query budgets of the budget curve.
      variant_budget: query budget of the preparation, generator and label-mode
        comparisons (each against the reference recipe at the same budget).
      data_free: the generator of the data-free row of the sources part.
      pd_budget: target-labelled PD images of the NPD+PD and PD-only rows.
      pd_data: the problem domain.
      parts: which parts to plan (keys of PARTS).
      selection_budgets: query budgets of the selection part (each strategy against the
        random order at the same budget).
      selections: the strategies of the selection part.
      selection_full: strategies of the selection part also run at the recipe's budget
        (against the reference steal's random order).
      defences: the served output defences of the defences part.
      defence_budget: its query budget (0: the recipe's).
      rate_limits: the served rate limits of the defences part (requests per second).
    """

    recipe: Recipe
    budgets: tuple[int, ...]
    variant_budget: int
    data_free: str
    pd_budget: int
    pd_data: str
    parts: tuple[str, ...]
    selection_budgets: tuple[int, ...] = SELECTION_BUDGETS
    selections: tuple[str, ...] = SELECTION_STRATEGIES
    selection_full: tuple[str, ...] = ()
    defences: tuple[str, ...] = DEFENCES
    defence_budget: int = 0
    rate_limits: tuple[float, ...] = RATE_LIMITS


def _k(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def parse_selection(entry: str) -> tuple[str, float]:
    """A selection part entry: `STRATEGY` or `STRATEGY:SHARE`, the share of each round drawn
    at random (steal --selection_random); returns (strategy, share).

    Raises:
      ValueError: not a strategy other than random, or a share outside (0, 1).
    """
    name, sep, share_text = entry.partition(":")
    if name not in SELECTIONS or name == "random":
        raise ValueError(f"unknown strategy {name!r}")
    if not sep:
        return name, 0.0
    try:
        share = float(share_text)
    except ValueError:
        share = -1.0
    if not 0.0 < share < 1.0:
        raise ValueError(f"{entry!r}: the share after ':' must be a number in (0, 1)")
    return name, share


def selection_name(entry: str) -> str:
    """A selection entry's part of run names: class_balance:0.5 -> class_balance_r50."""
    name, share = parse_selection(entry)
    return name if not share else f"{name}_r{round(100 * share):02d}"


def check_settings(parts, selections, selection_full, defences, rate_limits=()) -> None:
    """The study's flags that name parts, strategies, defences and rate limits, checked
    before anything runs.

    Raises:
      UserInputError: an unknown part or strategy, a defence spec the model server would
        refuse, or a rate limit that is not a positive number; the message names the flag.
    """
    from copycat_tf.errors import UserInputError
    from copycat_tf.server.defenses import parse_defense

    bad = []
    for entry in (*selections, *selection_full):
        try:
            parse_selection(entry)
        except ValueError as e:
            bad.append(str(e))
    if bad:
        raise UserInputError(
            f"--selections / --selection_full: {'; '.join(bad)}; expected STRATEGY or "
            f"STRATEGY:SHARE (a share of each round drawn at random, e.g. class_balance:0.5), "
            f"STRATEGY one of {', '.join(SELECTIONS[1:])} (random is the reference every "
            "strategy is compared to)"
        )
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise UserInputError(f"--parts: unknown {unknown}; valid: {', '.join(PARTS)}")
    for spec in defences:
        try:
            parse_defense(spec)
        except ValueError as e:
            raise UserInputError(str(e).replace("--output_defense", "--defences")) from e
    for qps in rate_limits:
        try:
            ok = float(qps) > 0 and math.isfinite(float(qps))
        except ValueError:
            ok = False
        if not ok:
            raise UserInputError(
                f"--rate_limits: {qps!r} is not a positive number of requests per second "
                "(e.g. --rate_limits=2,1)"
            )


def build_plan(s: PlanSettings) -> Plan:
    """The plan of the standard parts (see PARTS).

    Raises:
      UserInputError: settings check_settings refuses.
    """
    check_settings(s.parts, s.selections, s.selection_full, s.defences, s.rate_limits)
    plan = Plan()
    base = s.recipe
    budget = base.query_budget
    natural = plan.dataset(
        "natural", dataclasses.replace(base, query_budget=max((budget, *s.budgets)))
    )

    def npd_run(n: int) -> str:
        return plan.run(RunSpec(f"npd_{_k(n)}", natural, base, max_records=n))

    reference = npd_run(budget)
    if "table" in s.parts:
        pd_recipe = dataclasses.replace(
            base, npd=f"pd:{s.pd_data}:train", query_budget=s.pd_budget, crops_per_image=1
        )
        pd = plan.dataset("pd", pd_recipe)
        plan.row("table", "copycat, NPD only", reference)
        plan.row(
            "table",
            "copycat, NPD+PD",
            plan.run(RunSpec("npd_pd", natural, base, max_records=budget, pd_dataset=pd)),
        )
        plan.row("table", "PD-only baseline", plan.run(RunSpec("pd_only", pd, pd_recipe)))
    if "budget" in s.parts:
        for n in sorted(s.budgets):
            plan.row("budget", f"{n:,} queries", npd_run(n))
    if "sources" in s.parts:
        plan.row("sources", f"natural: `{base.resolved_npd()}`", reference)
        recipe = dataclasses.replace(base, npd=f"synthetic:{s.data_free}")
        data = plan.dataset("src_data_free", recipe)
        run = plan.run(RunSpec("src_data_free", data, recipe))
        plan.row("sources", f"data-free: `{recipe.npd}`", run)
    small = dataclasses.replace(base, query_budget=s.variant_budget)

    def variant(part: str, prefix: str, name: str, label: str, recipe: Recipe) -> str:
        """Plans a steal and its copycat under one name; returns the dataset's name."""
        data = plan.dataset(f"{prefix}_{name}", recipe)
        plan.row(part, label, plan.run(RunSpec(f"{prefix}_{name}", data, recipe)))
        return data

    if "preparation" in s.parts:
        plan.row("preparation", "the reference attack's preparation", npd_run(s.variant_budget))
        plan.row(
            "preparation", f"the reference attack's preparation, {budget:,} queries", reference
        )
        for name, label, fields in PREPARATION_VARIANTS:
            variant("preparation", "prep", name, label, dataclasses.replace(small, **fields))
        # The other side of the jitter knob at the variant budget and at the reference's
        # (one steal of the larger budget serves both).
        other = next(on for on in JITTER_ON if on != base.npd_jitter_on)
        recipe = dataclasses.replace(base, npd_jitter_on=other)
        data = plan.dataset(f"prep_jitter_on_{other}", recipe)
        label = f"jitter on the {other} (`--npd_jitter_on={other}`)"
        for n, name in ((s.variant_budget, ""), (budget, f"_{_k(budget)}")):
            run = RunSpec(f"prep_jitter_on_{other}{name}", data, recipe, max_records=n)
            plan.row("preparation", f"{label}, {n:,} queries", plan.run(run))
    if "generators" in s.parts:
        plan.row("generators", f"natural: `{base.resolved_npd()}`", npd_run(s.variant_budget))
        for name in GENERATOR_NAMES:
            recipe = dataclasses.replace(small, npd=f"synthetic:{name}")
            variant("generators", "gen", name, f"`synthetic:{name}`", recipe)
        mix = f"mix:0.5*{base.resolved_npd()}|0.5*synthetic:{s.data_free}"
        variant("generators", "gen", "mix", f"`{mix}`", dataclasses.replace(small, npd=mix))
    if "label_modes" in s.parts:
        plan.row("label_modes", "hard labels (top-1)", npd_run(s.variant_budget))
        for mode in ("topk:3", "scores"):
            recipe = dataclasses.replace(small, label_mode=mode)
            name = mode.replace(":", "")
            variant("label_modes", "labels", name, f"`{mode}` (soft labels: distillation)", recipe)
    if "copycat" in s.parts:
        plan.row("copycat", "the recipe's copycat", reference)
        for name, label, fields in copycat_variants(base):
            recipe = dataclasses.replace(base, **fields)
            run = RunSpec(f"copycat_{name}", natural, recipe, max_records=budget)
            plan.row("copycat", label, plan.run(run))
        # The invariance probe on a steal of its own (the preparation of today's defaults):
        # what --augment=auto chose against the same steal without augmentation.
        recipe = dataclasses.replace(base, **PROBE_ROW)
        data = plan.dataset("probe", recipe)
        knobs = ", ".join(f"`--{f}={v}`" for f, v in PROBE_ROW.items())
        for augment in (AUTO, "none"):
            run = RunSpec(
                f"copycat_probe_{augment}",
                data,
                dataclasses.replace(recipe, augment=augment),
                max_records=budget,
            )
            label = f"invariance probe ({knobs}), `--augment={augment}`"
            plan.row("copycat", label, plan.run(run))
    if "balance" in s.parts:
        plan.row("balance", f"balance={base.balance}", reference)
        for mode in ("replicate", "resample", "none"):
            if mode != base.balance:
                recipe = dataclasses.replace(base, balance=mode)
                run = RunSpec(f"balance_{mode}", natural, recipe, max_records=budget)
                plan.row("balance", f"balance={mode}", plan.run(run))
    if "selection" in s.parts:
        strategies = {n: list(s.selections) for n in s.selection_budgets}
        for name in s.selection_full:
            strategies.setdefault(budget, [])
            if name not in strategies[budget]:
                strategies[budget].append(name)
        random_run = npd_run
        if base.selection != "random":  # the reference of every strategy: its own steal
            recipe = dataclasses.replace(
                base, selection="random", selection_random=0.0, query_budget=max(strategies)
            )
            data = plan.dataset("sel_random", recipe)

            def random_run(n: int) -> str:
                return plan.run(RunSpec(f"sel_random_{_k(n)}", data, recipe, max_records=n))

        for n in sorted(strategies):
            plan.row("selection", f"random order, {n:,} queries", random_run(n))
            for entry in strategies[n]:
                name, share = parse_selection(entry)
                recipe = dataclasses.replace(
                    base, query_budget=n, selection=name, selection_random=share
                )
                flag = f"--selection={name}" + (f" --selection_random={share:g}" if share else "")
                label = f"`{flag}`, {n:,} queries"
                variant("selection", "sel", f"{selection_name(entry)}_{_k(n)}", label, recipe)
    if "defaults" in s.parts:
        # Recipe() as shipped, whatever the study pins for its reference (only the NPD
        # source, the seed and the runtime precision are the study's): a steal per budget,
        # since a selection's rounds are sized by its budget.
        for n in sorted({*s.selection_budgets, budget}):
            recipe = dataclasses.replace(
                Recipe(), npd=base.npd, seed=base.seed, precision=base.precision, query_budget=n
            )
            if recipe == base:
                plan.row("defaults", f"{n:,} queries (the reference attack)", reference)
                continue
            data = variant("defaults", "defaults", _k(n), f"{n:,} queries", recipe)
            if recipe.model != base.model:
                # The reference's copycat on the same steal: the architecture's own effect,
                # like for like (trainings of other steals differ by a few points).
                other = dataclasses.replace(recipe, model=base.model)
                run = RunSpec(f"{data}_{slug(base.model)}", data, other)
                plan.row("defaults", f"{n:,} queries, `--model={base.model}`", plan.run(run))
        # The same recipe data-free: the data-free generator for NPD, the whole budget.
        free = dataclasses.replace(
            Recipe(),
            npd=f"synthetic:{s.data_free}",
            seed=base.seed,
            precision=base.precision,
            query_budget=budget,
        )
        if free.npd != base.npd:
            label = f"data-free (`{free.npd}`), {budget:,} queries"
            variant("defaults", "defaults", f"data_free_{_k(budget)}", label, free)
    if "defences" in s.parts:
        n = s.defence_budget or budget
        for defense in s.defences:
            for mode in DEFENCE_LABEL_MODES:
                if mode != "hard" and defense == "top1":
                    continue  # answers without scores: only the label can be kept
                label = f"`{defense}`, {mode} labels"
                if defense == "none" and mode == "hard":
                    # The reference's queries (an undefended steal), trained in the matrix's
                    # own pass: trainings of the same data in different sessions differ by
                    # a few points, as much as some defences' effects.
                    run = RunSpec(f"def_none_hard_{_k(n)}", natural, base, max_records=n)
                    plan.row("defences", label, plan.run(run))
                    continue
                recipe = dataclasses.replace(base, query_budget=n, label_mode=mode)
                name = f"def_{slug(defense)}_{slug(mode)}_{_k(n)}"
                data = plan.dataset(name, recipe, defense)
                plan.row("defences", label, plan.run(RunSpec(name, data, recipe)))
        # Rate limits: the same steal (hard labels) unlimited and under each limit, timed
        # one after the other.
        recipe = dataclasses.replace(base, query_budget=n, label_mode="hard")
        for qps in (0.0, *s.rate_limits):
            name = f"rate_{slug(f'{qps:g}') if qps else 'none'}_{_k(n)}"
            label = f"`--rate_limit_qps={qps:g}`" if qps else "no rate limit"
            plan.timed.append((label, plan.dataset(name, recipe, rate_limit_qps=qps)))
    return plan


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")
