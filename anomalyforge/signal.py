"""Signal-processing steps shared by training and the device (numpy only).

Training and the device runtime both call these functions, so a window is turned into
model input by exactly the same arithmetic on both sides. The bundle manifest records the
step names and parameters (see :func:`preprocessing_spec`), and the device rebuilds the
pipeline from that record with :func:`apply_preprocessing`.
"""

from __future__ import annotations

import numpy as np

from anomalyforge.errors import InvalidInputError

# UCR archives z-normalise each series with the sample standard deviation (ddof=1); using
# the same convention makes re-normalising an ECG5000 beat an identity up to rounding.
ZNORM_DDOF = 1
ZNORM_EPS = 1e-8


def check_windows(windows, length: int | None = None, name: str = "windows") -> np.ndarray:
    """Return ``windows`` as a finite float32 array of shape (n_windows, length).

    A single window of shape (length,) is promoted to (1, length). Raises
    InvalidInputError naming the offending shape or the first non-finite position.
    """
    array = np.asarray(windows, dtype=np.float32)
    if array.ndim == 1:
        array = array[np.newaxis, :]
    if array.ndim != 2:
        raise InvalidInputError(
            f"{name} must have shape (n_windows, length), got shape {array.shape}; "
            "reshape the data to one window per row"
        )
    if length is not None and array.shape[1] != length:
        raise InvalidInputError(
            f"{name} have {array.shape[1]} samples per window but the model expects {length}; "
            "resample or re-cut the windows to the model's window length"
        )
    if not np.all(np.isfinite(array)):
        row, col = np.argwhere(~np.isfinite(array))[0]
        raise InvalidInputError(
            f"{name} contain a non-finite value ({array[row, col]}) at window {row}, "
            f"sample {col}; drop or repair NaN / inf samples before scoring"
        )
    return array


def znormalize(windows, eps: float = ZNORM_EPS) -> np.ndarray:
    """Z-normalise each window to zero mean and unit sample standard deviation.

    Parameters
    ----------
    windows : array_like of shape (n_windows, length) or (length,)
        Finite samples.
    eps : float, default=1e-8
        Added to the standard deviation so a flat window maps to zeros instead of NaN.

    Returns
    -------
    ndarray of shape (n_windows, length), float32
    """
    array = check_windows(windows).astype(np.float64)
    mean = array.mean(axis=1, keepdims=True)
    std = array.std(axis=1, ddof=ZNORM_DDOF, keepdims=True)
    return ((array - mean) / (std + eps)).astype(np.float32)


def resample_beat(beat, length: int) -> np.ndarray:
    """Resample one beat to ``length`` samples by linear interpolation.

    ECG5000 beats were interpolated to 140 samples; raw beats cut around an R peak are
    brought to the model's length the same way. Returns a float32 array of shape (length,).
    """
    beat = np.asarray(beat, dtype=np.float64)
    if beat.ndim != 1 or beat.size < 2:
        raise InvalidInputError(
            f"a beat must be a 1-D array of at least 2 samples, got shape {beat.shape}"
        )
    if length < 2:
        raise InvalidInputError(f"length must be at least 2, got {length}")
    source = np.linspace(0.0, 1.0, beat.size)
    target = np.linspace(0.0, 1.0, length)
    return np.interp(target, source, beat).astype(np.float32)


def preprocessing_spec(eps: float = ZNORM_EPS) -> list[dict]:
    """Return the manifest record of the preprocessing applied to every window."""
    return [{"name": "znormalize", "ddof": ZNORM_DDOF, "eps": eps}]


def apply_preprocessing(spec: list[dict], windows) -> np.ndarray:
    """Apply the steps recorded by :func:`preprocessing_spec` to ``windows``.

    Raises InvalidInputError for a step this version does not implement, so a bundle
    written by a newer toolkit is not silently scored with different features.
    """
    result = check_windows(windows)
    for step in spec:
        name = step.get("name")
        if name == "znormalize":
            if step.get("ddof", ZNORM_DDOF) != ZNORM_DDOF:
                raise InvalidInputError(
                    f"znormalize with ddof={step['ddof']} is not supported (only {ZNORM_DDOF})"
                )
            result = znormalize(result, eps=float(step.get("eps", ZNORM_EPS)))
        else:
            raise InvalidInputError(
                f"unknown preprocessing step {name!r} in the bundle manifest; "
                "upgrade anomalyforge to the version that wrote the bundle"
            )
    return result
