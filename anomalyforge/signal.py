"""Signal-processing steps shared by training and the device (numpy only).

Training and the device runtime both call these functions, so a window is turned into
model input by exactly the same arithmetic on both sides. The bundle manifest records the
step names and parameters (see :func:`preprocessing_spec`), and the device rebuilds the
pipeline from that record with :func:`apply_preprocessing`.
"""

from __future__ import annotations

import functools
import sys

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
        elif name == LOG_MEL_STEP:
            result = log_mel_windows(result, step)
        else:
            raise InvalidInputError(
                f"unknown preprocessing step {name!r} in the bundle manifest; "
                "upgrade anomalyforge to the version that wrote the bundle"
            )
    return result


# ---------------------------------------------------------------------------------------
# Log-mel features for machine sounds.
#
# The defaults are the DCASE 2020 Task 2 baseline settings: 16 kHz audio, 1024-point FFT,
# hop 512, 128 mel bands, power 2, 10 * log10(mel + eps) with eps = float64 machine
# epsilon, and 5 consecutive frames stacked into one 640-value vector. Frames are not
# centred (the DCASE baseline calls librosa with center=True), so a stream can be cut
# into frames without padding and the device computes exactly the frames training saw.

LOG_MEL_STEP = "log_mel_stack"
LOG_MEL_EPS = sys.float_info.epsilon
LEVEL_NORMALISATIONS = ("none", "stack_mean")
# Slaney mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above it.
SLANEY_HZ_PER_MEL = 200.0 / 3.0
SLANEY_LOG_START_HZ = 1000.0
SLANEY_LOG_STEP = np.log(6.4) / 27.0


def hz_to_mel(frequencies_hz) -> np.ndarray:
    """Convert frequencies in Hz to the Slaney mel scale (linear below 1 kHz, log above)."""
    frequencies = np.asarray(frequencies_hz, dtype=np.float64)
    mels = frequencies / SLANEY_HZ_PER_MEL
    log_start_mel = SLANEY_LOG_START_HZ / SLANEY_HZ_PER_MEL
    above = frequencies >= SLANEY_LOG_START_HZ
    mels = np.where(
        above,
        log_start_mel + np.log(np.maximum(frequencies, SLANEY_LOG_START_HZ) / SLANEY_LOG_START_HZ)
        / SLANEY_LOG_STEP,
        mels,
    )
    return mels


def mel_to_hz(mels) -> np.ndarray:
    """Convert Slaney mel values back to Hz (the inverse of :func:`hz_to_mel`)."""
    mels = np.asarray(mels, dtype=np.float64)
    log_start_mel = SLANEY_LOG_START_HZ / SLANEY_HZ_PER_MEL
    return np.where(
        mels >= log_start_mel,
        SLANEY_LOG_START_HZ * np.exp(SLANEY_LOG_STEP * (mels - log_start_mel)),
        SLANEY_HZ_PER_MEL * mels,
    )


@functools.lru_cache(maxsize=8)
def mel_filterbank(sample_rate_hz: float, n_fft: int, n_mels: int, fmin: float = 0.0,
                   fmax: float | None = None) -> np.ndarray:
    """Build triangular mel filters with Slaney area normalisation.

    Band i rises linearly from mel point i to mel point i + 1 and falls to mel point i + 2,
    where the n_mels + 2 points are equally spaced on the Slaney mel scale between
    ``fmin`` and ``fmax``. Each triangle is scaled by 2 / (its width in Hz), so every band
    has the same area.

    Parameters
    ----------
    sample_rate_hz : float
        Sample rate of the audio, > 0.
    n_fft : int
        FFT length, at least 2. The filters cover its ``n_fft // 2 + 1`` bins.
    n_mels : int
        Number of mel bands, at least 1.
    fmin : float, default=0.0
        Lower edge of the lowest band in Hz.
    fmax : float or None, default=None
        Upper edge of the highest band in Hz; None means ``sample_rate_hz / 2``.

    Returns
    -------
    ndarray of shape (n_mels, n_fft // 2 + 1), float64
        Read-only (the result is cached).
    """
    if not sample_rate_hz > 0:
        raise InvalidInputError(f"sample_rate_hz must be positive, got {sample_rate_hz}")
    if n_fft < 2 or n_mels < 1:
        raise InvalidInputError(f"n_fft must be at least 2 and n_mels at least 1, got {n_fft} and {n_mels}")
    fmax = sample_rate_hz / 2.0 if fmax is None else float(fmax)
    if not 0.0 <= fmin < fmax <= sample_rate_hz / 2.0:
        raise InvalidInputError(
            f"mel band edges must satisfy 0 <= fmin < fmax <= sample_rate_hz / 2, got fmin={fmin}, "
            f"fmax={fmax}, sample_rate_hz={sample_rate_hz}"
        )
    bin_frequencies = np.linspace(0.0, sample_rate_hz / 2.0, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    widths = np.diff(edges)

    filters = np.zeros((n_mels, len(bin_frequencies)))
    for band in range(n_mels):
        rising = (bin_frequencies - edges[band]) / widths[band]
        falling = (edges[band + 2] - bin_frequencies) / widths[band + 1]
        filters[band] = np.maximum(0.0, np.minimum(rising, falling))
    filters *= (2.0 / (edges[2:] - edges[:-2]))[:, np.newaxis]
    filters.setflags(write=False)
    return filters


@functools.lru_cache(maxsize=8)
def periodic_hann(length: int) -> np.ndarray:
    """Return the periodic Hann window of ``length`` samples (the DFT-even form used for STFTs)."""
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(length) / length)
    window.setflags(write=False)
    return window


def log_mel_frames(samples, sample_rate_hz: float = 16000.0, n_fft: int = 1024, hop_length: int = 512,
                   n_mels: int = 128, fmin: float = 0.0, fmax: float | None = None, power: float = 2.0,
                   eps: float = LOG_MEL_EPS) -> np.ndarray:
    """Compute the log-mel spectrogram of a mono signal, one row per STFT frame.

    Frame t covers ``samples[t * hop_length : t * hop_length + n_fft]`` (no centring or
    padding) and is weighted by a periodic Hann window. The value of band m is
    ``10 * log10(sum_k filters[m, k] * |X_t[k]| ** power + eps)``.

    Parameters
    ----------
    samples : array_like of shape (n_samples,)
        Audio in full scale: 16-bit PCM divided by 32768. The samples are rounded to
        float32 first, so a float64 signal and its float32 copy give the same features.
    sample_rate_hz, n_fft, hop_length, n_mels, fmin, fmax
        STFT and mel filter settings; see :func:`mel_filterbank`. ``hop_length`` >= 1.
    power : float, default=2.0
        Exponent of the magnitude: 2 for power, 1 for amplitude.
    eps : float, default=sys.float_info.epsilon
        Added before the logarithm, so silence gives about -156.5 dB instead of -inf.

    Returns
    -------
    ndarray of shape (n_frames, n_mels), float32
        ``n_frames = 1 + (n_samples - n_fft) // hop_length``, or 0 when the signal is
        shorter than one frame.

    Notes
    -----
    Each frame's result depends only on its own samples: the mel projection uses
    ``numpy.einsum``, whose sum order does not change with the number of frames (BLAS
    matrix products may), so a stream cut into blocks gives bit-identical frames.
    """
    signal = np.asarray(samples, dtype=np.float32)
    if signal.ndim != 1:
        raise InvalidInputError(
            f"samples must be a 1-D mono signal, got shape {signal.shape}; select or average channels first"
        )
    if hop_length < 1:
        raise InvalidInputError(f"hop_length must be at least 1 sample, got {hop_length}")
    if not np.all(np.isfinite(signal)):
        position = int(np.argmax(~np.isfinite(signal)))
        raise InvalidInputError(f"samples contain a non-finite value at sample {position}; repair the audio first")
    filters = mel_filterbank(float(sample_rate_hz), int(n_fft), int(n_mels), float(fmin),
                             None if fmax is None else float(fmax))
    if len(signal) < n_fft:
        return np.zeros((0, n_mels), dtype=np.float32)

    frames = np.lib.stride_tricks.sliding_window_view(signal.astype(np.float64), n_fft)[::hop_length]
    spectrum = np.abs(np.fft.rfft(frames * periodic_hann(int(n_fft)), axis=1)) ** power
    mel = np.einsum("fk,mk->fm", spectrum, filters)
    return (10.0 * np.log10(mel + eps)).astype(np.float32)


def stack_frames(frames, n_stack: int = 5) -> np.ndarray:
    """Concatenate every run of ``n_stack`` consecutive frames into one vector.

    Row t is ``[frames[t], frames[t + 1], ..., frames[t + n_stack - 1]]``, frame after
    frame, as in the DCASE 2020 baseline.

    Parameters
    ----------
    frames : array_like of shape (n_frames, n_mels)
    n_stack : int, default=5

    Returns
    -------
    ndarray of shape (max(0, n_frames - n_stack + 1), n_stack * n_mels), float32
    """
    frames = np.asarray(frames, dtype=np.float32)
    if frames.ndim != 2:
        raise InvalidInputError(f"frames must have shape (n_frames, n_mels), got shape {frames.shape}")
    if n_stack < 1:
        raise InvalidInputError(f"n_stack must be at least 1, got {n_stack}")
    n_rows = max(0, len(frames) - n_stack + 1)
    if n_rows == 0:
        return np.zeros((0, n_stack * frames.shape[1]), dtype=np.float32)
    return np.concatenate([frames[offset:offset + n_rows] for offset in range(n_stack)], axis=1)


def normalise_level(stacks, mode: str = "none") -> np.ndarray:
    """Remove the overall level from stacked log-mel vectors.

    ``"stack_mean"`` subtracts each vector's mean (in dB), which cancels any constant
    gain applied to the audio, except where a band sits at the ``eps`` floor.
    ``"none"`` returns the vectors unchanged.
    """
    if mode not in LEVEL_NORMALISATIONS:
        raise InvalidInputError(f"level_normalisation must be one of {list(LEVEL_NORMALISATIONS)}, got {mode!r}")
    stacks = np.asarray(stacks, dtype=np.float32)
    if mode == "none":
        return stacks
    return (stacks - stacks.mean(axis=1, keepdims=True, dtype=np.float64).astype(np.float32)).astype(np.float32)


def log_mel_spec(sample_rate_hz: float = 16000.0, n_fft: int = 1024, hop_length: int = 512, n_mels: int = 128,
                 fmin: float = 0.0, fmax: float | None = None, power: float = 2.0, n_stack: int = 5,
                 level_normalisation: str = "none", eps: float = LOG_MEL_EPS) -> list[dict]:
    """Return the manifest preprocessing record of the stacked log-mel features.

    The step maps a raw window of ``(n_stack - 1) * hop_length + n_fft`` samples (3072 with
    the defaults) to one vector of ``n_stack * n_mels`` values (640). Every parameter that
    changes the features is recorded, so the device rebuilds them exactly.
    """
    step = {
        "name": LOG_MEL_STEP,
        "sample_rate_hz": float(sample_rate_hz),
        "n_fft": int(n_fft),
        "win_length": int(n_fft),
        "window": "hann-periodic",
        "hop_length": int(hop_length),
        "center": False,
        "n_mels": int(n_mels),
        "fmin": float(fmin),
        "fmax": float(sample_rate_hz / 2.0 if fmax is None else fmax),
        "mel_scale": "slaney",
        "filter_norm": "slaney",
        "power": float(power),
        "log": "10*log10(mel + eps)",
        "eps": float(eps),
        "n_stack": int(n_stack),
        "level_normalisation": level_normalisation,
        "input_scale": "full scale: 16-bit PCM / 32768",
    }
    check_log_mel_step(step)
    return [step]


def check_log_mel_step(step: dict) -> dict:
    """Return the keyword arguments of :func:`log_mel_frames` for a manifest step, or raise.

    Raises InvalidInputError for a window, mel scale, normalisation or centring this
    version does not implement, so such a bundle is never scored with other features.
    """
    fixed = {"window": "hann-periodic", "center": False, "mel_scale": "slaney", "filter_norm": "slaney",
             "log": "10*log10(mel + eps)"}
    for key, supported in fixed.items():
        if step.get(key, supported) != supported:
            raise InvalidInputError(
                f"log_mel_stack with {key}={step[key]!r} is not supported (only {supported!r}); "
                "upgrade anomalyforge to the version that wrote the bundle"
            )
    if int(step.get("win_length", step["n_fft"])) != int(step["n_fft"]):
        raise InvalidInputError(
            f"log_mel_stack with win_length={step['win_length']} != n_fft={step['n_fft']} is not supported"
        )
    normalise_level(np.zeros((0, 1)), step.get("level_normalisation", "none"))
    return {
        "sample_rate_hz": float(step["sample_rate_hz"]),
        "n_fft": int(step["n_fft"]),
        "hop_length": int(step["hop_length"]),
        "n_mels": int(step["n_mels"]),
        "fmin": float(step.get("fmin", 0.0)),
        "fmax": step.get("fmax"),
        "power": float(step.get("power", 2.0)),
        "eps": float(step.get("eps", LOG_MEL_EPS)),
    }


def log_mel_window_length(step: dict) -> int:
    """Return the raw samples one stacked vector needs: (n_stack - 1) * hop_length + n_fft."""
    return (int(step["n_stack"]) - 1) * int(step["hop_length"]) + int(step["n_fft"])


def log_mel_features(samples, step: dict) -> np.ndarray:
    """Turn one whole mono recording into stacked log-mel vectors (the training path).

    Returns
    -------
    ndarray of shape (n_frames - n_stack + 1, n_stack * n_mels), float32
    """
    frames = log_mel_frames(samples, **check_log_mel_step(step))
    stacks = stack_frames(frames, int(step["n_stack"]))
    return normalise_level(stacks, step.get("level_normalisation", "none"))


def log_mel_windows(windows, step: dict) -> np.ndarray:
    """Map raw windows of :func:`log_mel_window_length` samples to one stacked vector each."""
    length = log_mel_window_length(step)
    windows = check_windows(windows, length, name="audio windows")
    n_values = int(step["n_stack"]) * int(step["n_mels"])
    features = np.empty((len(windows), n_values), dtype=np.float32)
    for row, window in enumerate(windows):
        features[row] = log_mel_features(window, step)[0]
    return features
