"""The study driver's table and plot builders."""

import tensorflow as tf

from copycat_tf import study, viz


def _row(name, group, queries, acc, f1, agree):
    report = {
        "copycat": {"accuracy": acc, "macro_f1": f1},
        "agreement": agree,
        "ratio": {"accuracy": acc / 0.9, "macro_f1": f1 / 0.8},
    }
    return study.Row(name, group, queries, "synthetic:noise", "replicate", report, 1.0)


TARGET = {"accuracy": 0.9, "macro_f1": 0.8}


def test_table_rows_and_markdown():
    rows = study.table_rows(TARGET, [_row("npd", "table", 50000, 0.45, 0.4, 0.5)])
    assert rows[0] == ["target", "-", "0.9000", "0.8000", "-", "-", "-"]
    assert rows[1] == ["npd", "50,000", "0.4500", "0.4000", "0.5000", "50.0%", "50.0%"]
    md = study.markdown_table(study.HEADER, rows)
    lines = md.splitlines()
    assert lines[0].startswith("| model | queries |") and lines[1] == "|" + "---|" * 7
    assert lines[3] == "| npd | 50,000 | 0.4500 | 0.4000 | 0.5000 | 50.0% | 50.0% |"


def test_study_markdown_groups_rows_under_titles():
    text = study.study_markdown(
        TARGET,
        [
            _row("a", "budget", 5000, 0.3, 0.2, 0.3),
            _row("b", "budget", 10000, 0.4, 0.3, 0.4),
            _row("c", "sources", 50000, 0.5, 0.4, 0.5),
        ],
    )
    assert text.index("### Query-budget curve") < text.index("| a |") < text.index("| b |")
    assert text.index("### NPD sources") < text.index("| c |")
    assert text.count("| target |") == 2


def test_budget_curve_figure(tmp_path):
    fig = study.budget_curve_figure([(5000, 0.3, 0.2, 0.35), (50000, 0.6, 0.5, 0.62)])
    array = viz.save_figure(fig, str(tmp_path / "curve.png"))
    assert array.ndim == 3 and array.shape[-1] == 3
    assert tf.io.decode_png((tmp_path / "curve.png").read_bytes()).shape[0] > 100
