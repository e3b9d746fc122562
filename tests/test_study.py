"""The study: its plan, its write-up, and a tiny study end to end (results written by code)."""

import dataclasses
import json
import os

import pytest
from cli_util import run_verb

from copycat_tf.recipe import Recipe
from copycat_tf.studies import results
from copycat_tf.studies.plan import PARTS, PlanSettings, build_plan

# The study's reference attack as experiments/fashion_mnist/study.flags pins it: NPD items
# in random order (the recipe's default is a query selection).
ORDERED = Recipe(npd="synthetic:noise", query_budget=1000, selection="random", selection_random=0)


def test_plan_steals_and_trains_nothing_twice():
    settings = PlanSettings(
        recipe=ORDERED,
        budgets=(500, 1000, 2000),
        variant_budget=500,
        data_free="shapes",
        pd_budget=300,
        pd_data="fashion_mnist",
        parts=tuple(PARTS),
        selection_budgets=(500, 1000),
    )
    plan = build_plan(settings)
    # One natural steal of the largest budget serves the whole curve and the comparisons.
    assert plan.datasets["natural"].recipe.query_budget == 2000
    assert plan.datasets["pd"].recipe.crops_per_image == 1
    assert plan.runs["npd_500"].max_records == 500
    reference = [row for row in plan.rows if row.run == "npd_1k"]
    assert {row.group for row in reference} == {
        "table",
        "budget",
        "sources",
        "balance",
        "copycat",
        "selection",
        "preparation",
    }
    # Comparisons at the variant budget share the reference recipe's first 500 queries.
    small = {row.group for row in plan.rows if row.run == "npd_500"}
    assert small == {"budget", "preparation", "generators", "label_modes", "selection"}
    # Each selection strategy steals its own dataset per budget (rounds follow the budget).
    chosen = plan.datasets["sel_kcenter_1k"].recipe
    assert (chosen.selection, chosen.query_budget) == ("kcenter", 1000)
    assert {f"sel_{s}_500" for s in ("class_balance", "entropy", "kcenter")} <= set(plan.runs)
    assert plan.datasets["prep_white"].recipe.npd_background == "white"
    # The other side of the jitter knob, whichever the reference uses.
    assert plan.datasets["prep_jitter_on_canvas"].recipe.npd_jitter_on == "canvas"
    assert plan.runs["prep_jitter_on_canvas"].max_records == 500
    assert plan.runs["prep_jitter_on_canvas_1k"].max_records == 1000
    pinned = dataclasses.replace(settings, recipe=Recipe(npd="x", npd_jitter_on="canvas"))
    assert "prep_jitter_on_picture_50k" in build_plan(pinned).runs
    assert plan.datasets["gen_leaves"].recipe.npd == "synthetic:leaves"
    assert plan.runs["labels_scores"].recipe.label_mode == "scores"
    assert plan.runs["npd_pd"].pd_dataset == "pd"
    assert {"balance_resample", "balance_none"} <= set(plan.runs)
    assert len(plan.runs) == len(set(plan.runs))
    # Every row is filed under the part that planned it (the report's sections); the
    # detector part trains nothing: it has no rows (studies.detection).
    assert {row.group for row in plan.rows} == set(PARTS) - {"detector"}
    assert plan.runs["copycat_augment"].recipe.augment == "flip_translate"
    assert plan.runs["copycat_mixup"].recipe.mixup > 0
    # The invariance probe: a steal of its own, --augment=auto against none on it.
    probe = plan.datasets["probe"].recipe
    assert (probe.invariance_probe, probe.npd_jitter_on) == (512, "picture")
    assert plan.runs["copycat_probe_auto"].recipe.augment == "auto"
    assert plan.runs["copycat_probe_none"].recipe.augment == "none"
    assert plan.runs["copycat_probe_none"].dataset == "probe"
    # Defences: each served defence x label mode its own steal; top1 answers carry no
    # scores; the undefended hard-label row trains on the reference's first queries (a
    # training of its own, in the matrix's pass).
    assert plan.datasets["def_top1_hard_1k"].defense == "top1"
    assert "def_top1_scores_1k" not in plan.datasets
    assert plan.datasets["def_reverse_sigmoid_0_7_0_4_scores_1k"].recipe.label_mode == "scores"
    undefended = plan.runs[next(r.run for r in plan.rows if r.group == "defences")]
    assert (undefended.name, undefended.dataset, undefended.max_records) == (
        "def_none_hard_1k",
        "natural",
        1000,
    )
    by_run = {row.run: row.group for row in plan.rows}
    assert by_run["prep_white"] == "preparation" and by_run["gen_mix"] == "generators"
    assert by_run["labels_topk3"] == "label_modes"
    # The recipe as shipped, whatever the reference pins: a steal per budget.
    shipped = plan.datasets["defaults_1k"].recipe
    assert shipped == dataclasses.replace(Recipe(), npd="synthetic:noise", query_budget=1000)
    assert plan.datasets["defaults_500"].recipe.query_budget == 500
    # A reference pinned to another copycat: that copycat also trains on each of the
    # defaults' steals (the architecture's effect, like for like).
    pinned = dataclasses.replace(settings, recipe=dataclasses.replace(ORDERED, model="plain_cnn"))
    plan = build_plan(pinned)
    other = plan.runs["defaults_1k_plain_cnn"]
    assert (other.dataset, other.recipe.model) == ("defaults_1k", "plain_cnn")
    assert plan.runs["defaults_1k"].recipe.model == Recipe().model
    assert ("1,000 queries, `--model=plain_cnn`", "defaults_1k_plain_cnn") in [
        (row.label, row.run) for row in plan.rows if row.group == "defaults"
    ]


def test_a_study_of_the_default_recipe_compares_selections_with_a_random_order_steal():
    """With the recipe's default (a query selection) as the reference, random order gets a
    steal of its own in the selection part, and the defaults part is the reference."""
    settings = PlanSettings(
        recipe=Recipe(npd="synthetic:noise", query_budget=1000),
        budgets=(1000,),
        variant_budget=500,
        data_free="shapes",
        pd_budget=300,
        pd_data="fashion_mnist",
        parts=("selection", "defaults"),
        selections=("entropy",),
        selection_budgets=(500,),
    )
    plan = build_plan(settings)
    assert [(row.label, row.run) for row in plan.rows] == [
        ("random order, 500 queries", "sel_random_500"),
        ("`--selection=entropy`, 500 queries", "sel_entropy_500"),
        ("500 queries", "defaults_500"),
        ("1,000 queries (the reference attack)", "npd_1k"),
        ("data-free (`synthetic:shapes`), 1,000 queries", "defaults_data_free_1k"),
    ]
    free = plan.datasets["defaults_data_free_1k"].recipe
    assert free == dataclasses.replace(Recipe(), npd="synthetic:shapes", query_budget=1000)
    ordered = plan.datasets["sel_random"].recipe
    assert (ordered.selection, ordered.selection_random, ordered.query_budget) == (
        "random",
        0.0,
        500,
    )
    assert plan.runs["sel_random_500"].max_records == 500


def test_selection_full_runs_a_strategy_at_the_recipe_budget_too():
    settings = dict(
        recipe=ORDERED,
        budgets=(500, 1000),
        variant_budget=500,
        data_free="shapes",
        pd_budget=300,
        pd_data="fashion_mnist",
        parts=("selection",),
        selections=("entropy", "kcenter"),
    )
    plan = build_plan(
        PlanSettings(**settings, selection_budgets=(500,), selection_full=("kcenter",))
    )
    rows = [(row.label, row.run) for row in plan.rows]
    assert rows == [
        ("random order, 500 queries", "npd_500"),
        ("`--selection=entropy`, 500 queries", "sel_entropy_500"),
        ("`--selection=kcenter`, 500 queries", "sel_kcenter_500"),
        ("random order, 1,000 queries", "npd_1k"),
        ("`--selection=kcenter`, 1,000 queries", "sel_kcenter_1k"),
    ]
    assert plan.datasets["sel_kcenter_1k"].recipe.query_budget == 1000
    # A budget already in the part is not planned twice.
    again = build_plan(
        PlanSettings(**settings, selection_budgets=(500, 1000), selection_full=("kcenter",))
    )
    assert [r.run for r in again.rows].count("sel_kcenter_1k") == 1


def test_selection_entries_with_a_random_share_plan_their_own_steals():
    plan = build_plan(
        PlanSettings(
            recipe=ORDERED,
            budgets=(1000,),
            variant_budget=500,
            data_free="shapes",
            pd_budget=300,
            pd_data="fashion_mnist",
            parts=("selection",),
            selections=("class_balance", "class_balance:0.5"),
            selection_budgets=(500,),
            selection_full=("class_balance:0.5",),
        )
    )
    rows = [(row.label, row.run) for row in plan.rows]
    assert rows == [
        ("random order, 500 queries", "npd_500"),
        ("`--selection=class_balance`, 500 queries", "sel_class_balance_500"),
        (
            "`--selection=class_balance --selection_random=0.5`, 500 queries",
            "sel_class_balance_r50_500",
        ),
        ("random order, 1,000 queries", "npd_1k"),
        (
            "`--selection=class_balance --selection_random=0.5`, 1,000 queries",
            "sel_class_balance_r50_1k",
        ),
    ]
    hybrid = plan.datasets["sel_class_balance_r50_1k"].recipe
    assert (hybrid.selection, hybrid.selection_random, hybrid.query_budget) == (
        "class_balance",
        0.5,
        1000,
    )
    assert plan.datasets["sel_class_balance_500"].recipe.selection_random == 0.0


def _run(**fields):
    return {
        "key": {"recipe": {"npd": "synthetic:noise", "epochs": 1}},
        "queries": 500,
        "accuracy": 0.45,
        "macro_f1": 0.4,
        "agreement": 0.5,
        "ratio_accuracy": 0.5,
        "ratio_macro_f1": 0.5,
        "stages": {"npd": {"records": 500, "train_seconds": 12.0}},
        "evaluate_seconds": 1.0,
        "measured": "2026-11-30",
        **fields,
    }


def test_render_tables_and_plot(tmp_path):
    study = {
        "name": "tiny",
        "command": "python -m copycat_tf.study --flagfile=x.flags",
        "machine": {"cores": 2, "cpu": "cpu", "gpus": 0, "tensorflow": "2.21.0", "python": "3"},
        "target": {
            "model": "small_cnn",
            "pd_data": "fashion_mnist",
            "epochs": 2,
            "best_epoch": 2,
            "accuracy": 0.9,
            "macro_f1": 0.8,
            "test_images": 40,
            "train_seconds": 30.0,
        },
        "datasets": {},
        "runs": {"a": _run(), "b": _run(queries=1000, accuracy=0.6, ratio_accuracy=0.6667)},
        "rows": [
            {"group": "budget", "label": "500 queries", "run": "a"},
            {"group": "budget", "label": "1,000 queries", "run": "b"},
            {"group": "budget", "label": "2,000 queries", "run": "c"},
        ],
        "parts": ["budget"],
    }
    (tmp_path / results.PREFACE_MD).write_text("Hand-written context.\n")
    results.write_results(str(tmp_path), study)
    text = (tmp_path / results.RESULTS_MD).read_text()
    assert text.startswith("# Results: tiny\n\nHand-written context.\n")
    assert "python -m copycat_tf.study --flagfile=x.flags" in text
    assert "| target | - | 0.9000 | 0.8000 | - | - | - | 30 s |" in text
    assert "| 1,000 queries | 500 | 0.6000 | 0.4000 | 0.5000 | 66.7% | 50.0% | 12 s |" in text
    assert "![query-budget curve](budget_curve.png)" in text
    assert "Not measured yet (the command above resumes here): 2,000 queries." in text
    png = (tmp_path / results.BUDGET_PLOT).read_bytes()
    results.write_results(str(tmp_path), study)
    assert (tmp_path / results.BUDGET_PLOT).read_bytes() == png  # deterministic plot
    assert not (tmp_path / results.SELECTION_PLOT).exists()  # no selection part
    # A retrained target: the earlier one stays on record, rows keep their own ratios.
    earlier = {**study["target"], "accuracy": 0.91, "measured": "2026-11-30"}
    study["target"] = {**study["target"], "measured": "2026-12-06"}
    study["earlier_targets"] = [earlier]
    text = results.render(study, "")
    assert "| 2 (best 2) | 0.9000 | 0.8000 | 30 s | 2026-12-06 |" in text
    assert "| 2 (best 2) | 0.9100 | 0.8000 | 30 s | 2026-11-30 |" in text
    assert "Every ratio is against the target that row copied." in text
    assert "| 1,000 queries | 500 | 0.6000 | 0.4000 | 0.5000 | 66.7% | 50.0% | 12 s |" in text


def test_rendering_does_not_depend_on_the_order_of_the_records():
    # The run that measures holds its dicts in measurement order; study.json reads back in
    # key order. 2.8 + 5.1 + 1.8 + 10.8 is 20.5 one way and 20.500000000000004 the other:
    # a naive total printed "20 s" after measuring and "21 s" when re-rendered.
    seconds = {"a": 2.8, "b": 5.1, "c": 1.8, "d": 10.8}
    runs = {
        name: _run(stages={"npd": {"records": 500, "train_seconds": s}}, evaluate_seconds=0.0)
        for name, s in seconds.items()
    }
    study = {
        "name": "tiny",
        "runs": runs,
        "rows": [{"group": "budget", "label": name, "run": name} for name in runs],
        "parts": ["budget"],
    }
    backwards = {**study, "runs": dict(reversed(list(runs.items())))}
    assert sum(seconds.values()) != sum(reversed(list(seconds.values())))  # the trap is set
    assert results.render(study, "") == results.render(backwards, "")
    assert "copycat training 20 s" in results.render(study, "")


def test_selection_curve_per_strategy(tmp_path):
    def chosen(strategy, queries, ratio):
        run = _run(queries=queries, ratio_accuracy=ratio)
        run["key"] = {"recipe": {**run["key"]["recipe"], "selection": strategy}}
        return run

    study = {
        "name": "tiny",
        "runs": {
            "r5": _run(queries=5000, ratio_accuracy=0.7),  # recorded before selection existed
            "r10": chosen("random", 10000, 0.78),
            "e5": chosen("entropy", 5000, 0.75),
            "e10": chosen("entropy", 10000, 0.84),
            "h10": chosen("class_balance", 10000, 0.86),
        },
        "rows": [
            {"group": "selection", "label": label, "run": run}
            for label, run in (
                ("r 5k", "r5"),
                ("e 5k", "e5"),
                ("r 10k", "r10"),
                ("e 10k", "e10"),
                ("h 10k", "h10"),
            )
        ],
        "parts": ["selection"],
    }
    study["runs"]["h10"]["key"]["recipe"]["selection_random"] = 0.5
    assert results.selection_points(study) == {
        "random": [(5000, 0.7), (10000, 0.78)],
        "class_balance + 50% random": [(10000, 0.86)],
        "entropy": [(5000, 0.75), (10000, 0.84)],
    }
    results.write_results(str(tmp_path), study)
    text = (tmp_path / results.RESULTS_MD).read_text()
    assert f"![query selection against random order]({results.SELECTION_PLOT})" in text
    png = (tmp_path / results.SELECTION_PLOT).read_bytes()
    assert png.startswith(b"\x89PNG")
    results.write_results(str(tmp_path), study)
    assert (tmp_path / results.SELECTION_PLOT).read_bytes() == png


def test_tiny_study_end_to_end_and_regeneration(fashion_dir, tmp_path):
    flags = [
        f"--results_dir={tmp_path / 'results'}",
        f"--workdir={tmp_path / 'work'}",
        f"--target_workdir={tmp_path / 'target'}",
        f"--model_base_path={tmp_path / 'models'}",
        f"--data_dir={fashion_dir}",
        "--npd=synthetic:dead_leaves",
        "--query_budget=200",
        "--budgets=100,200",
        "--pd_budget=60",
        "--epochs=1",
        "--min_steps=0",
        "--finetune_epochs=1",
        "--target_epochs=2",
        "--parts=table,budget,defences,detector",
        "--detector_benign_images=40",
        "--defences=top1,gaussian:0.3",
        "--defence_budget=100",
        "--rate_limits=4",
        "--name=tiny",
    ]
    proc = run_verb("study", *flags, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "results"
    study = json.loads((out / "study.json").read_text())
    assert set(study["runs"]) == {
        "npd_200",
        "npd_100",
        "npd_pd",
        "pd_only",
        "def_top1_hard_100",
        "def_gaussian_0_3_hard_100",
        "def_gaussian_0_3_scores_100",
        "def_gaussian_0_3_topk_3_100",
    }
    assert study["datasets"]["natural"]["queries_spent"] == 200
    assert study["datasets"]["pd"]["queries_spent"] == 60
    assert study["runs"]["npd_pd"]["queries"] == 200 + 60
    text = (out / "RESULTS.md").read_text()
    for title in ("The paper's table", "Query-budget curve", "Fake datasets"):
        assert f"## {title}" in text
    assert "--query_budget=200" in text and "Machine: " in text
    assert (out / "budget_curve.png").exists()
    # The defences part: a steal per served defence and label mode, the defender's cost.
    defended = {row["run"] for row in study["rows"] if row["group"] == "defences"}
    assert defended == {
        "def_top1_hard_100",
        "def_gaussian_0_3_hard_100",
        "def_gaussian_0_3_scores_100",
        "def_gaussian_0_3_topk_3_100",
    }
    assert study["datasets"]["def_top1_hard_100"]["queries_spent"] == 100
    assert set(study["defence_costs"]) == {"top1", "gaussian:0.3"}
    assert study["defence_costs"]["top1"]["agreement"] == 1.0  # top-1 answers stay exact
    assert "The defender's cost" in text and (out / "defences.png").exists()
    # Rate limits: the same steal timed without one and under each, no copycat trained.
    assert study["timed"] == [
        {"label": "no rate limit", "dataset": "rate_none_100"},
        {"label": "`--rate_limit_qps=4`", "dataset": "rate_4_100"},
    ]
    limited = study["datasets"]["rate_4_100"]
    assert limited["key"]["rate_limit_qps"] == 4 and limited["queries_spent"] == 100
    assert study["datasets"]["rate_none_100"]["key"]["rate_limit_qps"] == 0
    assert limited["label_histogram"] == study["datasets"]["rate_none_100"]["label_histogram"]
    assert "The attacker's cost of a rate limit" in text
    assert limited["requests"] == 1 + limited["transient_errors"]
    sent = f"{limited['requests']} ({limited['transient_errors']} refused)"
    assert f"| `--rate_limit_qps=4` | 100 in 1 request of 256 | {sent} |" in text
    assert (tmp_path / "work" / "model_server-rate_4.log").exists()
    # The detector part: every source one client of a detecting server, per signal.
    clients = {c["name"]: c for c in study["detector"]["clients"]}
    assert list(clients) == ["natural", "noise", *(f"benign_{i}" for i in range(10))]
    assert clients["natural"]["queries"] == 200 and clients["benign_3"]["queries"] == 4
    assert clients["noise"]["ood"] == 200  # flagged by its first (and only) request
    assert not any(clients[f"benign_{i}"][s] for i in range(10) for s in ("prada", "ood"))
    assert "## Extraction detector" in text and "false positives 0 of 10" in text
    assert (out / "detector.png").read_bytes().startswith(b"\x89PNG")
    work = tmp_path / "work"
    assert (work / "flags.txt").exists() and (work / "config.json").exists()
    # The same command again measures nothing new and writes the same bytes.
    first = {name: (out / name).read_bytes() for name in os.listdir(out)}
    proc = run_verb("study", *flags, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    changed = [n for n in os.listdir(out) if (out / n).read_bytes() != first.get(n)]
    assert changed == [] and set(os.listdir(out)) == set(first)
    (out / "RESULTS.md").unlink()
    proc = run_verb("study", *flags, "--render_only", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "RESULTS.md").read_bytes() == first["RESULTS.md"]
    # A new fine-tuning setting: only the NPD+PD copycat is trained again (from scratch);
    # the steals and NPD-only copycats stay measured, their keys show the new recipe.
    flags = [f for f in flags if not f.startswith("--finetune_epochs")]
    proc = run_verb("study", *flags, "--finetune_epochs=2", "--parts=table", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "npd_pd changed since it was measured" in proc.stderr
    again = json.loads((out / "study.json").read_text())
    assert again["runs"]["npd_pd"]["stages"]["finetune"]["epochs_done"] == 2
    for run in ("npd_200", "pd_only"):
        assert again["runs"][run]["measured"] == study["runs"][run]["measured"]
        assert again["runs"][run]["accuracy"] == study["runs"][run]["accuracy"]
        assert again["runs"][run]["key"]["recipe"]["finetune_epochs"] == 2
    assert again["datasets"]["natural"]["key"]["recipe"]["finetune_epochs"] == 2
    # A run of one part keeps the other parts' rows and sections as they were measured.
    assert again["parts"] == study["parts"]
    assert again["rows"] == study["rows"] and again["timed"] == study["timed"]
    text = (out / "RESULTS.md").read_text()
    for title in ("Query-budget curve", "Output defences", "Extraction detector"):
        assert f"## {title}" in text


def test_a_new_recipe_knob_at_its_default_keeps_finished_runs_finished():
    from copycat_tf.studies.plan import RunSpec
    from copycat_tf.studies.runner import _key, same_key

    ordered = Recipe(query_budget=1000, selection="random", selection_random=0.0)
    spec = RunSpec("npd_1k", "natural", ordered, max_records=1000)
    recorded = _key(spec)
    del recorded["recipe"]["selection"]  # recorded before the knob existed: random order
    assert same_key(recorded, spec)
    # ... which is no longer the default: a recording without it did not select.
    assert not same_key(recorded, RunSpec("npd_1k", "natural", Recipe(query_budget=1000), 1000))
    chosen = RunSpec("npd_1k", "natural", Recipe(query_budget=1000, selection="entropy"), 1000)
    assert not same_key(recorded, chosen)
    recorded["recipe"]["epochs"] = 3  # a real difference still counts
    assert not same_key(recorded, spec)
    # A spec field added since (a dataset's served defence), at its default, too.
    from copycat_tf.studies.plan import DatasetSpec

    data = DatasetSpec("natural", Recipe(query_budget=1000))
    recorded = _key(data)
    del recorded["defense"]
    assert same_key(recorded, data)
    assert not same_key(recorded, DatasetSpec("natural", Recipe(query_budget=1000), "top1"))
    # Fields a spec never reads are not compared: training fields for a steal, fine-tuning
    # fields for a copycat without PD data; an NPD+PD copycat compares them.
    before = Recipe(query_budget=1000, finetune_epochs=5, finetune_learning_rate=5e-4)
    after = dataclasses.replace(before, finetune_epochs=10, finetune_learning_rate=1e-3)
    assert same_key(_key(DatasetSpec("natural", before)), DatasetSpec("natural", after))
    retrained = dataclasses.replace(after, epochs=3, model="plain_cnn")
    assert same_key(_key(DatasetSpec("natural", before)), DatasetSpec("natural", retrained))
    npd = RunSpec("npd_1k", "natural", before, 1000)
    assert same_key(_key(npd), dataclasses.replace(npd, recipe=after))
    assert not same_key(_key(npd), dataclasses.replace(npd, recipe=retrained))
    npd_pd = RunSpec("npd_pd", "natural", before, 1000, pd_dataset="pd")
    assert not same_key(_key(npd_pd), dataclasses.replace(npd_pd, recipe=after))
    # A knob whose default is not what runs did before it existed (the jitter moved from
    # the canvas to the picture): a recording without it did the old thing.
    old = _key(DatasetSpec("natural", Recipe(query_budget=1000, npd_jitter_on="canvas")))
    del old["recipe"]["npd_jitter_on"]
    assert not same_key(old, DatasetSpec("natural", Recipe(query_budget=1000)))
    pinned = DatasetSpec("natural", Recipe(query_budget=1000, npd_jitter_on="canvas"))
    assert same_key(old, pinned)
    # Copycats trained before --min_steps trained their epochs as given.
    old = _key(RunSpec("npd_1k", "natural", Recipe(query_budget=1000, min_steps=0), 1000))
    del old["recipe"]["min_steps"]
    assert not same_key(old, RunSpec("npd_1k", "natural", Recipe(query_budget=1000), 1000))
    assert same_key(old, RunSpec("npd_1k", "natural", Recipe(query_budget=1000, min_steps=0), 1000))


def test_datasets_table_is_in_name_order_however_the_study_was_filled():
    def dataset(spent):
        return {
            "npd": "synthetic:noise",
            "crops_per_image": 1,
            "queries_spent": spent,
            "query_budget": spent,
            "status": "complete",
            "label_statistics": {"top_share": 0.5, "entropy_bits": 1.0, "max_entropy_bits": 1.0},
            "label_histogram": [spent // 2, spent // 2],
            "steal_seconds": 1.0,
        }

    measured_order = {"src_b": dataset(20), "sel_a": dataset(10)}  # as a run appends them
    reloaded_order = dict(sorted(measured_order.items()))  # as study.json gives them back
    table = results._datasets_table({"datasets": measured_order})
    assert table == results._datasets_table({"datasets": reloaded_order})
    assert table.index("sel_a") < table.index("src_b")


def test_study_settings_errors_name_the_flag():
    from copycat_tf.errors import UserInputError
    from copycat_tf.studies.plan import check_settings

    check_settings(("table", "selection"), ("entropy_kcenter",), ("entropy",), ("top1",))
    with pytest.raises(
        UserInputError, match=r"--selections / --selection_full: unknown strategy 'random'"
    ):
        check_settings(("table",), ("random",), (), ())
    check_settings(("selection",), ("class_balance:0.5",), ("kcenter:0.25",), ())
    for entry in ("class_balance:1", "class_balance:0", "class_balance:half", "random:0.5"):
        with pytest.raises(UserInputError, match=r"STRATEGY:SHARE .*class_balance:0\.5"):
            check_settings(("selection",), (), (entry,), ())
    with pytest.raises(UserInputError, match=r"--parts: unknown \['tables'\]"):
        check_settings(("tables",), (), (), ())
    with pytest.raises(UserInputError, match="--defences"):
        check_settings(("defences",), (), (), ("gaussian:x",))
    for bad in ("0", "-1", "fast", "inf"):
        with pytest.raises(UserInputError, match=f"--rate_limits: '{bad}' is not a positive"):
            check_settings(("defences",), (), (), (), (bad,))


def test_a_dataset_stolen_again_on_disk_is_recorded_as_it_is(tmp_path):
    """A steal recorded in study.json but replaced on disk by another steal of the same
    spec (the recorded one was missing there): the record follows what runs train on."""
    import types

    from copycat_tf.data import fake_dataset as fd
    from copycat_tf.studies.plan import DatasetSpec, Plan
    from copycat_tf.studies.runner import _key, _Study

    spec = DatasetSpec("natural", Recipe(query_budget=100))
    plan = Plan(datasets={"natural": spec})
    recorded = {"key": _key(spec), "label_histogram": [60, 40], "queries_spent": 100}
    cfg = types.SimpleNamespace(
        workdir=str(tmp_path / "work"),
        results_dir=str(tmp_path / "results"),
        command="study",
        parts=("table",),
        name="tiny",
    )
    os.makedirs(cfg.results_dir)
    out = tmp_path / "work" / "fake_natural"
    out.mkdir(parents=True)
    manifest = {
        "schema_version": fd.READABLE_VERSIONS[-1],
        "query_budget": 100,
        "queries_spent": 100,
        "status": "complete",
        "skipped": {"count": 0, "examples": []},
        "label_histogram": [55, 45],
        "label_statistics": {
            "answers": 100,
            "empty_classes": [],
            "entropy_bits": 0.99,
            "max_entropy_bits": 1.0,
            "top_class": 0,
            "top_share": 0.55,
        },
        "steal_seconds": 1.5,
    }
    fd.write_manifest(str(out), manifest)
    study = _Study(cfg, plan, {"datasets": {"natural": dict(recorded)}})
    study.refresh_datasets()  # what a study does first, whether or not runs need it
    assert study.study["datasets"]["natural"]["label_histogram"] == [55, 45]
    study.study["datasets"]["natural"] = dict(recorded)
    study.dataset("natural")  # outside serving(): nothing may be stolen
    assert study.study["datasets"]["natural"]["label_histogram"] == [55, 45]
    assert study.study["datasets"]["natural"]["steal_seconds"] == 1.5
    # The same steal as recorded: left as it is.
    study.study["datasets"]["natural"] = dict(recorded, label_histogram=[55, 45])
    study.dataset("natural")
    assert "steal_seconds" not in study.study["datasets"]["natural"]


def test_the_probes_choice_is_said_under_its_table():
    run = {"stages": {"npd": {"augment": "flip", "invariance_probe": {"reason": "because"}}}}
    plain = {"stages": {"npd": {"augment": "none"}}}
    lines = results._probe_verdicts([("probe row", run), ("other row", plain)])
    assert lines == ["- probe row: the probe chose `flip`: because.", ""]
    assert results._probe_verdicts([("other row", plain)]) == []


def test_a_study_in_random_order_records_no_random_share():
    """--selection=random with the recipe's default share (its strategy's) is the
    reference the recorded random-order runs describe: share 0, as steal records it."""
    from copycat_tf import study

    try:
        study.FLAGS(["study", "--selection=random"])
        ordered = study._reference_recipe()
        study.FLAGS.unparse_flags()
        study.FLAGS(["study"])
        shipped = study._reference_recipe()
    finally:
        study.FLAGS.unparse_flags()
    assert (ordered.selection, ordered.selection_random) == ("random", 0.0)
    assert (shipped.selection, shipped.selection_random) == (
        Recipe.selection,
        Recipe.selection_random,
    )
