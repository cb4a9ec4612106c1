"""Machine-sound datasets: MIMII, DCASE 2020 Task 2 and plain folders of labelled WAVs.

numpy and soundfile only. Every loader returns a list of :class:`AudioClip` with the
signal already reduced to one channel in full scale (16-bit PCM / 32768). Files are read
with :func:`anomalyforge.device.audio.read_audio`, the same reader the device uses for
WAV replay, so a wrong sample rate, an empty file or a clipped file raises
InvalidInputError naming the file.

Layouts (``*`` is any file name):

- MIMII: ``[<snr>_dB_<machine>/]<machine>/id_XX/normal|abnormal/*.wav``, for example
  ``-6_dB_fan/fan/id_00/abnormal/00000000.wav`` or ``fan/id_00/normal/00000000.wav``.
- DCASE 2020 Task 2: ``<machine>/train|test/normal|anomaly_id_XX_*.wav``.
- Plain folder: ``normal/*.wav`` and ``anomaly/*.wav`` (or ``abnormal/``) under the root.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anomalyforge.device.audio import DEFAULT_MAX_CLIPPED_FRACTION, read_audio
from anomalyforge.errors import InvalidInputError

logger = logging.getLogger(__name__)

DATASETS = ("mimii", "dcase", "folder")
NORMAL, ANOMALY = 0, 1
MIMII_SNR_FOLDER = re.compile(r"(?P<snr>-?\d+)_dB_(?P<machine>.+)")
MACHINE_ID = re.compile(r"id_\d+")
DCASE_NAME = re.compile(r"(?P<label>normal|anomaly)_(?P<machine_id>id_\d+)_.*\.wav", re.IGNORECASE)
FOLDER_LABELS = {"normal": NORMAL, "anomaly": ANOMALY, "abnormal": ANOMALY}


@dataclass
class AudioClip:
    """One recording and its labels.

    Attributes
    ----------
    path : Path
    samples : ndarray of shape (n_samples,), float64
        Mono signal in full scale.
    label : int
        0 for normal, 1 for anomaly.
    machine_type : str
    machine_id : str
        For example ``"id_00"``; ``"unknown"`` for a plain folder.
    snr : str or None
        MIMII SNR variant (``"6_dB"``, ``"0_dB"``, ``"-6_dB"``) when the path names it.
    split : str or None
        DCASE ``"train"`` or ``"test"`` folder.
    sample_rate_hz : float
    """

    path: Path
    samples: np.ndarray
    label: int
    machine_type: str
    machine_id: str
    snr: str | None = None
    split: str | None = None
    sample_rate_hz: float = 16000.0


def find_wavs(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise InvalidInputError(f"audio data directory {root} not found; pass the folder that holds the WAV files")
    paths = sorted(path for path in root.rglob("*") if path.suffix.lower() == ".wav" and path.is_file())
    if not paths:
        raise InvalidInputError(f"no .wav files found under {root}")
    return paths


def load_mimii(root, channel: int | str = 0, sample_rate_hz: float = 16000.0,
               machine_ids: list[str] | None = None,
               max_clipped_fraction: float = DEFAULT_MAX_CLIPPED_FRACTION) -> list[AudioClip]:
    """Load MIMII clips under ``root``, with or without the ``<snr>_dB_<machine>`` folder.

    Parameters
    ----------
    root : str or Path
        Any folder above the ``normal`` / ``abnormal`` folders.
    channel : int or "mean", default=0
        Microphone of the 8-channel array to keep, or "mean" to average all eight.
    machine_ids : list of str, optional
        Keep only these ids (for example ``["id_00"]``).

    Raises
    ------
    InvalidInputError
        If no WAV file sits in a ``<machine>/id_XX/normal|abnormal`` folder, or a file is
        invalid (see :func:`anomalyforge.device.audio.read_audio`).
    """
    clips = []
    for path in find_wavs(Path(root)):
        parts = path.parts
        if len(parts) < 4 or parts[-2] not in ("normal", "abnormal") or not MACHINE_ID.fullmatch(parts[-3]):
            logger.debug("skipping %s: not in a <machine>/id_XX/normal|abnormal folder", path)
            continue
        machine_id, machine_type = parts[-3], parts[-4]
        snr = None
        if len(parts) >= 5:
            match = MIMII_SNR_FOLDER.fullmatch(parts[-5])
            if match:
                snr = f"{match['snr']}_dB"
        if machine_ids is not None and machine_id not in machine_ids:
            continue
        clips.append(AudioClip(
            path=path, samples=read_audio(path, sample_rate_hz, channel, max_clipped_fraction),
            label=NORMAL if parts[-2] == "normal" else ANOMALY, machine_type=machine_type,
            machine_id=machine_id, snr=snr, sample_rate_hz=sample_rate_hz,
        ))
    if not clips:
        raise InvalidInputError(
            f"no MIMII clips found under {root}; expected <machine>/id_XX/normal|abnormal/*.wav"
            + (f" for machine ids {machine_ids}" if machine_ids else "")
        )
    log_counts("mimii", root, clips)
    return clips


def load_dcase(root, sample_rate_hz: float = 16000.0, channel: int | str = 0,
               max_clipped_fraction: float = DEFAULT_MAX_CLIPPED_FRACTION) -> list[AudioClip]:
    """Load DCASE 2020 Task 2 clips named ``normal_id_XX_*.wav`` or ``anomaly_id_XX_*.wav``.

    The machine type is the name of the folder above ``train`` / ``test`` (or the folder
    holding the file when there is no such split folder).
    """
    clips = []
    for path in find_wavs(Path(root)):
        match = DCASE_NAME.fullmatch(path.name)
        if match is None:
            logger.debug("skipping %s: name is not normal|anomaly_id_XX_*.wav", path)
            continue
        split = path.parent.name if path.parent.name in ("train", "test") else None
        machine_type = path.parent.parent.name if split else path.parent.name
        clips.append(AudioClip(
            path=path, samples=read_audio(path, sample_rate_hz, channel, max_clipped_fraction),
            label=NORMAL if match["label"].lower() == "normal" else ANOMALY, machine_type=machine_type,
            machine_id=match["machine_id"], split=split, sample_rate_hz=sample_rate_hz,
        ))
    if not clips:
        raise InvalidInputError(
            f"no DCASE 2020 Task 2 clips found under {root}; expected files named "
            "normal_id_XX_*.wav or anomaly_id_XX_*.wav"
        )
    log_counts("dcase", root, clips)
    return clips


def load_labelled_folder(root, sample_rate_hz: float = 16000.0, channel: int | str = 0,
                         machine_type: str = "unknown",
                         max_clipped_fraction: float = DEFAULT_MAX_CLIPPED_FRACTION) -> list[AudioClip]:
    """Load WAV files from ``root/normal/`` (label 0) and ``root/anomaly/`` or ``root/abnormal/`` (label 1)."""
    root = Path(root)
    clips = []
    for path in find_wavs(root):
        relative = path.relative_to(root).parts
        label = FOLDER_LABELS.get(relative[0].lower()) if len(relative) > 1 else None
        if label is None:
            logger.debug("skipping %s: not under normal/, anomaly/ or abnormal/", path)
            continue
        clips.append(AudioClip(
            path=path, samples=read_audio(path, sample_rate_hz, channel, max_clipped_fraction), label=label,
            machine_type=machine_type, machine_id="unknown", sample_rate_hz=sample_rate_hz,
        ))
    if not clips:
        raise InvalidInputError(f"no WAV files found in {root}/normal, {root}/anomaly or {root}/abnormal")
    log_counts("folder", root, clips)
    return clips


def load_audio_dataset(dataset: str, root, **options) -> list[AudioClip]:
    """Load clips with the loader for ``dataset`` ("mimii", "dcase" or "folder")."""
    loaders = {"mimii": load_mimii, "dcase": load_dcase, "folder": load_labelled_folder}
    if dataset not in loaders:
        raise InvalidInputError(f"dataset must be one of {list(DATASETS)}, got {dataset!r}")
    return loaders[dataset](root, **options)


def log_counts(dataset: str, root, clips: list[AudioClip]) -> None:
    normals = sum(clip.label == NORMAL for clip in clips)
    ids = sorted({f"{clip.machine_type}/{clip.machine_id}" for clip in clips})
    logger.info("%s: %d clips under %s (%d normal, %d anomalous) for %s", dataset, len(clips), root,
                normals, len(clips) - normals, ids)


def clip_rms_db(samples) -> float:
    """Return the RMS level of a signal in dB relative to full scale."""
    samples = np.asarray(samples, dtype=np.float64)
    return float(10.0 * np.log10(np.mean(samples ** 2) + 1e-20))
