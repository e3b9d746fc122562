"""The Fashion-MNIST study: the Copycat paper's table, the query-budget curve, NPD sources
and class balancing, measured with copycat_tf's own verbs.

  python -m copycat_tf.study --flagfile=experiments/fashion_mnist/study.flags

One target (train_target's run, reused), one embedded model server, then for each row a
steal (resumable) + train_copycat (resumable) + evaluate over gRPC. Writes study.json,
study.md (tables) and budget_curve.png under --workdir; RESULTS.md quotes them.
"""

from __future__ import annotations

import dataclasses
import os
import time

from absl import flags, logging

from copycat_tf import cli, viz
from copycat_tf.attack.harvest import HarvestConfig, harvest
from copycat_tf.evaluation.report import EvaluateConfig, run_evaluate
from copycat_tf.pipeline import default_npd
from copycat_tf.server.process import ServerProcess
from copycat_tf.training.copycat import CopycatConfig, run_train_copycat
from copycat_tf.training.target import TargetConfig, run_train_target
from copycat_tf.training.trainer import TrainConfig
from copycat_tf.workdir import atomic_write_bytes, atomic_write_json

flags.DEFINE_string("workdir", "runs/fashion_mnist/study", "Study root.")
flags.DEFINE_string(
    "target_workdir",
    "runs/fashion_mnist/target",
    "train_target's workdir (reused when done, as target.flags makes it).",
)
flags.DEFINE_string("model_base_path", "runs/fashion_mnist/models", "Export root.")
flags.DEFINE_string("data_dir", None, "Fashion-MNIST IDX folder (default: Debian's).")
flags.DEFINE_string("natural_npd", "", "Natural NPD spec (default openclipart if installed).")
flags.DEFINE_list(
    "budgets", ["5000", "10000", "25000", "50000", "100000"], "Query budgets of the NPD-only curve."
)
flags.DEFINE_integer(
    "source_budget",
    50000,
    "Budget of the NPD-source, balancing and paper-table rows.",
    lower_bound=1,
)
flags.DEFINE_integer(
    "pd_budget",
    54000,
    "PD training images the target labels for the NPD+PD and PD-only rows.",
    lower_bound=1,
)
flags.DEFINE_integer(
    "crops_per_image",
    16,
    "Crops per natural NPD image (the stream must be longer than the largest budget).",
    lower_bound=1,
)
flags.DEFINE_integer("epochs", 10, "Copycat epochs.", lower_bound=1)
flags.DEFINE_integer("target_epochs", 10, "Target epochs (when it must be trained).", lower_bound=1)
flags.DEFINE_integer("finetune_epochs", 5, "NPD+PD fine-tuning epochs.", lower_bound=1)
flags.DEFINE_list("parts", ["table", "budget", "sources", "balance"], "What to run.")
FLAGS = flags.FLAGS


@dataclasses.dataclass
class Row:
    """One evaluated copycat."""

    name: str
    group: str
    queries: int
    npd: str
    balance: str
    report: dict
    seconds: float


def table_rows(target: dict, rows: list[Row]) -> list[list[str]]:
    """The study's main table: the target, then each copycat with its ratios."""
    out = [
        [
            "target",
            "-",
            f"{target['accuracy']:.4f}",
            f"{target['macro_f1']:.4f}",
            "-",
            "-",
            "-",
        ]
    ]
    for r in rows:
        rep = r.report
        out.append(
            [
                r.name,
                f"{r.queries:,}",
                f"{rep['copycat']['accuracy']:.4f}",
                f"{rep['copycat']['macro_f1']:.4f}",
                f"{rep['agreement']:.4f}",
                f"{100 * rep['ratio']['accuracy']:.1f}%",
                f"{100 * rep['ratio']['macro_f1']:.1f}%",
            ]
        )
    return out


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


HEADER = ["model", "queries", "accuracy", "macro-F1", "agreement", "acc. ratio", "F1 ratio"]


def budget_curve_figure(points: list[tuple[int, float, float, float]]):
    """Accuracy ratio, macro-F1 ratio and agreement against the query budget (log x)."""
    plt = viz._pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    queries = [p[0] for p in points]
    for i, label in (
        (1, "accuracy copycat/target"),
        (2, "macro-F1 copycat/target"),
        (3, "agreement with target"),
    ):
        ax.plot(queries, [100 * p[i] for p in points], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xticks(queries, [f"{q // 1000}k" for q in queries])
    ax.set_xlabel("NPD queries (hard labels)")
    ax.set_ylabel("%")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Fashion-MNIST: what a query budget buys", fontsize=9)
    return fig


def study_markdown(target: dict, rows: list[Row]) -> str:
    groups = {}
    for r in rows:
        groups.setdefault(r.group, []).append(r)
    parts = []
    titles = {
        "table": "The paper's table",
        "budget": "Query-budget curve (NPD only)",
        "sources": "NPD sources",
        "balance": "Class balancing",
    }
    for group, members in groups.items():
        parts += [
            f"### {titles.get(group, group)}",
            "",
            markdown_table(HEADER, table_rows(target, members)),
            "",
        ]
    return "\n".join(parts)


class _Study:
    def __init__(self, values):
        self.v = values
        self.root = values.workdir
        self.rows: list[Row] = []

    def steal(self, name, npd, budget, crops=1):
        out = os.path.join(self.root, f"fake_{name}")
        harvest(
            HarvestConfig(
                target=self.url,
                npd=npd,
                output_dir=out,
                query_budget=budget,
                query_batch_size=256,
                max_in_flight=4,
                crops_per_image=crops,
                records_per_shard=10_000,
                progress=False,
                npd_data_dir=self.v.data_dir,
            )
        )
        return out

    def copycat(
        self, name, group, fake, queries, npd, balance="replicate", pd_fake=(), max_records=0
    ):
        start = time.monotonic()
        result = run_train_copycat(
            CopycatConfig(
                fake_dataset=[fake],
                model="small_cnn",
                workdir=os.path.join(self.root, name),
                model_base_path=os.path.join(self.root, "models"),
                model_name=name,
                balance=balance,
                pd_fake_dataset=list(pd_fake),
                max_records=max_records,
                train=TrainConfig(
                    epochs=self.v.epochs, batch_size=128, learning_rate=2e-3, verbose=0
                ),
                finetune=TrainConfig(
                    epochs=self.v.finetune_epochs, batch_size=128, learning_rate=5e-4, verbose=0
                ),
            )
        )
        report = run_evaluate(
            EvaluateConfig(
                target=self.url,
                copycat=result["export_dir"],
                test_data="fashion_mnist:test",
                out=os.path.join(self.root, "eval", name),
                data_dir=self.v.data_dir,
            )
        )
        row = Row(name, group, queries, npd, balance, report, time.monotonic() - start)
        self.rows.append(row)
        logging.info(
            "%s: accuracy ratio %.3f agreement %.3f",
            name,
            report["ratio"]["accuracy"],
            report["agreement"],
        )
        self.save()
        return row

    def save(self):
        target = self.rows[0].report["target"] if self.rows else None
        atomic_write_json(
            os.path.join(self.root, "study.json"),
            {
                "target": target and {k: target[k] for k in ("accuracy", "macro_f1")},
                "rows": [
                    {
                        **dataclasses.asdict(r),
                        "report": {
                            "copycat": {
                                k: r.report["copycat"][k] for k in ("accuracy", "macro_f1")
                            },
                            "agreement": r.report["agreement"],
                            "ratio": r.report["ratio"],
                        },
                    }
                    for r in self.rows
                ],
            },
        )
        if target:
            atomic_write_bytes(
                os.path.join(self.root, "study.md"), study_markdown(target, self.rows).encode()
            )

    def run(self):
        v = self.v
        os.makedirs(self.root, exist_ok=True)
        natural = v.natural_npd or default_npd()
        target = run_train_target(
            TargetConfig(
                pd_data="fashion_mnist",
                model="small_cnn",
                workdir=v.target_workdir,
                model_base_path=v.model_base_path,
                model_name="target",
                data_dir=v.data_dir,
                train=TrainConfig(
                    epochs=v.target_epochs,
                    batch_size=128,
                    learning_rate=2e-3,
                    augment="flip",
                    verbose=0,
                ),
            )
        )
        server = ServerProcess(
            f"--model_base_path={os.path.dirname(target['export_dir'])}",
            "--model_name=target",
            model="target",
            stderr_path=os.path.join(self.root, "model_server.log"),
        )
        server.start()
        self.url = f"grpc://{server.grpc_target}/target"
        try:
            budgets = sorted(int(b) for b in v.budgets)
            biggest = max([*budgets, v.source_budget])
            fake_nat = self.steal("natural", natural, biggest, v.crops_per_image)
            curve = {}
            wanted = budgets if "budget" in v.parts else []
            for b in sorted(set([*wanted, v.source_budget])):
                curve[b] = self.copycat(
                    f"npd_{b // 1000}k", "budget", fake_nat, b, natural, max_records=b
                )
            if wanted:
                points = [
                    (
                        b,
                        curve[b].report["ratio"]["accuracy"],
                        curve[b].report["ratio"]["macro_f1"],
                        curve[b].report["agreement"],
                    )
                    for b in wanted
                ]
                viz.save_figure(
                    budget_curve_figure(points), os.path.join(self.root, "budget_curve.png")
                )
            reference = curve[v.source_budget]
            if "table" in v.parts:
                self.rows.append(
                    dataclasses.replace(reference, group="table", name="copycat NPD only")
                )
                fake_pd = self.steal("pd", "pd:fashion_mnist:train", v.pd_budget)
                self.copycat(
                    "npd_pd",
                    "table",
                    fake_nat,
                    v.source_budget + v.pd_budget,
                    natural,
                    pd_fake=[fake_pd],
                    max_records=v.source_budget,
                )
                self.copycat("pd_only", "table", fake_pd, v.pd_budget, "pd:fashion_mnist:train")
            if "sources" in v.parts:
                self.rows.append(
                    dataclasses.replace(reference, group="sources", name="natural (openclipart)")
                )
                for name, spec in (
                    ("dead_leaves", "synthetic:dead_leaves"),
                    ("noise", "synthetic:noise"),
                    ("mix", f"mix:0.5*{natural}|0.5*synthetic:dead_leaves"),
                ):
                    fake = self.steal(
                        name, spec, v.source_budget, v.crops_per_image if name == "mix" else 1
                    )
                    self.copycat(f"src_{name}", "sources", fake, v.source_budget, spec)
            if "balance" in v.parts:
                self.rows.append(
                    dataclasses.replace(reference, group="balance", name="balance replicate")
                )
                self.copycat(
                    "balance_none",
                    "balance",
                    fake_nat,
                    v.source_budget,
                    natural,
                    balance="none",
                    max_records=v.source_budget,
                )
        finally:
            server.stop()
        self.save()
        print(study_markdown(self.rows[0].report["target"], self.rows) if self.rows else "")
        print(f"study: {os.path.join(self.root, 'study.md')}, study.json, budget_curve.png")


def main(argv):
    del argv
    _Study(FLAGS).run()


if __name__ == "__main__":
    cli.run(main)
