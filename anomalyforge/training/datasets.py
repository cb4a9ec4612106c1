"""Dataset loaders (numpy only): UCR time-series files and the embedded ECG5000 copy."""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from anomalyforge.errors import InvalidInputError

logger = logging.getLogger(__name__)

ECG5000_RESOURCE = "ecg5000.npz"
ECG5000_NORMAL_CLASS = 1


@dataclass(frozen=True)
class LabelledSeries:
    """Equal-length series with integer class labels.

    ``x`` has shape (n_series, length), float32; ``y`` has shape (n_series,), int64.
    """

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


def open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def load_ucr(path) -> LabelledSeries:
    """Load a UCR archive file: one series per line, the class label first, then the samples.

    Accepts the 2015 ``.txt`` layout (whitespace or commas) and the 2018 ``.tsv`` layout
    (tabs), optionally gzip-compressed. Every line must have the same number of fields.

    Raises
    ------
    InvalidInputError
        On a missing file, a line with a different number of fields, a non-numeric field,
        a non-integer label or a missing (NaN) sample, naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"UCR file {path} not found")
    rows: list[list[float]] = []
    with open_text(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            text = line.strip()
            if not text:
                continue
            fields = text.replace(",", " ").split()
            try:
                values = [float(field) for field in fields]
            except ValueError as error:
                raise InvalidInputError(f"{path}:{line_number}: non-numeric field ({error})") from error
            if rows and len(values) != len(rows[0]):
                raise InvalidInputError(
                    f"{path}:{line_number}: {len(values)} fields, but the first line has "
                    f"{len(rows[0])}; variable-length UCR series must be resampled to one length first"
                )
            if len(values) < 3:
                raise InvalidInputError(f"{path}:{line_number}: a label and at least 2 samples are needed")
            rows.append(values)
    if not rows:
        raise InvalidInputError(f"UCR file {path} contains no series")

    table = np.asarray(rows, dtype=np.float64)
    labels = table[:, 0]
    if not np.all(labels == np.round(labels)):
        bad = int(np.argmax(labels != np.round(labels)))
        raise InvalidInputError(f"{path}: label {labels[bad]} on series {bad + 1} is not an integer")
    samples = table[:, 1:]
    if not np.all(np.isfinite(samples)):
        bad = int(np.argwhere(~np.isfinite(samples))[0, 0])
        raise InvalidInputError(
            f"{path}: series {bad + 1} contains NaN samples (UCR marks padding of variable-length "
            "series with NaN); resample those series to a common length first"
        )
    logger.info("loaded %d series of length %d from %s", len(labels), samples.shape[1], path)
    return LabelledSeries(x=samples.astype(np.float32), y=labels.astype(np.int64))


def load_ecg5000() -> tuple[LabelledSeries, LabelledSeries]:
    """Return the embedded ECG5000 (train, test) in the official UCR split (500 / 4500 beats).

    Classes: 1 normal; 2 R-on-T premature ventricular contraction, 3 supraventricular
    premature or ectopic beat, 4 premature ventricular contraction, 5 unclassified beat.
    Samples are stored as float32 (the UCR text holds 8 significant digits).
    """
    with resources.files("anomalyforge.data").joinpath(ECG5000_RESOURCE).open("rb") as handle:
        with np.load(handle) as archive:
            train = LabelledSeries(x=archive["train_x"], y=archive["train_y"].astype(np.int64))
            test = LabelledSeries(x=archive["test_x"], y=archive["test_y"].astype(np.int64))
    return train, test


def ecg5000_task(window_length: int = 140) -> dict:
    """Return the bundle manifest's ``task`` record for ECG5000 beats."""
    return {
        "modality": "ecg-beat",
        "dataset": "ECG5000 (UCR), PhysioNet chfdb record chf07",
        "window_length": window_length,
        "hop": window_length,
        "channels": 1,
        "sample_format": "float32",
        # ECG5000 beats were interpolated to 140 samples, so they have no fixed sample rate.
        "sample_rate_hz": None,
        "normal_class": ECG5000_NORMAL_CLASS,
        "window_description": "one heartbeat resampled to window_length samples",
    }


def pack_ucr_pair(train_path, test_path, output_path) -> Path:
    """Pack a UCR TRAIN / TEST pair into the compressed float32 ``.npz`` layout used for ECG5000."""
    train, test = load_ucr(train_path), load_ucr(test_path)
    output_path = Path(output_path)
    np.savez_compressed(
        output_path,
        train_x=train.x, train_y=train.y.astype(np.int8),
        test_x=test.x, test_y=test.y.astype(np.int8),
    )
    return output_path
