"""Every Python code block of README.md runs.

Each fenced ```python block runs in a fresh namespace, in a temporary folder
holding small ``train.npy`` and ``data.npy`` files (the digits, for the blocks
that read such files). An HTML comment on the line before a block, invisible
on GitHub, says more:

* ``<!-- readme-test: name=tour -->`` names the block;
* ``<!-- readme-test: after=tour -->`` runs the named block first, in the same
  fresh namespace (the README says which blocks continue the tour's session);
* ``<!-- readme-test: after=tour subsample=600 -->`` also keeps only the
  first 600 rows of the tour's data (``X``, ``y``, ``X_train``, ``y_train``,
  ``X_test``, ``y_test``) before the block runs, to keep the test fast;
* ``<!-- readme-test: mpirun=2 -->`` writes the block to ``train.py`` and runs
  it with ``mpirun -n 2`` (skipped, with the reason, without MPI);
* ``<!-- readme-test: skip=reason -->`` skips the block, and pytest reports the
  reason.

Shell blocks are not run: ``python -m hvae`` has its own test
(tests/test_main.py), and ``pytest`` is this suite.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mpi_probe import mpi_missing  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"
_DIRECTIVE = re.compile(r"<!--\s*readme-test:\s*(.*?)\s*-->")
_FENCE = re.compile(r"^```(\w*)\s*$")


def readme_blocks(text=None):
    """[(line number, language, code, directives)] of README's fenced blocks."""
    lines = (README.read_text(encoding="utf-8") if text is None else text).splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        start, language = i, fence.group(1)
        end = start + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        directives = {}
        before = lines[start - 1] if start > 0 else ""
        match = _DIRECTIVE.search(before)
        if match:
            for item in re.split(r"\s+(?=\w+=)", match.group(1)):
                key, _, value = item.partition("=")
                directives[key.strip()] = value.strip()
        blocks.append((start + 1, language, "\n".join(lines[start + 1:end]) + "\n", directives))
        i = end + 1
    return blocks


def python_blocks():
    return [block for block in readme_blocks() if block[1] == "python"]


def named_blocks():
    return {block[3]["name"]: block for block in python_blocks() if "name" in block[3]}


def block_id(block):
    return f"line{block[0]}"




@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A temporary current folder with the small files the blocks read."""
    from hvae.datasets import load_digits

    X = load_digits(return_y=False)
    np.save(tmp_path / "train.npy", X)
    np.save(tmp_path / "data.npy", X)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_block(code, namespace, line):
    exec(compile(code, f"README.md:{line}", "exec"), namespace)


def test_the_readme_has_python_blocks():
    blocks = python_blocks()
    assert len(blocks) >= 8
    names = named_blocks()
    assert "tour" in names
    for line, _, _, directives in blocks:
        assert set(directives) <= {"name", "after", "subsample", "mpirun", "skip"}, \
            (line, directives)
        if "after" in directives:
            assert directives["after"] in names, (line, directives)


@pytest.mark.parametrize("block", python_blocks(), ids=block_id)
def test_readme_block_runs(block, workdir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    line, _, code, directives = block
    if "skip" in directives:
        pytest.skip(f"README.md line {line}: {directives['skip']}")
    if "mpirun" in directives:
        missing = mpi_missing()
        if missing:
            pytest.skip(f"README.md line {line} needs MPI: {missing}")
        (workdir / "train.py").write_text(code)
        env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                   PYTHONPATH=str(README.parent), PYTHONUNBUFFERED="1")
        n = directives["mpirun"]
        # The block's own comment says how to run it; hold the README to it.
        assert f"mpirun -n {n} python train.py" in code
        run = subprocess.run(["mpirun", "-n", n, sys.executable, "train.py"], cwd=workdir,
                             env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        return
    namespace = {"__name__": "__readme__"}
    try:
        if "after" in directives:
            first_line, _, first_code, _ = named_blocks()[directives["after"]]
            run_block(first_code, namespace, first_line)
        if "subsample" in directives:
            rows = int(directives["subsample"])
            for name in ("X", "y", "X_train", "y_train", "X_test", "y_test"):
                if name in namespace:
                    namespace[name] = namespace[name][:rows]
        run_block(code, namespace, line)
    finally:
        plt.close("all")


def test_directives_are_read():
    text = ("x\n<!-- readme-test: after=tour skip=needs a GPU here -->\n```python\n"
            "print(1)\n```\n```bash\nls\n```\n")
    blocks = readme_blocks(text)
    assert [(b[1], b[2], b[3]) for b in blocks] == [
        ("python", "print(1)\n", {"after": "tour", "skip": "needs a GPU here"}),
        ("bash", "ls\n", {})]


def test_the_headline_model_uses_its_latent_units(workdir):
    """The README's first block trains a model that does not collapse (its
    comment promises [8, 4] active units; a collapsed model has [0, 0])."""
    line, _, code, _ = python_blocks()[0]
    assert "HierarchicalVAE(" in code and "active_units" in code
    namespace = {}
    run_block(code, namespace, line)
    vae, X = namespace["vae"], namespace["X"]
    assert vae.active_units(X) == [8, 4]
    assert vae.score(X) > -26.0           # a collapsed model scores about -27.3


def _heading_anchors(text):
    """GitHub's anchors of the Markdown headings outside fenced blocks."""
    anchors, fenced = set(), False
    for line in text.splitlines():
        if _FENCE.match(line.strip()) or line.startswith("```"):
            fenced = not fenced
            continue
        match = re.match(r"^#{1,6} (.+)$", line)
        if match and not fenced:
            title = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower())
            anchors.add(title.replace(" ", "-"))
    return anchors


def test_every_link_within_the_readme_finds_its_heading():
    """The contents list and the cross-references ([text](#anchor)) lead
    somewhere: a heading renamed without its links fails here."""
    text = README.read_text(encoding="utf-8")
    anchors = _heading_anchors(text)
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert len(links) >= 20  # the contents list alone has more
    assert sorted(set(links) - anchors) == []
    # every top-level section is in the contents list
    sections = re.findall(r"^## (.+)$", text, re.M)
    contents = text[text.index("**Contents**"):text.index("## Install and run")]
    for title in sections:
        assert f"[{title}](#" in contents, title
