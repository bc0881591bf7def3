"""The benchmark's stand-in ResNet-50 has ResNet-50's architecture (so its speeds are ResNet-50's)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from deepfeat import ImageEmbedder
from deepfeat.graph import tensor_shapes

from .conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
random_resnet50 = pytest.importorskip("random_resnet50")


@pytest.fixture(scope="module")
def resnet50():
    return random_resnet50.build()


def test_parameter_count_matches_torchvision(resnet50):
    # torchvision's resnet50 has 25,557,032 parameters; folding each batch norm's 2 per-channel
    # parameters (26,560 channels) into one conv bias leaves 25,557,032 - 26,560
    n = sum(int(np.prod(t.dims)) for t in resnet50.graph.initializer)
    assert n == 25_557_032 - 26_560


def test_stage_shapes_and_embedder(resnet50, tmp_path, sample_photos):
    shapes = tensor_shapes(resnet50)
    expected = {"maxpool": (64, 56, 56), "layer1": (256, 56, 56), "layer2": (512, 28, 28),
                "layer3": (1024, 14, 14), "layer4": (2048, 7, 7), "logits": (1000,)}
    for name, shape in expected.items():
        assert tuple(shapes[name][1:]) == shape, name
    path = tmp_path / "r50.onnx"
    path.write_bytes(resnet50.SerializeToString())
    X = ImageEmbedder(model=str(path), preprocessing=random_resnet50.PREPROCESSING, layers=["stage3", "pooled"],
                      progress=False).fit_transform(sample_photos)
    assert X.shape == (2, 1024 + 2048) and np.isfinite(X).all() and X.std() > 0


def test_update_replaces_only_the_measured_sections():
    run = pytest.importorskip("run")
    old = "# Benchmark results\n\n- Command: `python benchmarks/run.py` (every number below comes from this one run)\n\n" \
          "## A\n\nold a\n\n## B\n\nold b\n"
    new = run._merge(old, ["_Re-measured today._\n## B\n\nnew b\n", "_Re-measured today._\n## C\n\nnew c\n"])
    assert "old a" in new and "old b" not in new and "new b" in new and new.index("## B") < new.index("## C")
    assert new.count("_Re-measured today._") == 2 and "except sections marked re-measured" in new


@pytest.mark.slow
def test_layers_benchmark_finds_the_same_aliases_both_ways():
    bench_layers = pytest.importorskip("bench_layers")
    table = bench_layers.run(quick=True)
    assert "| ResNet-50 (102 MB) |" in table and table.rstrip().endswith("| yes |")
