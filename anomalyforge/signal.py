"""Signal-processing steps shared by training and the device (numpy only).

Training and the device runtime both call these functions, so a window is turned into
model input by exactly the same arithmetic on both sides. The bundle manifest records the
step names and parameters (see :func:`preprocessing_spec`), and the device rebuilds the
pipeline from that record with :func:`apply_preprocessing`.
"""

from __future__ import annotations

import functools
import sys
from collections import deque

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


# ---------------------------------------------------------------------------------------
# Raw ECG: streaming QRS detection (Pan-Tompkins) and beat extraction.
#
# Pan & Tompkins, "A real-time QRS detection algorithm", IEEE Trans. Biomed. Eng. 32(3),
# 1985: band-pass 5-15 Hz, five-point derivative, squaring, 150 ms moving-window
# integration, then adaptive signal and noise levels with a 200 ms refractory period,
# T-wave discrimination within 360 ms and search-back after 166 % of the mean RR interval.
# The original integer filters are designed for 200 Hz. Here the band-pass is a linear-phase
# FIR filter (Hamming-windowed sinc) designed for the actual sample rate, so every stage
# is FIR and its delay is known exactly.

QRS_STEP = "qrs_beat_extraction"
QRS_BAND_HZ = (5.0, 15.0)
QRS_BANDPASS_DURATION_S = 0.5
QRS_INTEGRATION_S = 0.150
QRS_REFRACTORY_S = 0.200
QRS_T_WAVE_S = 0.360
QRS_SEARCH_BACK_FACTOR = 1.66
QRS_LEARNING_S = 2.0
# The mean RR interval is clamped to this range (seconds). The upper limit bounds the
# search-back window, and so the memory of pending candidates.
QRS_RR_LIMITS_S = (0.2, 2.0)
# ECG5000 beats put the main QRS deflection 2-5 samples into the 140-sample beat (median 3,
# measured on the 292 normal TRAIN beats), and a beat lasts about one RR interval. A window
# from 15 ms before to 585 ms after the R peak puts the R peak at sample 3.2 of 140 after
# resampling.
BEAT_PRE_S = 0.015
BEAT_POST_S = 0.585
# Input is processed in chunks of this many seconds on a grid fixed to the stream start,
# so the arithmetic, and hence the output, does not depend on how the caller splits blocks.
QRS_CHUNK_S = 0.25


def qrs_beat_spec(sample_rate_hz: float = 360.0, beat_pre_s: float = BEAT_PRE_S,
                  beat_post_s: float = BEAT_POST_S, polarity: int = -1) -> dict:
    """Return the record of raw-ECG beat extraction for a bundle manifest or a report.

    Parameters
    ----------
    sample_rate_hz : float, default=360.0
        Sample rate of the raw ECG, > 0.
    beat_pre_s, beat_post_s : float
        Seconds kept before and after each R peak, both >= 0 with a positive sum.
    polarity : {1, -1}, default=-1
        Factor applied to the beat before resampling and z-normalisation. The default -1
        turns the upright QRS of MIT-BIH lead MLII into the downward main deflection that
        the ECG5000 training beats have. Use 1 for a lead whose QRS already points down.

    Returns
    -------
    dict
        ``name`` is ``"qrs_beat_extraction"``; the other keys are every parameter that
        changes which beats are cut and how.
    """
    if not sample_rate_hz > 0:
        raise InvalidInputError(f"sample_rate_hz must be positive, got {sample_rate_hz}")
    if beat_pre_s < 0 or beat_post_s < 0 or beat_pre_s + beat_post_s <= 0:
        raise InvalidInputError(
            f"beat_pre_s and beat_post_s must be >= 0 with a positive sum, got {beat_pre_s} and {beat_post_s}"
        )
    if polarity not in (1, -1):
        raise InvalidInputError(f"polarity must be 1 or -1, got {polarity!r}")
    return {
        "name": QRS_STEP,
        "detector": "pan-tompkins-streaming",
        "sample_rate_hz": float(sample_rate_hz),
        "band_hz": list(QRS_BAND_HZ),
        "bandpass": f"fir hamming, {qrs_bandpass_taps(sample_rate_hz)} taps",
        "integration_s": QRS_INTEGRATION_S,
        "refractory_s": QRS_REFRACTORY_S,
        "t_wave_s": QRS_T_WAVE_S,
        "search_back_factor": QRS_SEARCH_BACK_FACTOR,
        "learning_s": QRS_LEARNING_S,
        "chunk_s": QRS_CHUNK_S,
        "beat_pre_s": float(beat_pre_s),
        "beat_post_s": float(beat_post_s),
        "polarity": int(polarity),
        "resample": "linear, to task.window_length",
        "normalisation": "znormalize (ddof=1) in the preprocessing steps",
    }


def qrs_bandpass_taps(sample_rate_hz: float) -> int:
    """Return the odd number of taps of the QRS band-pass (about 0.5 s of signal)."""
    return int(round(QRS_BANDPASS_DURATION_S * sample_rate_hz)) // 2 * 2 + 1


def qrs_bandpass_kernel(sample_rate_hz: float) -> np.ndarray:
    """Design the linear-phase 5-15 Hz band-pass FIR filter (Hamming-windowed sinc)."""
    taps = qrs_bandpass_taps(sample_rate_hz)
    low, high = QRS_BAND_HZ
    if high >= sample_rate_hz / 2:
        raise InvalidInputError(
            f"sample_rate_hz must exceed {2 * high} Hz for the {low}-{high} Hz QRS band, got {sample_rate_hz}"
        )
    n = np.arange(taps) - (taps - 1) / 2
    ideal = (2 * high / sample_rate_hz) * np.sinc(2 * high * n / sample_rate_hz) \
        - (2 * low / sample_rate_hz) * np.sinc(2 * low * n / sample_rate_hz)
    kernel = ideal * np.hamming(taps)
    # Unit gain at the band centre.
    centre = np.exp(-2j * np.pi * (low + high) / 2 / sample_rate_hz * np.arange(taps))
    return kernel / abs(np.dot(kernel, centre))


class StreamingQRSDetector:
    """Detect R peaks in a raw ECG stream with the Pan-Tompkins algorithm, block by block.

    Feed sample blocks of any size to :meth:`push`; it returns the sample indices (from 0
    at the stream start) of the R peaks it has decided on. The output does not depend on
    the block sizes: input is processed in chunks of ``QRS_CHUNK_S`` on a grid fixed to
    the stream start. A peak is reported at most :attr:`max_delay_samples` samples after
    it occurred, and the memory is bounded by the search-back window.

    Parameters
    ----------
    sample_rate_hz : float, default=360.0
        Sample rate in Hz, above 30 Hz (twice the upper band edge).

    Attributes
    ----------
    max_delay_samples : int
        Upper bound of the samples between an R peak and the :meth:`push` call that
        reports it, excluding the peaks of the 2 s learning phase (reported when it ends)
        and search-back detections, which come at most
        ``QRS_SEARCH_BACK_FACTOR`` times the clamped mean RR interval later.
    samples_seen : int
        Samples pushed so far.
    """

    def __init__(self, sample_rate_hz: float = 360.0):
        fs = float(sample_rate_hz)
        self.sample_rate_hz = fs
        self.bandpass = qrs_bandpass_kernel(fs)
        self.derivative = np.array([2.0, 1.0, 0.0, -1.0, -2.0]) * (fs / 8.0)
        self.integration = int(round(QRS_INTEGRATION_S * fs))
        self.refractory = int(round(QRS_REFRACTORY_S * fs))
        self.t_wave = int(round(QRS_T_WAVE_S * fs))
        self.learning = int(round(QRS_LEARNING_S * fs))
        self.chunk = max(1, int(round(QRS_CHUNK_S * fs)))
        self.rr_limits = (int(QRS_RR_LIMITS_S[0] * fs), int(QRS_RR_LIMITS_S[1] * fs))
        # Delay of each FIR stage's output behind the raw signal (the filters are linear phase).
        self.bandpass_delay = (len(self.bandpass) - 1) // 2
        self.mwi_delay = self.bandpass_delay + 2 + (self.integration - 1) // 2
        # Candidates are MWI maxima within +-refractory, which needs that much look-ahead.
        self.max_delay_samples = self.mwi_delay + self.refractory + self.chunk + self.integration

        self.samples_seen = 0
        self.pending = np.zeros(0)          # raw samples not yet in a full chunk
        self.raw_history = np.zeros(len(self.bandpass) - 1)
        self.band_history = np.zeros(len(self.derivative) - 1)
        self.square_history = np.zeros(self.integration - 1)
        # Band-passed and integrated signals, aligned to raw time; start index of each buffer.
        self.band = np.zeros(0)
        self.band_start = -self.bandpass_delay
        self.mwi = np.zeros(0)
        self.mwi_start = -self.mwi_delay
        self.next_candidate = 0             # first MWI index (buffer time) not yet examined
        self.learning_values: list[np.ndarray] = []
        self.learned = False
        self.spki = self.npki = 0.0
        self.rr_recent: deque = deque(maxlen=8)
        self.rr_regular: deque = deque(maxlen=8)
        self.last_qrs: int | None = None     # MWI time of the last QRS
        self.last_slope = 0.0
        self.candidates: list[tuple[int, float, float]] = []  # since the last QRS: (time, peak, slope)
        self.last_candidate = -(1 << 62)
        self.irregular = False
        self.first_sample: float | None = None

    # -- public -------------------------------------------------------------------------

    def push(self, samples) -> np.ndarray:
        """Consume a block of raw samples and return the R peaks decided so far (int64 indices)."""
        block = np.asarray(samples, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(block)):
            position = self.samples_seen + int(np.argmax(~np.isfinite(block)))
            raise InvalidInputError(f"raw ECG contains a non-finite value at sample {position}; repair it first")
        if self.samples_seen == 0 and len(block):
            # Pad the filter history with the first sample, so a DC offset (ADC units) does
            # not ring through the band-pass at the stream start.
            self.raw_history = np.full(len(self.bandpass) - 1, block[0])
        self.pending = np.concatenate([self.pending, block])
        self.samples_seen += len(block)
        peaks: list[int] = []
        while len(self.pending) >= self.chunk:
            chunk, self.pending = self.pending[:self.chunk], self.pending[self.chunk:]
            peaks.extend(self.process_chunk(chunk))
        return np.asarray(peaks, dtype=np.int64)

    def finish(self) -> np.ndarray:
        """Process the partial last chunk, flush the filters and return the last R peaks.

        The flush repeats the last sample, so a DC offset makes no step at the end.
        """
        tail = self.pending
        self.pending = np.zeros(0)
        last_value = tail[-1] if len(tail) else self.raw_history[-1]
        flush = np.concatenate([tail, np.full(self.max_delay_samples + self.chunk, last_value)])
        peaks: list[int] = []
        for start in range(0, len(flush), self.chunk):
            peaks.extend(self.process_chunk(flush[start:start + self.chunk]))
        limit = self.samples_seen
        return np.asarray([peak for peak in peaks if peak < limit], dtype=np.int64)

    # -- filtering ----------------------------------------------------------------------

    def process_chunk(self, chunk: np.ndarray) -> list[int]:
        raw = np.concatenate([self.raw_history, chunk])
        band = np.convolve(raw, self.bandpass, mode="valid")
        self.raw_history = raw[len(chunk):]
        with_history = np.concatenate([self.band_history, band])
        slope = np.convolve(with_history, self.derivative, mode="valid")
        self.band_history = with_history[len(band):]
        squared = np.concatenate([self.square_history, slope * slope])
        mwi = np.convolve(squared, np.full(self.integration, 1.0 / self.integration), mode="valid")
        self.square_history = squared[len(slope):]
        self.band = np.concatenate([self.band, band])
        self.mwi = np.concatenate([self.mwi, mwi])
        peaks = self.find_peaks()
        self.trim()
        return peaks

    def trim(self) -> None:
        """Drop buffered samples that no pending candidate or look-ahead window needs."""
        keep_from = self.next_candidate - self.refractory - self.integration - 1
        if self.candidates:
            keep_from = min(keep_from, self.candidates[0][0] - self.integration - 1)
        cut = keep_from - self.mwi_start
        if cut > 0:
            self.mwi = self.mwi[cut:]
            self.mwi_start += cut
        cut = keep_from - self.band_start
        if cut > 0:
            self.band = self.band[cut:]
            self.band_start += cut

    # -- decision -----------------------------------------------------------------------

    def find_peaks(self) -> list[int]:
        """Examine the MWI samples whose +-refractory neighbourhood is complete.

        Times here are raw sample indices: each FIR output is stored at the raw time its
        window is centred on.
        """
        mwi_end = self.mwi_start + len(self.mwi)
        last = mwi_end - self.refractory - 1
        peaks: list[int] = []
        if not self.learned:
            # Learning phase: the first 2 s set the signal and noise levels.
            if mwi_end < self.learning:
                return peaks
            learn = self.mwi[-self.mwi_start:self.learning - self.mwi_start]
            self.spki = 0.25 * float(learn.max())
            self.npki = 0.5 * float(learn.mean())
            self.learned = True
        start = max(self.next_candidate, 0)
        if last < start:
            return peaks
        # A candidate is a positive MWI sample that is the maximum within +-refractory.
        segment = self.mwi[start - self.refractory - self.mwi_start:last + self.refractory + 1 - self.mwi_start]
        maxima = np.lib.stride_tricks.sliding_window_view(segment, 2 * self.refractory + 1).max(axis=1)
        centres = segment[self.refractory:self.refractory + len(maxima)]
        for position in np.flatnonzero((centres >= maxima) & (centres > 0)):
            time = start + int(position)
            # A flat top gives several equal maxima; only the first one counts.
            if time - self.last_candidate <= self.refractory:
                continue
            self.last_candidate = time
            peaks.extend(self.search_back(time))
            peaks.extend(self.classify(time))
        peaks.extend(self.search_back(last + 1))
        self.next_candidate = last + 1
        # Candidates older than the longest search-back window can never be recovered.
        horizon = self.next_candidate - 2 * self.rr_limits[1]
        self.candidates = [candidate for candidate in self.candidates if candidate[0] >= horizon]
        return peaks

    def qrs_window(self, time: int) -> np.ndarray:
        """Return the band-passed samples within half an integration window of ``time``."""
        half = self.integration // 2
        begin = time - half - self.band_start
        return self.band[max(begin, 0):max(time + half + 1 - self.band_start, 0)]

    def slope_at(self, time: int) -> float:
        """Return the maximum absolute slope of the band-passed QRS around ``time``."""
        window = self.qrs_window(time)
        if len(window) < 2:
            return 0.0
        return float(np.max(np.abs(np.diff(window))))

    def r_peak_at(self, time: int) -> int:
        """Return the raw sample index of the R peak behind the MWI peak at ``time``.

        The R peak is the largest absolute band-passed value within half an integration
        window of the MWI peak; the band-pass is linear phase, so it is aligned to raw time.
        """
        half = self.integration // 2
        window = self.qrs_window(time)
        if len(window) == 0:
            return time
        begin = max(time - half, self.band_start)
        return begin + int(np.argmax(np.abs(window)))

    def classify(self, time: int, peak: float | None = None, slope: float | None = None) -> list[int]:
        """Update the levels with the candidate at ``time``; return its R peak if it is a QRS."""
        if peak is None:
            peak = float(self.mwi[time - self.mwi_start])
            slope = self.slope_at(time)
        threshold = self.npki + 0.25 * (self.spki - self.npki)
        if self.irregular:
            # Irregular rhythm (for example bigeminy with small ectopic beats): the paper
            # halves the thresholds until the RR intervals are regular again.
            threshold *= 0.5
        if peak > threshold:
            if self.last_qrs is not None and time - self.last_qrs < self.t_wave and slope < 0.5 * self.last_slope:
                # T-wave discrimination: a slow wave soon after a QRS is noise.
                self.npki = 0.125 * peak + 0.875 * self.npki
                self.candidates.append((time, peak, slope))
                return []
            self.spki = 0.125 * peak + 0.875 * self.spki
            return self.accept(time, slope)
        self.npki = 0.125 * peak + 0.875 * self.npki
        self.candidates.append((time, peak, slope))
        return []

    def accept(self, time: int, slope: float) -> list[int]:
        if self.last_qrs is not None:
            rr = time - self.last_qrs
            self.rr_recent.append(rr)
            mean_regular = self.mean_rr(self.rr_regular)
            regular = mean_regular is None or 0.92 * mean_regular < rr < 1.16 * mean_regular
            if regular:
                self.rr_regular.append(rr)
            self.irregular = not regular
        self.last_qrs = time
        self.last_slope = slope
        self.candidates = []
        return [self.r_peak_at(time)]

    def mean_rr(self, values) -> float | None:
        if not values:
            return None
        low, high = self.rr_limits
        return float(min(max(np.mean(values), low), high))

    def search_back(self, now: int) -> list[int]:
        """Accept the largest missed candidate once no QRS came for 166 % of the mean RR."""
        if self.last_qrs is None:
            return []
        mean_rr = self.mean_rr(self.rr_regular) or self.mean_rr(self.rr_recent)
        if mean_rr is None:
            return []
        if now - self.last_qrs <= QRS_SEARCH_BACK_FACTOR * mean_rr:
            return []
        threshold2 = 0.5 * (self.npki + 0.25 * (self.spki - self.npki))
        eligible = [candidate for candidate in self.candidates
                    if candidate[0] - self.last_qrs > self.refractory and candidate[1] > threshold2
                    and candidate[0] < now]
        if not eligible:
            return []
        time, peak, slope = max(eligible, key=lambda candidate: candidate[1])
        self.spki = 0.25 * peak + 0.75 * self.spki
        later = [c for c in self.candidates if c[0] > time]
        peaks = self.accept(time, slope)
        # Candidates after the recovered beat are re-examined against the new state.
        for candidate_time, candidate_peak, candidate_slope in later:
            peaks.extend(self.classify(candidate_time, candidate_peak, candidate_slope))
        return peaks


def detect_qrs(signal, sample_rate_hz: float = 360.0, block_size: int | None = None) -> np.ndarray:
    """Run :class:`StreamingQRSDetector` over a whole signal and return the R-peak indices.

    ``block_size`` splits the input the way a stream would (None: one block); the result
    is the same for every block size.
    """
    detector = StreamingQRSDetector(sample_rate_hz)
    signal = np.asarray(signal, dtype=np.float64).reshape(-1)
    step = len(signal) if not block_size else int(block_size)
    parts = [detector.push(signal[start:start + step]) for start in range(0, len(signal), max(step, 1))]
    parts.append(detector.finish())
    return np.concatenate(parts).astype(np.int64)


def beat_window_samples(spec: dict) -> tuple[int, int]:
    """Return (samples before, samples after) the R peak for a :func:`qrs_beat_spec` record."""
    fs = float(spec["sample_rate_hz"])
    return int(round(float(spec["beat_pre_s"]) * fs)), int(round(float(spec["beat_post_s"]) * fs))


def extract_beats(signal, r_peaks, spec: dict, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut one beat around each R peak and resample it to ``length`` samples.

    The beat is ``signal[r - pre : r + post]`` times ``spec["polarity"]``, resampled with
    :func:`resample_beat`. Z-normalisation stays in the bundle's preprocessing, so these
    beats go to ``DeviceDetector.score`` as they are.

    Returns
    -------
    beats : ndarray of shape (n_kept, length), float32
    kept : ndarray of shape (n_kept,), int64
        The R peaks whose window lies inside the signal.
    """
    signal = np.asarray(signal, dtype=np.float64).reshape(-1)
    pre, post = beat_window_samples(spec)
    polarity = int(spec.get("polarity", 1))
    r_peaks = np.asarray(r_peaks, dtype=np.int64)
    kept = r_peaks[(r_peaks - pre >= 0) & (r_peaks + post <= len(signal))]
    beats = np.empty((len(kept), length), dtype=np.float32)
    for row, peak in enumerate(kept):
        beats[row] = resample_beat(polarity * signal[peak - pre:peak + post], length)
    return beats, kept


class StreamingBeatExtractor:
    """Detect R peaks in a raw ECG stream and return each beat as soon as its window is complete.

    Parameters
    ----------
    spec : dict
        A :func:`qrs_beat_spec` record.
    length : int
        Samples per output beat (the model's window length).
    """

    def __init__(self, spec: dict, length: int):
        if spec.get("name") != QRS_STEP:
            raise InvalidInputError(f"spec must be a {QRS_STEP!r} record, got name {spec.get('name')!r}")
        self.spec = dict(spec)
        self.length = int(length)
        self.pre, self.post = beat_window_samples(spec)
        self.polarity = int(spec.get("polarity", 1))
        self.detector = StreamingQRSDetector(float(spec["sample_rate_hz"]))
        self.buffer = np.zeros(0)
        self.buffer_start = 0
        self.waiting: deque = deque()

    def push(self, samples) -> list[tuple[int, np.ndarray]]:
        """Consume raw samples; return (R-peak index, beat of ``length`` samples) for completed beats."""
        block = np.asarray(samples, dtype=np.float64).reshape(-1)
        peaks = self.detector.push(block)
        self.buffer = np.concatenate([self.buffer, block])
        self.waiting.extend(int(peak) for peak in peaks)
        return self.collect(final=False)

    def finish(self) -> list[tuple[int, np.ndarray]]:
        """Flush the detector and return the beats whose window fits in the samples received."""
        self.waiting.extend(int(peak) for peak in self.detector.finish())
        return self.collect(final=True)

    def collect(self, final: bool) -> list[tuple[int, np.ndarray]]:
        beats = []
        end = self.buffer_start + len(self.buffer)
        while self.waiting and (self.waiting[0] + self.post <= end or final):
            peak = self.waiting.popleft()
            if peak - self.pre < self.buffer_start or peak + self.post > end:
                continue
            begin = peak - self.pre - self.buffer_start
            window = self.buffer[begin:begin + self.pre + self.post]
            beats.append((peak, resample_beat(self.polarity * window, self.length)))
        # Keep enough history for a peak reported up to the detector's delay (plus search-back).
        oldest = self.waiting[0] if self.waiting else end
        keep_from = min(oldest, end - self.detector.max_delay_samples - 2 * self.detector.rr_limits[1]) - self.pre
        cut = keep_from - self.buffer_start
        if cut > 0:
            self.buffer = self.buffer[cut:]
            self.buffer_start += cut
        return beats
