"""Structure the code relies on: imports without side effects, the targets/ layering,
flags without TensorFlow, one set of recipe defaults, thread-safe request counters."""

import ast
import os
import subprocess
import sys
import threading
import tomllib

import pytest
from cli_util import REPO, run_verb

from copycat_tf.attack.dispatch import RequestStats

PACKAGE = os.path.join(REPO, "copycat_tf")


def _imports(path):
    with open(path) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_clients_import_no_other_client_nor_the_server():
    clients = {"tfserving_grpc", "tfserving_rest", "http_json", "saved_model"}
    folder = os.path.join(PACKAGE, "targets")
    for name in os.listdir(folder):
        if not name.endswith(".py"):
            continue
        imports = _imports(os.path.join(folder, name))
        assert not any(i.startswith("copycat_tf.server") for i in imports), name
        others = {f"copycat_tf.targets.{c}" for c in clients} - {f"copycat_tf.targets.{name[:-3]}"}
        assert not imports & others, (name, imports & others)
        if name == "base.py":  # the interface imports nothing of the package but errors
            assert not {i for i in imports if i.startswith("copycat_tf.targets")}


def test_importing_the_package_and_light_modules_loads_no_tensorflow():
    code = (
        "import sys, copycat_tf, copycat_tf.errors, copycat_tf.recipe, copycat_tf.cli, "
        "copycat_tf.contract, copycat_tf.models.registry, copycat_tf.data.balance, "
        "copycat_tf.training.flags, copycat_tf.studies.plan, copycat_tf.data.npd_processes\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n"
        "assert sys.stderr.fileno() == 2\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


def test_help_needs_no_tensorflow_and_shows_recipe_defaults(tmp_path):
    # A tensorflow that cannot be imported first on the path: --help must not need it.
    (tmp_path / "tensorflow").mkdir()
    (tmp_path / "tensorflow" / "__init__.py").write_text("raise ImportError('no TF for help')\n")
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    for verb in ("steal", "train_target", "model_server", "evaluate", "demo", "study"):
        proc = run_verb(verb, "--help", timeout=120, env=env)
        assert "no TF for help" not in proc.stderr and "--" in proc.stdout, (verb, proc.stderr)
    proc = run_verb("train_copycat", "--helpfull", timeout=120, env=env)
    assert "no TF for help" not in proc.stderr, proc.stderr
    from copycat_tf.recipe import Recipe

    recipe = Recipe()
    assert f"(default: '{recipe.learning_rate}')" in proc.stdout
    assert f"(default: '{recipe.balance}')" in proc.stdout


def test_package_lists_its_verbs_and_version():
    from copycat_tf import __version__
    from copycat_tf.__main__ import VERBS

    proc = subprocess.run(
        [sys.executable, "-m", "copycat_tf"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    for verb, _ in VERBS:
        assert f"  {verb} " in proc.stdout
        assert scripts[f"copycat-{verb.replace('_', '-')}"] == f"copycat_tf.{verb}:entry"
    assert len(scripts) == len(VERBS)
    for verb in ("", ".steal"):
        proc = subprocess.run(
            [sys.executable, "-m", f"copycat_tf{verb}", "--version"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert (proc.returncode, proc.stdout) == (0, f"copycat_tf {__version__}\n"), proc.stderr


@pytest.mark.parametrize("args", [["-m", "copycat_tf"], ["-m", "copycat_tf.steal", "--version"]])
def test_a_reader_that_stops_early_is_no_error(args):
    """`python -m copycat_tf | grep -q steal` may close the pipe before the listing is
    written: that is the reader's choice, not a crash (no traceback, status 0)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails with EPIPE
    try:
        proc = subprocess.run(
            [sys.executable, *args],
            cwd=REPO,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr


def test_recipe_defaults_live_in_one_place():
    """No module but recipe.py states a default for a recipe's hyper-parameters."""
    from copycat_tf.recipe import Recipe, TargetRecipe

    for cls in (Recipe, TargetRecipe):
        train = cls().train_config()
        assert (train.epochs, train.learning_rate) == (cls.epochs, cls.learning_rate)
    for path in ("training/trainer.py", "training/flags.py", "pipeline.py", "demo.py", "study.py"):
        with open(os.path.join(PACKAGE, path)) as f:
            source = f.read()
        for literal in ("learning_rate=0", "learning_rate=1", "learning_rate=2", "epochs=1"):
            assert literal not in source.replace(" ", ""), (path, literal)


def test_request_stats_lose_no_count_across_threads():
    stats = RequestStats()
    taken = []

    def work():
        for _ in range(20_000):
            stats.add(requests=1, retries=1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        taken.append(stats.take())
    taken.append(stats.take())
    assert sum(t["requests"] for t in taken) == 80_000 == stats.total("requests")
    assert sum(t["retries"] for t in taken) == 80_000
