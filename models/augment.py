"""Training-time augmentation of mammograms and their aligned lesion masks (numpy + OpenCV).

Apply it to training folds only: validation, test and cross-validation hold-out images must
reach the model as the app would give them, so the training code calls an :class:`Augmenter`
on the training side of a split and never on the other.

Geometry (flips, rotation, scale) moves the image and its mask together, the mask with
nearest-neighbour sampling so it stays a mask; intensity jitter (brightness, contrast, gamma)
touches the image only. All randomness comes from the ``np.random.Generator`` passed in, so a
seed reproduces a training run.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Augmenter:
    """Random augmentation with its ranges.

    Attributes
    ----------
    hflip_p, vflip_p
        Probabilities of a left-right and an up-down flip. A left-right flip turns a right
        breast into a plausible left one.
    rotation_deg
        Rotation drawn uniformly from ``[-rotation_deg, rotation_deg]`` degrees, about the
        image centre.
    scale
        Isotropic zoom range about the image centre (1.1 = 10 % larger).
    brightness
        Added offset drawn from ``[-brightness, brightness]`` (image values are in [0, 1]).
    contrast
        Factor on the deviation from the image mean.
    gamma
        Exponent range; drawn log-uniformly so that brightening and darkening are equally likely.
    """

    hflip_p: float = 0.5
    vflip_p: float = 0.5
    rotation_deg: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    brightness: float = 0.05
    contrast: tuple[float, float] = (0.9, 1.1)
    gamma: tuple[float, float] = (0.8, 1.25)

    def __call__(
        self,
        image: np.ndarray,
        mask: np.ndarray | None = None,
        *,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Augment one image and, identically in geometry, its mask.

        Parameters
        ----------
        image
            (H, W) float in [0, 1].
        mask
            None, or (H, W) or (H, W, C) of any dtype (bool masks stay bool), aligned with
            ``image``.
        rng
            The source of randomness; equal seeds give equal outputs.

        Returns
        -------
        tuple[np.ndarray, np.ndarray | None]
            The image, (H, W) float32 clipped to [0, 1], and the mask with its input shape and
            dtype (None if none was given). Pixels brought in from outside the image are 0.
        """
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 2:
            raise ValueError(f"image must be (H, W), not {image.shape}")
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape[:2] != image.shape:
                raise ValueError(f"mask {mask.shape} is not aligned with image {image.shape}")

        # Draw every random number up front, in a fixed order, so the stream does not depend
        # on whether a mask was given.
        hflip = rng.random() < self.hflip_p
        vflip = rng.random() < self.vflip_p
        angle = rng.uniform(-self.rotation_deg, self.rotation_deg)
        zoom = rng.uniform(*self.scale)
        offset = rng.uniform(-self.brightness, self.brightness)
        factor = rng.uniform(*self.contrast)
        gamma = float(np.exp(rng.uniform(np.log(self.gamma[0]), np.log(self.gamma[1]))))

        if hflip:
            image, mask = _flip(image, mask, axis=1)
        if vflip:
            image, mask = _flip(image, mask, axis=0)
        if angle != 0.0 or zoom != 1.0:
            h, w = image.shape
            matrix = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), angle, zoom)
            image = _warp(image, matrix, cv2.INTER_LINEAR)
            if mask is not None:
                mask = _warp_mask(mask, matrix)

        image = (image - image.mean()) * factor + image.mean() + offset
        image = np.clip(image, 0.0, 1.0) ** gamma
        if mask is not None:
            mask = np.array(mask, copy=True, order="C")  # never a view of the caller's array
        return np.clip(image, 0.0, 1.0).astype(np.float32), mask


def _flip(image: np.ndarray, mask: np.ndarray | None, axis: int):
    image = np.flip(image, axis=axis)
    return image, None if mask is None else np.flip(mask, axis=axis)


def _warp(plane: np.ndarray, matrix: np.ndarray, interpolation: int) -> np.ndarray:
    h, w = plane.shape[:2]
    return cv2.warpAffine(
        np.ascontiguousarray(plane),
        matrix,
        (w, h),
        flags=interpolation,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )


def _warp_mask(mask: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Warp with nearest-neighbour sampling, keeping the mask's shape and dtype."""
    dtype = mask.dtype
    work = mask.astype(np.uint8) if dtype == np.bool_ else mask
    if work.dtype not in (np.uint8, np.uint16, np.int16, np.float32, np.float64):
        work = work.astype(np.float32)
    planes = [work] if work.ndim == 2 else [work[..., c] for c in range(work.shape[2])]
    warped = [_warp(p, matrix, cv2.INTER_NEAREST) for p in planes]
    out = warped[0] if work.ndim == 2 else np.stack(warped, axis=-1)
    return out.astype(dtype)
