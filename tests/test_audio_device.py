"""Audio bundles on the device: WAV replay, serial PCM samples, and calibration after a gain change."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("soundfile")
pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from anomalyforge.device.audio import (  # noqa: E402
    SegmentScorer,
    calibrate_audio_bundle,
    read_audio,
    replay_wav,
    segment_scores,
    stream_audio_port,
)
from anomalyforge.device.detector import DeviceDetector  # noqa: E402
from anomalyforge.signal import log_mel_features, log_mel_frames  # noqa: E402

AUDIO_DIR = Path(__file__).parent / "data" / "audio" / "mimii" / "fan" / "id_00"
NORMAL_WAVS = sorted((AUDIO_DIR / "normal").glob("*.wav"))
ANOMALY_WAVS = sorted((AUDIO_DIR / "abnormal").glob("*.wav"))
SEGMENT_FRAMES = 10


@pytest.fixture(scope="module")
def audio_bundle(tmp_path_factory):
    """A bundle with a briefly trained DCASE autoencoder on the two normal excerpts."""
    from anomalyforge.audio_demo import export_audio_bundle
    from anomalyforge.signal import log_mel_spec
    from anomalyforge.training.audio_models import DenseTrainingConfig, fit_audio_cvae, fit_dense_autoencoder

    torch.set_num_threads(1)
    step = log_mel_spec()[0]
    normals = [read_audio(path) for path in NORMAL_WAVS]
    anomalies = [read_audio(path) for path in ANOMALY_WAVS]
    vectors = [log_mel_features(samples, step) for samples in normals]
    normal_vectors = np.concatenate(vectors)
    anomaly_vectors = np.concatenate([log_mel_features(samples, step) for samples in anomalies])
    model = fit_dense_autoencoder(normal_vectors, 0, DenseTrainingConfig(epochs=3))
    result = {
        "step": step,
        "train_normal_vectors": normal_vectors,
        "train_vectors_per_clip": [len(part) for part in vectors],
        "models": {"dense_autoencoder": model},
        "reference_level_db": float(np.mean([log_mel_frames(samples).mean(dtype=np.float64) for samples in normals])),
        "cvae": fit_audio_cvae(normal_vectors, anomaly_vectors, 0),
    }
    bundle_dir = tmp_path_factory.mktemp("audio") / "bundle"
    export_audio_bundle(bundle_dir, result, 2.0, target_fpr=0.5)
    return bundle_dir, model, step


def workstation_clip_score(model, samples, step) -> float:
    from anomalyforge.training.fitting import score_windows

    return float(np.mean(score_windows(model, log_mel_features(samples, step))))


def test_replay_matches_workstation(audio_bundle):
    bundle_dir, model, step = audio_bundle
    detector = DeviceDetector.from_bundle(bundle_dir, "dense_autoencoder", "fp32")
    for path in NORMAL_WAVS + ANOMALY_WAVS:
        records = []
        summary = replay_wav(detector, path, on_segment=records.append)
        assert summary.segments == 1
        assert records[0]["vectors"] == 57
        expected = workstation_clip_score(model, read_audio(path), step)
        assert records[0]["score"] == pytest.approx(expected, rel=1e-4)


def test_replay_sliding_segments(audio_bundle):
    bundle_dir, _, _ = audio_bundle
    detector = DeviceDetector.from_bundle(bundle_dir, "dense_autoencoder", "fp32")
    records = []
    replay_wav(detector, NORMAL_WAVS[0], segment_frames=20, hop_frames=10, on_segment=records.append)
    assert [record["start_s"] for record in records] == [0.0, 0.32, 0.64, 0.96]
    assert all(record["vectors"] == 20 for record in records)


def test_replay_real_speed_takes_real_time(audio_bundle):
    bundle_dir, _, _ = audio_bundle
    detector = DeviceDetector.from_bundle(bundle_dir, "dense_autoencoder", "fp32")
    summary = replay_wav(detector, NORMAL_WAVS[0], speed=4.0)
    assert summary.duration_s >= 0.45


def test_serial_samples_stream(audio_bundle):
    bundle_dir, model, step = audio_bundle
    detector = DeviceDetector.from_bundle(bundle_dir, "dense_autoencoder", "fp32")
    samples = read_audio(NORMAL_WAVS[0])
    pcm = np.round(samples * 32768).astype(np.int16)
    payload = "".join(f"{value}\n" for value in pcm).encode("ascii")
    controller, device = os.openpty()
    port = os.ttyname(device)

    def send():
        view = memoryview(payload)
        for start in range(0, len(view), 4096):
            os.write(controller, view[start:start + 4096])

    records = []
    sender = threading.Thread(target=send)
    try:
        summary = stream_audio_port(detector, port, segment_frames=SEGMENT_FRAMES, idle_timeout_s=1.0,
                                    on_segment=records.append, on_open=sender.start)
    finally:
        sender.join()
        os.close(controller)
        os.close(device)
    assert summary.samples == len(samples)
    assert len(records) == 57 // SEGMENT_FRAMES
    scorer = SegmentScorer(detector, SEGMENT_FRAMES)
    expected = scorer.push(samples)
    np.testing.assert_allclose([record["score"] for record in records], [record["score"] for record in expected],
                               rtol=1e-6)


def test_calibration_corrects_sensor_gain(audio_bundle, tmp_path):
    bundle_dir, _, _ = audio_bundle
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    normals = [read_audio(path) for path in NORMAL_WAVS]
    quieter = [samples * 10 ** (-6 / 20) for samples in normals]
    detector = DeviceDetector.from_bundle(copy, "dense_autoencoder", "fp32")
    original = segment_scores(detector, normals, SEGMENT_FRAMES, 1, "mean", 0.0)
    shifted = segment_scores(detector, quieter, SEGMENT_FRAMES, 1, "mean", 0.0)
    # Without correction a 6 dB quieter sensor moves every normal score.
    assert np.mean(np.abs(shifted - original)) > 0.1

    report = calibrate_audio_bundle(copy, quieter, detector="dense_autoencoder", precision="fp32",
                                    target_fpr=0.1, segment_frames=SEGMENT_FRAMES, hop_frames=1,
                                    n_generated=50)
    assert report["input_gain_db"] == pytest.approx(6.0, abs=0.01)
    assert report["detection_rate"] is not None
    calibrated = DeviceDetector.from_bundle(copy, "dense_autoencoder", "fp32")
    assert calibrated.threshold_info["calibration"]["input_gain_db"] == report["input_gain_db"]
    corrected = segment_scores(calibrated, quieter, SEGMENT_FRAMES, 1, "mean", report["input_gain_db"])
    np.testing.assert_allclose(corrected, original, rtol=1e-3, atol=1e-4)
    records = []
    replay_wav(calibrated, NORMAL_WAVS[0], gain_db=None, segment_frames=SEGMENT_FRAMES, on_segment=records.append)
    assert records[0]["threshold"] == report["threshold"]["value"]


def test_calibration_without_level_match(audio_bundle, tmp_path):
    bundle_dir, _, _ = audio_bundle
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    quieter = [read_audio(path) * 10 ** (-6 / 20) for path in NORMAL_WAVS]
    report = calibrate_audio_bundle(copy, quieter, precision="fp32", target_fpr=0.1,
                                    segment_frames=SEGMENT_FRAMES, hop_frames=1, match_level=False,
                                    n_generated=0)
    assert report["input_gain_db"] == 0.0
    assert report["detection_rate"] is None


def test_calibration_too_few_segments(audio_bundle, tmp_path):
    from anomalyforge.errors import InvalidInputError

    bundle_dir, _, _ = audio_bundle
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    with pytest.raises(InvalidInputError, match="normal segments are too few"):
        calibrate_audio_bundle(copy, [read_audio(NORMAL_WAVS[0])], target_fpr=0.01, n_generated=0)


def test_replay_cli(audio_bundle, tmp_path, capsys):
    from anomalyforge.cli import main

    bundle_dir, _, _ = audio_bundle
    output = tmp_path / "scores.jsonl"
    code = main(["device", "replay", "--bundle", str(bundle_dir), "--wav", str(ANOMALY_WAVS[0]),
                 "--precision", "fp32", "--segment-frames", "20", "--output", str(output)])
    assert code == 0
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) == 2
    assert "real time" in capsys.readouterr().err


def test_calibrate_cli_from_wav_folder(audio_bundle, tmp_path, capsys):
    from anomalyforge.cli import main

    bundle_dir, _, _ = audio_bundle
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    code = main(["device", "calibrate", "--bundle", str(copy), "--input", str(AUDIO_DIR / "normal"),
                 "--precision", "fp32", "--target-fpr", "0.2", "--segment-frames", "10", "--segment-hop", "5",
                 "--generated", "0"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_segments"] == 2 * 10
