"""Execution-provider selection and fallback (CI has no GPU: the GPU tests skip)."""

import warnings

import numpy as np
import onnxruntime as ort
import pytest
from sklearn.base import clone

from deepfeat import ImageEmbedder
from deepfeat.runtime import (
    ProviderError,
    ProviderFallbackWarning,
    Runner,
    cuda_provider,
    resolve_providers,
    tensorrt_provider,
)

from .conftest import TINY_PREPROCESSING, build_tiny_cnn

HAVE_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
MISSING = "NoSuchExecutionProvider"


def test_auto_ends_with_cpu_and_only_lists_installed():
    resolved = resolve_providers("auto")
    assert resolved[-1][0] == "CPUExecutionProvider"
    assert all(name in ort.get_available_providers() for name, _ in resolved)


def test_short_names_and_option_pairs():
    assert resolve_providers("cpu") == [("CPUExecutionProvider", {})]
    assert resolve_providers([("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})]) == [
        ("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})
    ]


def test_missing_provider_warns_naming_it_and_falls_back():
    with pytest.warns(ProviderFallbackWarning, match=rf"{MISSING}.*not available.*Using \['CPUExecutionProvider'\]"):
        resolved = resolve_providers([MISSING, "cpu"])
    assert resolved == [("CPUExecutionProvider", {})]


@pytest.mark.skipif(HAVE_CUDA, reason="CUDA is present here")
def test_cuda_requested_without_gpu_build():
    with pytest.warns(ProviderFallbackWarning, match="CUDAExecutionProvider"):
        assert resolve_providers("cuda")[0][0] == "CPUExecutionProvider"
    with pytest.raises(ProviderError, match="CUDAExecutionProvider.*deepfeat\\[gpu\\]"):
        resolve_providers(cuda_provider(0), strict=True)


def test_strict_embedder_refuses_in_fit(tiny_model_path):
    emb = ImageEmbedder(model=str(tiny_model_path), preprocessing=TINY_PREPROCESSING,
                        providers=[MISSING], strict_providers=True)
    with pytest.raises(ProviderError, match=MISSING):
        emb.fit()


def test_fitted_embedder_shows_provider_in_use(tiny_model_path):
    emb = ImageEmbedder(model=str(tiny_model_path), preprocessing=TINY_PREPROCESSING, providers=[MISSING, "cpu"])
    with pytest.warns(ProviderFallbackWarning):
        emb.fit()
    assert emb.providers_ == ["CPUExecutionProvider"]


def test_bad_provider_spec_type():
    with pytest.raises(TypeError, match="name or a \\(name, options\\) pair"):
        resolve_providers([42])


def test_provider_option_helpers():
    assert cuda_provider(2)[1]["device_id"] == 2
    with pytest.raises(ValueError, match="cudnn_conv_algo_search"):
        cuda_provider(cudnn_conv_algo_search="FAST")
    name, opts = tensorrt_provider(fp16=True, engine_cache_dir="/tmp/trt")
    assert name == "TensorrtExecutionProvider" and opts["trt_fp16_enable"] and opts["trt_engine_cache_enable"]


def test_io_binding_path_equals_plain_run():
    model = build_tiny_cnn().SerializeToString()
    x = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    plain = Runner.from_model(model, "cpu", io_binding=False).run(x)
    bound = Runner.from_model(model, "cpu", io_binding=True)
    assert bound.use_io_binding and bound.output_device == ("cpu", 0)
    for a, b in zip(plain, bound.run(x)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_CUDA, reason="needs onnxruntime-gpu and a CUDA GPU")
def test_cuda_features_agree_with_cpu(sample_photos, record_property):
    cpu = ImageEmbedder(layers=["stage4", "pooled"], providers="cpu", progress=False).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProviderFallbackWarning)
        gpu = clone(cpu).set_params(providers=cuda_provider(0), strict_providers=True, batch_size=64).fit()
    assert gpu.providers_[0] == "CUDAExecutionProvider"
    a, b = cpu.transform(sample_photos), gpu.transform(sample_photos)
    runner = gpu._network(("blocks.10", "pooled"))
    assert runner.use_io_binding and runner.output_device == ("cuda", 0)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    record_property("max_abs_diff", float(np.abs(a - b).max()))
    assert cos.min() >= 0.999


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_CUDA, reason="needs onnxruntime-gpu and a CUDA GPU")
def test_cuda_float16_file_agrees_with_cpu_float32(sample_photos, tmp_path):
    from deepfeat.quantize import convert_float16

    half = convert_float16("efficientnet_lite0", tmp_path / "lite0-fp16.onnx")
    a = ImageEmbedder(layers=["stage4", "pooled"], providers="cpu", progress=False).fit_transform(sample_photos)
    b = ImageEmbedder(model=str(half), layers=["stage4", "pooled"], providers="cuda", strict_providers=True,
                      progress=False).fit_transform(sample_photos)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.999


def test_set_params_providers_after_fit_rebuilds_the_session(tiny_model_path, sample_photos):
    emb = ImageEmbedder(model=str(tiny_model_path), preprocessing=TINY_PREPROCESSING, progress=False).fit()
    X = emb.transform(sample_photos)
    first = emb._network(("pooled",))
    emb.set_params(providers=[MISSING, "cpu"])
    with pytest.warns(ProviderFallbackWarning, match=MISSING):
        np.testing.assert_array_equal(emb.transform(sample_photos), X)
    assert emb._network(("pooled",)) is not first and emb.providers_ == ["CPUExecutionProvider"]


def test_inference_threads_reach_the_session_and_set_params_rebuilds_it(tiny_model_path, sample_photos):
    emb = ImageEmbedder(model=str(tiny_model_path), preprocessing=TINY_PREPROCESSING, progress=False,
                        inference_threads=1).fit()
    X = emb.transform(sample_photos)
    assert emb._network(("pooled",)).session.get_session_options().intra_op_num_threads == 1
    emb.set_params(inference_threads=2)
    np.testing.assert_allclose(emb.transform(sample_photos), X, rtol=1e-6, atol=1e-6)  # no refit needed
    assert emb._network(("pooled",)).session.get_session_options().intra_op_num_threads == 2
    with pytest.raises(ValueError, match="inference_threads"):
        clone(emb).set_params(inference_threads=0).fit()
