"""python -m hvae: the main job the README starts with.

It must show a model worth showing: samples that a classifier trained on the
real digits recognises, and the picture it promises.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hvae import __main__ as job

REPOSITORY = Path(__file__).resolve().parent.parent


def test_samples_are_recognisable_and_the_picture_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    output = tmp_path / "digits.png"
    result = job.main(["--quiet", "--output", str(output)])
    # The README states this figure: at least 80% of 100 samples go to one
    # class with probability above 0.8 (83% to 94% over seeds 0 to 7).
    assert result["recognisable"] >= 0.8, result["recognisable"]
    assert result["recognisable_real"] >= 0.9
    assert result["active_units"] == [2]
    assert result["test_elbo"] > -26.0
    data = output.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000


def test_every_option_is_described():
    parser = job.build_parser()
    for action in parser._actions:
        assert action.help, action.option_strings
    text = subprocess.run([sys.executable, "-m", "hvae", "--help"], capture_output=True,
                          text=True, cwd=REPOSITORY, check=True).stdout
    for option in ("--data", "--epochs", "--latent-dims", "--seed", "--output"):
        assert option in text


def _fashion_mnist_dir():
    for path in (os.environ.get("HVAE_FASHION_MNIST"), "/usr/share/datasets/fashion-mnist",
                 REPOSITORY.parent / "shared" / "data" / "fashion-mnist"):
        if path and any(Path(path).glob("t10k-images-idx3-ubyte*")):
            return path
    return None


@pytest.mark.skipif(_fashion_mnist_dir() is None,
                    reason="Fashion-MNIST not found ($HVAE_FASHION_MNIST, "
                           "/usr/share/datasets/fashion-mnist, ../shared/data/fashion-mnist)")
def test_fashion_mnist_is_used_when_installed(tmp_path, capsys):
    output = tmp_path / "fashion.png"
    result = job.main(["--data", "fashion-mnist", "--epochs", "2", "--n-train", "2000",
                       "--quiet", "--output", str(output)])
    assert result["model"].n_features_in_ == 784
    assert "hvae on fashion-mnist: 2000 train / 2000 test images of 784 pixels" in \
        capsys.readouterr().out
    assert output.exists()
