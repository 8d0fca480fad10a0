"""Every notebook in notebooks/ runs from a clean kernel without an error.

The notebooks are stored with their outputs. To re-execute them and store the
new outputs: ``python tests/test_notebooks.py --store [names...]``.
"""
import sys
import time
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


def execute(path):
    """Run the notebook at ``path`` in a new kernel of this interpreter, in
    notebooks/; returns the executed notebook. Raises on any cell's error."""
    notebook = nbformat.read(path, as_version=4)
    # This interpreter, whatever 'python' is on PATH.
    manager = KernelManager(kernel_name="python3")
    manager.kernel_spec.argv[0] = sys.executable
    client = nbclient.NotebookClient(notebook, km=manager, timeout=CELL_TIMEOUT,
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    return notebook


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
def test_notebook_executes(path):
    notebook = execute(path)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            for output in cell.outputs:
                assert output.output_type != "error", output.get("ename")
                if output.output_type == "stream" and output.name == "stderr":
                    # A warning in a tutorial is a bug in the tutorial (tqdm's
                    # bar is a widget, not stderr text, in a notebook).
                    assert "Warning" not in output.text, output.text


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
