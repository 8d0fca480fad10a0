"""Every notebook in notebooks/ runs from a clean kernel without an error.

The notebooks are stored with their outputs. To re-execute them and store the
new outputs: ``python tests/test_notebooks.py --store [names...]``.

Notebook 02 is about Fashion-MNIST, and runs here on Fashion-MNIST or fails:
the test looks for the IDX files in ``$HVAE_FASHION_MNIST``, in
``../shared/data/fashion-mnist`` beside the repository and in
``/usr/share/datasets/fashion-mnist`` (Debian's dataset-fashion-mnist), hands
the folder to the kernel, and checks that the notebook used it rather than
its digits fallback. After each notebook, a probe run in its kernel (not
stored) checks that no model in it collapsed: every latent layer of every
fitted HierarchicalVAE keeps an active unit on the notebook's test images.
"""
import ast
import os
import sys
import time
import warnings
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from jupyter_client.manager import KernelManager  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
# Each notebook runs in about a minute on two cores; a cell that waits this
# long for output is stuck.
CELL_TIMEOUT = 600


REPOSITORY = NOTEBOOKS.parent
FASHION_MNIST_PLACES = [REPOSITORY.parent / "shared" / "data" / "fashion-mnist",
                        Path("/usr/share/datasets/fashion-mnist")]
# Notebooks that must run on the data they are about: the name their
# `data_name` variable must hold.
REQUIRED_DATA = {"02_hierarchy": "Fashion-MNIST"}

# Appended to a notebook by the test (never stored): prints, as a Python
# literal, the data set's name and the active units of every fitted model in
# the kernel (in dicts, pipelines and searches too).
PROBE = """
def _hvae_probe():
    from hvae import HierarchicalVAE
    found, seen = {}, set()
    def visit(name, value, depth=0):
        if id(value) in seen or depth > 3:
            return
        seen.add(id(value))
        if isinstance(value, HierarchicalVAE):
            if hasattr(value, "model_"):
                found[name] = value.active_units(X_test)
        elif isinstance(value, dict):
            for key, item in value.items():
                visit(f"{name}[{key!r}]", item, depth + 1)
        elif hasattr(value, "steps"):                     # a Pipeline
            for key, item in value.steps:
                visit(f"{name}[{key!r}]", item, depth + 1)
        elif hasattr(value, "best_estimator_"):           # a fitted search
            visit(f"{name}.best_estimator_", value.best_estimator_, depth + 1)
    for name, value in list(globals().items()):
        if not name.startswith("_"):
            visit(name, value)
    return {"data_name": globals().get("data_name"), "active_units": found}
print("HVAE-PROBE", repr(_hvae_probe()))
"""


def fashion_mnist_dir(environ=os.environ, places=FASHION_MNIST_PLACES):
    """The folder holding Fashion-MNIST's test split, or None."""
    candidates = [Path(environ["HVAE_FASHION_MNIST"])] if environ.get("HVAE_FASHION_MNIST") \
        else []
    for folder in candidates + list(places):
        if folder.is_dir() and any(folder.glob("t10k-images-idx3-ubyte*")):
            return folder
    return None


def execute(path, probe=False):
    """Run the notebook at ``path`` in a new kernel of this interpreter, in
    notebooks/; returns the executed notebook. Raises on any cell's error.
    With ``probe``, also returns what PROBE printed, as a dict."""
    notebook = nbformat.read(path, as_version=4)
    if probe:
        notebook.cells.append(nbformat.v4.new_code_cell(PROBE))
    # This interpreter, whatever 'python' is on PATH, importing this
    # repository's hvae (the kernel runs in notebooks/, where an installed
    # hvae of another checkout would come first).
    manager = KernelManager(kernel_name="python3")
    manager.kernel_spec.argv[0] = sys.executable
    client = nbclient.NotebookClient(notebook, km=manager, timeout=CELL_TIMEOUT,
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY), saved]))
    try:
        client.execute()
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved
    if not probe:
        return notebook
    probe_cell = notebook.cells.pop()
    text = "".join(output.get("text", "") for output in probe_cell.outputs
                   if output.output_type == "stream")
    line = next(line for line in text.splitlines() if line.startswith("HVAE-PROBE "))
    return notebook, ast.literal_eval(line[len("HVAE-PROBE "):])


def notebook_paths():
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def test_there_are_notebooks():
    names = [path.name for path in notebook_paths()]
    assert {"01_quickstart.ipynb", "02_hierarchy.ipynb", "03_scikit_learn.ipynb"} <= set(names)


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda path: path.stem)
def test_notebook_is_stored_with_its_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.execution_count is not None for cell in code), \
        "stored without executing: run python tests/test_notebooks.py --store"
    counts = [cell.execution_count for cell in code]
    assert counts == list(range(1, len(code) + 1)), "cells stored out of order"
    for cell in code:
        for output in cell.outputs:
            assert output.output_type != "error", (path.name, output.get("ename"))


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda path: path.stem)
def test_notebook_executes(path, monkeypatch):
    required = REQUIRED_DATA.get(path.stem)
    if required == "Fashion-MNIST":
        folder = fashion_mnist_dir()
        if folder is None:
            pytest.fail(f"{path.name} is about Fashion-MNIST, which is in none of "
                        f"$HVAE_FASHION_MNIST, {', '.join(map(str, FASHION_MNIST_PLACES))}: "
                        "put its four IDX files in one of them (apt-get install "
                        "dataset-fashion-mnist) rather than test the notebook's fallback")
        monkeypatch.setenv("HVAE_FASHION_MNIST", str(folder))   # the kernel inherits it
    notebook, probe = execute(path, probe=True)
    if required is not None:
        assert probe["data_name"] == required, \
            f"{path.name} ran on {probe['data_name']!r}, not on {required}"
    assert probe["active_units"], "no fitted model found in the notebook"
    for name, active in probe["active_units"].items():
        assert min(active) > 0, f"{path.name}: {name} collapsed: active units {active}"
    for cell in notebook.cells:
        if cell.cell_type == "code":
            for output in cell.outputs:
                assert output.output_type != "error", output.get("ename")
                if output.output_type == "stream" and output.name == "stderr":
                    # A warning in a tutorial is a bug in the tutorial (tqdm's
                    # bar is a widget, not stderr text, in a notebook).
                    assert "Warning" not in output.text, output.text


def test_the_data_search_finds_nothing_where_nothing_is(tmp_path):
    assert fashion_mnist_dir({"HVAE_FASHION_MNIST": str(tmp_path)}, [tmp_path / "none"]) is None
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"")
    assert fashion_mnist_dir({"HVAE_FASHION_MNIST": str(tmp_path)}, []) == tmp_path
    assert fashion_mnist_dir({}, [tmp_path / "none", tmp_path]) == tmp_path


def _code_cells(name):
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    return [cell.source for cell in notebook.cells if cell.cell_type == "code"]


def test_notebook_02_falls_back_visibly_and_its_models_stay_active(tmp_path, monkeypatch):
    """Without Fashion-MNIST, notebook 02's data cell warns (a pink stderr box
    in Jupyter) and its models, sized for the digits, do not collapse. Its
    first two code cells run here, in this process, away from any data."""
    if Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Debian's Fashion-MNIST is installed: the notebook cannot fall back here")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("HVAE_FASHION_MNIST", str(empty))
    monkeypatch.chdir(tmp_path)            # no shared/data/fashion-mnist above it
    load, fit = _code_cells("02_hierarchy")[:2]
    load = "\n".join(line for line in load.splitlines() if not line.startswith("%"))
    namespace = {}
    with pytest.warns(UserWarning, match="Fashion-MNIST not found"):
        exec(load, namespace)
    assert "FALLBACK" in namespace["data_name"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")     # a tutorial's cell warns about nothing
        exec(fit, namespace)
    for name, model in namespace["models"].items():
        assert min(model.active_units(namespace["X_test"])) > 0, name


if __name__ == "__main__":
    if sys.argv[1:2] != ["--store"]:
        sys.exit("usage: python tests/test_notebooks.py --store [notebook names...]")
    chosen = set(sys.argv[2:])
    for path in notebook_paths():
        if chosen and path.name not in chosen and path.stem not in chosen:
            continue
        start = time.perf_counter()
        executed = execute(path)
        nbformat.write(executed, path)
        print(f"{path.name}: executed and stored in {time.perf_counter() - start:.1f} s")
