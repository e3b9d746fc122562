"""RESULTS.md and the plots of a study, written from study.json alone.

Everything here is a pure function of the study record (and the hand-written PREFACE.md
next to it), so the same study.json always gives the same bytes.
"""

from __future__ import annotations

import math
import os

from copycat_tf import viz
from copycat_tf.studies.plan import PARTS
from copycat_tf.workdir import atomic_write_bytes

RESULTS_MD = "RESULTS.md"
PREFACE_MD = "PREFACE.md"
BUDGET_PLOT = "budget_curve.png"
SELECTION_PLOT = "selection_curve.png"
DETECTOR_PLOT = "detector.png"
DEFENCE_PLOT = "defences.png"
HEADER = [
    "copycat",
    "queries",
    "accuracy",
    "macro-F1",
    "agreement",
    "acc. ratio",
    "F1 ratio",
    "training",
]
RECIPE_FIELDS = (
    "npd",
    "query_budget",
    "crops_per_image",
    "npd_background",
    "npd_invert",
    "npd_jitter",
    "npd_jitter_on",
    "npd_blur",
    "npd_crop_area",
    "npd_crop_aspect",
    "npd_cycle",
    "npd_adapt_after",
    "invariance_probe",
    "label_mode",
    "model",
    "epochs",
    "batch_size",
    "learning_rate",
    "weight_decay",
    "augment",
    "mixup",
    "warmup_epochs",
    "patience",
    "min_steps",
    "balance",
    "max_replication",
    "holdout_percent",
    "finetune_epochs",
    "finetune_learning_rate",
    "precision",
    "seed",
)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _seconds(s) -> str:
    if s is None:
        return "-"
    return f"{s:.0f} s" if s < 600 else f"{s / 60:.1f} min"


def _queries(run: dict) -> str:
    stages = run["stages"]
    text = f"{stages['npd']['records']:,}"
    if "finetune" in stages:
        text += f" + {stages['finetune']['records']:,}"
    return text


def _train_seconds(run: dict) -> float:
    return math.fsum(stage["train_seconds"] or 0 for stage in run["stages"].values())


def run_cells(label: str, run: dict) -> list[str]:
    """One copycat row of a results table."""
    return [
        label,
        _queries(run),
        f"{run['accuracy']:.4f}",
        f"{run['macro_f1']:.4f}",
        f"{run['agreement']:.4f}",
        _pct(run["ratio_accuracy"]),
        _pct(run["ratio_macro_f1"]),
        _seconds(_train_seconds(run)),
    ]


def target_cells(target: dict) -> list[str]:
    return [
        "target",
        "-",
        f"{target['accuracy']:.4f}",
        f"{target['macro_f1']:.4f}",
        "-",
        "-",
        "-",
        _seconds(target.get("train_seconds")),
    ]


def _group_rows(study: dict, group: str) -> list[tuple[str, dict]]:
    runs = study.get("runs", {})
    return [
        (row["label"], runs[row["run"]])
        for row in study.get("rows", [])
        if row["group"] == group and row["run"] in runs
    ]


def _pending_rows(study: dict, group: str) -> list[str]:
    runs = study.get("runs", {})
    return [
        row["label"]
        for row in study.get("rows", [])
        if row["group"] == group and row["run"] not in runs
    ]


def budget_points(study: dict) -> list[tuple[int, float, float, float]]:
    """(queries, accuracy ratio, macro-F1 ratio, agreement) of the budget curve."""
    return sorted(
        (run["queries"], run["ratio_accuracy"], run["ratio_macro_f1"], run["agreement"])
        for _, run in _group_rows(study, "budget")
    )


def budget_curve_figure(points: list[tuple[int, float, float, float]], title: str):
    """Accuracy ratio, macro-F1 ratio and agreement against the query budget (log x)."""
    plt = viz.pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    queries = [p[0] for p in points]
    for i, label in (
        (1, "accuracy copycat/target"),
        (2, "macro-F1 copycat/target"),
        (3, "agreement with target"),
    ):
        ax.plot(queries, [100 * p[i] for p in points], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xticks(queries, [f"{q / 1000:g}k" for q in queries])
    ax.set_xticks([], minor=True)  # only the budgets measured are labelled
    ax.set_xlabel("NPD queries")
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return fig


def selection_points(study: dict) -> dict[str, list[tuple[int, float]]]:
    """{strategy: [(queries, accuracy ratio)]} of the selection part ("random" = order)."""
    points: dict[str, list[tuple[int, float]]] = {}
    for _, run in _group_rows(study, "selection"):
        recipe = run["key"]["recipe"]
        strategy = recipe.get("selection", "random")
        if recipe.get("selection_random") and strategy != "random":
            strategy += f" + {recipe['selection_random']:.0%} random"
        points.setdefault(strategy, []).append((run["queries"], run["ratio_accuracy"]))
    return {s: sorted(p) for s, p in sorted(points.items(), key=lambda kv: kv[0] != "random")}


def selection_curve_figure(points: dict[str, list[tuple[int, float]]], title: str):
    """Accuracy ratio against the query budget, one line per selection strategy."""
    plt = viz.pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    budgets = sorted({q for line in points.values() for q, _ in line})
    for strategy, line in points.items():
        style = {"color": "black", "linestyle": "--"} if strategy == "random" else {}
        label = "random order" if strategy == "random" else strategy
        ax.plot([q for q, _ in line], [100 * r for _, r in line], marker="o", label=label, **style)
    ax.set_xscale("log")
    ax.set_xticks(budgets, [f"{q / 1000:g}k" for q in budgets])
    ax.set_xticks([], minor=True)  # only the budgets measured are labelled
    ax.set_xlabel("NPD queries")
    ax.set_ylabel("accuracy copycat/target, %")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return fig


def _recipe_table(study: dict) -> str:
    """The settings of the reference run (the first row's run)."""
    rows = study.get("rows", [])
    runs = study.get("runs", {})
    first = next((runs[r["run"]] for r in rows if r["run"] in runs), None)
    if first is None:
        return ""
    recipe = dict(first["key"]["recipe"])
    if not recipe.get("npd"):  # the default source: what its steal really used
        dataset = study.get("datasets", {}).get(first["key"].get("dataset", ""), {})
        recipe["npd"] = f"{dataset.get('npd', '')} (default)"
    cells = [[name, f"`{recipe[name]}`"] for name in RECIPE_FIELDS if name in recipe]
    return markdown_table(["setting", "value"], cells)


def _datasets_table(study: dict) -> str:
    rows = []
    for name, d in sorted(study.get("datasets", {}).items()):  # as study.json stores them
        stats = d["label_statistics"]
        rows.append(
            [
                name,
                f"`{d['npd']}`",
                str(d["crops_per_image"]),
                f"{d['queries_spent']:,} / {d['query_budget']:,}",
                d["status"],
                f"{100 * stats['top_share']:.1f}%",
                f"{stats['entropy_bits']:.2f} / {stats['max_entropy_bits']:.2f}",
                "`" + str(d["label_histogram"]) + "`",
                _seconds(d["steal_seconds"]),
            ]
        )
    return markdown_table(
        [
            "dataset",
            "NPD",
            "crops",
            "queries spent / budget",
            "status",
            "top class",
            "label entropy (bits)",
            "stolen labels per class",
            "steal time",
        ],
        rows,
    )


def _totals(study: dict) -> str:
    # fsum: the exact sum, whatever the order of the dicts (measurement order in the run
    # that measured, key order once read back from study.json): "20 s" and "21 s" differ.
    steal = math.fsum(d["steal_seconds"] for d in study.get("datasets", {}).values())
    runs = study.get("runs", {}).values()
    train = math.fsum(_train_seconds(r) for r in runs)
    evaluate = math.fsum(r["evaluate_seconds"] for r in runs)
    return (
        f"Measured time of all steps: {_seconds(steal + train + evaluate)} (stealing "
        f"{_seconds(steal)}, copycat training {_seconds(train)}, evaluation "
        f"{_seconds(evaluate)}); the target's training is in its own table."
    )


def _defence_costs(study: dict) -> list[str]:
    """The defender's side: the target's own test accuracy through each defence."""
    costs = study.get("defence_costs") or {}
    if not costs:
        return []
    rows = [
        [f"`{d}`", f"{c['accuracy']:.4f}", f"{c['macro_f1']:.4f}", _pct(c["agreement"])]
        for d, c in sorted(costs.items())  # study.json keeps keys sorted: the same order
    ]
    return [
        "The defender's cost: the target's own test accuracy answered through each defence "
        "(agreement: how often the defended answer is the model's own top-1).",
        "",
        markdown_table(["defence", "accuracy", "macro-F1", "agreement with the model"], rows),
        "",
    ]


def _rate_limits(study: dict) -> list[str]:
    """The attacker's cost of a rate limit: the same steal's wall time under each."""
    datasets = study.get("datasets", {})
    timed = [(t["label"], datasets.get(t["dataset"], {})) for t in study.get("timed", [])]
    measured = [(label, d) for label, d in timed if d.get("steal_seconds") is not None]
    if not timed:
        return []
    if not measured:
        return ["The rate limits' steals: not measured yet.", ""]
    free = next((d["steal_seconds"] for _, d in measured if not d["key"]["rate_limit_qps"]), 0)
    rows = []
    for label, d in measured:
        key = d["key"]
        batch = key["recipe"]["query_batch_size"]
        requests = -(-d["queries_spent"] // batch)
        qps = key["rate_limit_qps"]
        sent = d.get("requests")
        rows.append(
            [
                label,
                f"{d['queries_spent']:,} in {requests:,} request{'s' * (requests != 1)} of {batch}",
                f"{sent:,} ({d['transient_errors']:,} refused)" if sent is not None else "-",
                f"{requests / qps:,.0f} s" if qps else "-",
                _seconds(d["steal_seconds"]),
                f"{d['steal_seconds'] / free:.1f}x" if free else "-",
            ]
        )
    pending = [label for label, d in timed if d.get("steal_seconds") is None]
    return [
        "The attacker's cost of a rate limit: the same steal (hard labels) against the target "
        "served with `--rate_limit_qps` (requests per second per client), the attacker "
        "pacing its requests at the limit (`steal --max_qps`; a few per cent under it after "
        "each refusal, back towards it with each answer), each steal alone on the machine. "
        "Requests sent counts every attempt, refused ones (retried) included. "
        "The copy is the same as without the limit (the same queries get the same answers): "
        "a limit buys time, not accuracy.",
        "",
        markdown_table(
            ["served", "queries", "requests sent", "requests / limit", "steal time", "vs no limit"],
            rows,
        ),
        "",
        *(["Not measured yet: " + "; ".join(pending) + ".", ""] if pending else []),
    ]


def defence_points(study: dict) -> dict[str, dict[str, float]]:
    """{label mode: {defence: accuracy ratio}} of the defences part (from the keys of each
    row's run and of the dataset it was stolen into)."""
    datasets = study.get("datasets", {})
    out: dict[str, dict[str, float]] = {}
    for _, run in _group_rows(study, "defences"):
        key = run["key"]
        stolen = datasets.get(key["dataset"], {}).get("key", {})
        defence = stolen.get("defense", "none")
        out.setdefault(key["recipe"]["label_mode"], {})[defence] = run["ratio_accuracy"]
    return out


def defence_figure(points: dict[str, dict[str, float]], title: str):
    """Grouped bars: the copy's accuracy ratio per defence, one bar per label mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    defences = list(dict.fromkeys(d for modes in points.values() for d in modes))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(defences)), 4))
    width = 0.8 / max(1, len(points))
    for j, (mode, ratios) in enumerate(points.items()):
        xs = [i + j * width for i, d in enumerate(defences) if d in ratios]
        ax.bar(xs, [100 * ratios[d] for d in defences if d in ratios], width, label=mode)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(defences))])
    ax.set_xticklabels(defences, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("copycat / target accuracy (%)")
    ax.set_title(title)
    ax.legend(title="label mode", fontsize=8)
    fig.tight_layout()
    return fig


def _detected(client: dict, signal: str) -> str:
    at = client.get(signal, 0)
    return f"after {at:,}" if at else "no"


def _detector_section(detector: dict) -> list[str]:
    """The detector part: per client and signal, whether and when it was flagged."""
    clients = detector["clients"]
    signals = detector["signals"]
    rows = [[c["label"], f"{c['queries']:,}", *(_detected(c, s) for s in signals)] for c in clients]
    benign = [c for c in clients if c["benign"]]
    false_pos = {s: sum(1 for c in benign if c.get(s)) for s in signals}
    attacks = [c for c in clients if not c["benign"]]
    caught = {s: sum(1 for c in attacks if c.get(s)) for s in signals}
    summary = "; ".join(
        f"`{s}`: {caught[s]} of {len(attacks)} attack sources flagged, false positives "
        f"{false_pos[s]} of {len(benign)} benign clients"
        for s in signals
    )
    return [
        f"Each source is one client (its own API key) sending its queries over gRPC in "
        f"requests of {detector['batch_size']}, in the order they were sent; once to a "
        f"server with `--detector=prada`, once with `--detector=ood`; "
        f"{detector['settings']}.",
        "",
        markdown_table(
            ["client", "queries sent", *(f"flagged by `{s}` (queries)" for s in signals)], rows
        ),
        "",
        summary + ".",
        "",
        f"![queries until detection]({DETECTOR_PLOT})",
        "",
    ]


def detector_figure(detector: dict, title: str):
    """Queries until each client was flagged, per signal (never: its queries sent, pale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = detector["clients"]
    signals = detector["signals"]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(clients) * len(signals) + 1.5))
    height = 0.8 / len(signals)
    for j, signal in enumerate(signals):
        ys = [i + j * height for i in range(len(clients))]
        values = [c.get(signal) or c["queries"] for c in clients]
        alpha = [1.0 if c.get(signal) else 0.25 for c in clients]
        colour = f"C{j}"
        for y, v, a in zip(ys, values, alpha, strict=True):
            ax.barh(y, v, height=height, color=colour, alpha=a)
        ax.barh([], [], color=colour, label=f"{signal} (pale: never flagged)")
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(clients))])
    ax.set_yticklabels([c["label"][:48] for c in clients], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("queries until flagged (log scale)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def render(study: dict, preface: str = "") -> str:
    """RESULTS.md of a study record."""
    name = study.get("name", "study")
    out = [f"# Results: {name}", ""]
    if preface.strip():
        out += [preface.strip(), ""]
    machine = study.get("machine", {})
    dates = [
        item["measured"]
        for kind in ("datasets", "runs")
        for item in study.get(kind, {}).values()
        if "measured" in item
    ]
    out += [
        "## How this was measured",
        "",
        "This file is written by the study command from `study.json` (next to it); do not "
        "edit it by hand. Re-running the command resumes what is unfinished and rewrites it; "
        "`--render_only` rewrites it from `study.json` alone.",
        "",
        "```sh",
        study.get("command", ""),
        "```",
        "",
        f"Machine: {machine.get('cores', '?')} CPU cores ({machine.get('cpu', '?')}), "
        f"{machine.get('gpus', 0) or 'no'} GPU, TensorFlow {machine.get('tensorflow', '?')}, "
        f"Python {machine.get('python', '?')}. Measured "
        f"{min(dates, default='?')} to {max(dates, default='?')}.",
        "",
        _totals(study),
        "",
        "Attack recipe of the reference copycat (rows differ only where they say so):",
        "",
        _recipe_table(study),
        "",
    ]
    target = study.get("target")
    if target:
        earlier = study.get("earlier_targets", [])
        out += [
            "## Target",
            "",
            markdown_table(
                ["model", "data", "epochs", "test accuracy", "test macro-F1", "training"]
                + (["measured"] if earlier else []),
                [
                    [
                        f"`{t['model']}`",
                        f"`{t['pd_data']}` ({t['test_images']:,} test images)",
                        f"{t['epochs']} (best {t['best_epoch']})",
                        f"{t['accuracy']:.4f}",
                        f"{t['macro_f1']:.4f}",
                        _seconds(t.get("train_seconds")),
                    ]
                    + ([t.get("measured", "?")] if earlier else [])
                    for t in [target, *reversed(earlier)]
                ],
            ),
            "",
        ]
        if earlier:
            out += [
                "The first row is the target the tables below show; rows measured before it "
                "copied an earlier training of the same recipe (the target is retrained "
                "where its run is missing, and training differs a little between machines "
                "and precisions). Every ratio is against the target that row copied.",
                "",
            ]
    for group in study.get("parts", []):
        members = _group_rows(study, group)
        pending = _pending_rows(study, group)
        if not members and not pending and group != "detector":
            continue
        out += [f"## {PARTS.get(group, group)}", ""]
        if members:
            rows = ([target_cells(target)] if target else []) + [
                run_cells(label, run) for label, run in members
            ]
            out += [markdown_table(HEADER, rows), ""]
        if group == "detector":
            detector = study.get("detector")
            out += _detector_section(detector) if detector else ["Not measured yet.", ""]
            continue
        out += _probe_verdicts(members)
        if pending:
            out += [
                "Not measured yet (the command above resumes here): " + "; ".join(pending) + ".",
                "",
            ]
        if group == "budget" and len(members) > 1:
            out += [f"![query-budget curve]({BUDGET_PLOT})", ""]
        if group == "selection" and len(members) > 1:
            out += [f"![query selection against random order]({SELECTION_PLOT})", ""]
        if group == "defences":
            out += _defence_costs(study) + _rate_limits(study)
            if len(members) > 1:
                out += [f"![copy ratio per defence and label mode]({DEFENCE_PLOT})", ""]
    if study.get("datasets"):
        out += ["## Fake datasets", "", _datasets_table(study), ""]
    return "\n".join(out)


def _probe_verdicts(members: list[tuple[str, dict]]) -> list[str]:
    """What `--augment=auto` chose, for the rows whose copycat it trained."""
    lines = []
    for label, run in members:
        probe = run.get("stages", {}).get("npd", {}).get("invariance_probe")
        if probe:
            augment = run["stages"]["npd"].get("augment", "?")
            lines.append(f"- {label}: the probe chose `{augment}`: {probe['reason']}.")
    return [*lines, ""] if lines else []


def write_results(results_dir: str, study: dict) -> None:
    """Writes RESULTS.md (and the budget and selection curves) into results_dir from the
    study record."""
    preface = ""
    path = os.path.join(results_dir, PREFACE_MD)
    if os.path.exists(path):
        with open(path) as f:
            preface = f.read()
    points = budget_points(study)
    if len(points) > 1:
        figure = budget_curve_figure(points, f"{study.get('name', '')}: what a query budget buys")
        viz.save_figure(figure, os.path.join(results_dir, BUDGET_PLOT))
    selection = selection_points(study)
    if sum(len(line) for line in selection.values()) > 1:
        figure = selection_curve_figure(
            selection, f"{study.get('name', '')}: chosen queries against random order"
        )
        viz.save_figure(figure, os.path.join(results_dir, SELECTION_PLOT))
    defences = defence_points(study)
    if sum(len(v) for v in defences.values()) > 1:
        figure = defence_figure(
            defences, f"{study.get('name', '')}: the copy against each output defence"
        )
        viz.save_figure(figure, os.path.join(results_dir, DEFENCE_PLOT))
    if study.get("detector"):
        figure = detector_figure(
            study["detector"], f"{study.get('name', '')}: when the detector flags a client"
        )
        viz.save_figure(figure, os.path.join(results_dir, DETECTOR_PLOT))
    atomic_write_bytes(os.path.join(results_dir, RESULTS_MD), render(study, preface).encode())
