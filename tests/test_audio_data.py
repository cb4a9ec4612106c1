"""Audio loaders: MIMII, DCASE 2020 Task 2 and plain folders, and their input checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

soundfile = pytest.importorskip("soundfile")

from anomalyforge.device.audio import read_audio  # noqa: E402
from anomalyforge.errors import InvalidInputError  # noqa: E402
from anomalyforge.training.audio_data import (  # noqa: E402
    ANOMALY,
    NORMAL,
    clip_rms_db,
    load_audio_dataset,
    load_dcase,
    load_labelled_folder,
    load_mimii,
)

AUDIO_DIR = Path(__file__).parent / "data" / "audio"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_wav(path: Path, samples, rate: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), np.asarray(samples), rate, subtype="PCM_16")
    return path


def test_mimii_excerpts():
    clips = load_mimii(AUDIO_DIR / "mimii")
    assert len(clips) == 4
    assert sorted(clip.label for clip in clips) == [NORMAL, NORMAL, ANOMALY, ANOMALY]
    assert {(clip.machine_type, clip.machine_id, clip.snr) for clip in clips} == {("fan", "id_00", None)}
    assert all(len(clip.samples) == 32000 for clip in clips)


def test_mimii_snr_folder(tmp_path):
    target = tmp_path / "-6_dB_fan" / "fan"
    shutil.copytree(AUDIO_DIR / "mimii" / "fan", target)
    clips = load_mimii(tmp_path, machine_ids=["id_00"])
    assert {clip.snr for clip in clips} == {"-6_dB"}
    assert len(clips) == 4


def test_mimii_unknown_id_raises():
    with pytest.raises(InvalidInputError, match="no MIMII clips found"):
        load_mimii(AUDIO_DIR / "mimii", machine_ids=["id_06"])


def test_dcase_excerpts():
    clips = load_dcase(AUDIO_DIR / "dcase")
    by_split = {clip.split: clip for clip in clips}
    assert by_split["train"].label == NORMAL
    assert by_split["test"].label == ANOMALY
    assert by_split["test"].machine_type == "id_00_machine_type_unstated"
    assert by_split["test"].machine_id == "id_00"


def test_labelled_folder(tmp_path):
    shutil.copytree(AUDIO_DIR / "mimii" / "fan" / "id_00" / "normal", tmp_path / "normal")
    shutil.copytree(AUDIO_DIR / "mimii" / "fan" / "id_00" / "abnormal", tmp_path / "anomaly")
    clips = load_audio_dataset("folder", tmp_path)
    assert sorted(clip.label for clip in clips) == [NORMAL, NORMAL, ANOMALY, ANOMALY]


def test_empty_folder_raises(tmp_path):
    with pytest.raises(InvalidInputError, match="no .wav files found"):
        load_labelled_folder(tmp_path)


def test_wrong_sample_rate_names_file(tmp_path):
    path = write_wav(tmp_path / "fast.wav", np.zeros(4410), rate=44100)
    with pytest.raises(InvalidInputError, match=r"fast\.wav has a sample rate of 44100 Hz but 16000 Hz"):
        read_audio(path)


def test_empty_file_names_file(tmp_path):
    path = write_wav(tmp_path / "silent.wav", np.zeros(0))
    with pytest.raises(InvalidInputError, match=r"silent\.wav is empty"):
        read_audio(path)


def test_clipped_file_names_file(tmp_path):
    samples = np.full(16000, 0.2)
    samples[::100] = 1.0
    path = write_wav(tmp_path / "loud.wav", samples)
    with pytest.raises(InvalidInputError, match=r"loud\.wav is clipped: 1\.00%"):
        read_audio(path)
    assert len(read_audio(path, max_clipped_fraction=0.02)) == 16000


def test_missing_channel_raises():
    with pytest.raises(InvalidInputError, match="channel 3 is not available"):
        read_audio(AUDIO_DIR / "mimii" / "fan" / "id_00" / "normal" / "00000000.wav", channel=3)


def test_channel_mean(tmp_path):
    stereo = np.stack([np.full(1000, 0.25), np.full(1000, 0.5)], axis=1)
    path = write_wav(tmp_path / "stereo.wav", stereo)
    np.testing.assert_allclose(read_audio(path, channel="mean"), 0.375)
    np.testing.assert_allclose(read_audio(path, channel=1), 0.5)


def test_unknown_dataset_raises():
    with pytest.raises(InvalidInputError, match="dataset must be one of"):
        load_audio_dataset("esc50", AUDIO_DIR)


@pytest.mark.skipif(not (SHARED_DATA / "mimii").is_dir(), reason="full MIMII clips not available")
def test_full_mimii_clips_and_level_gap():
    clips = load_mimii(SHARED_DATA / "mimii")
    assert sum(clip.label == NORMAL for clip in clips) == 10
    assert sum(clip.label == ANOMALY for clip in clips) == 8
    assert all(len(clip.samples) == 160000 for clip in clips)
    info = soundfile.info(str(clips[0].path))
    assert info.channels == 8
    normal_levels = [clip_rms_db(clip.samples) for clip in clips if clip.label == NORMAL]
    anomaly_levels = [clip_rms_db(clip.samples) for clip in clips if clip.label == ANOMALY]
    # Level alone separates these clips: every abnormal clip is louder than every normal one.
    assert max(normal_levels) < min(anomaly_levels)


@pytest.mark.skipif(not (SHARED_DATA / "dcase2020_task2").is_dir(), reason="full DCASE clips not available")
def test_full_dcase_clips():
    clips = load_dcase(SHARED_DATA / "dcase2020_task2")
    assert sorted(clip.label for clip in clips) == [NORMAL] * 5 + [ANOMALY]
    excerpt = load_dcase(AUDIO_DIR / "dcase")
    full_normal = next(clip for clip in clips if clip.path.name == "normal_id_00_00000000.wav")
    excerpt_normal = next(clip for clip in excerpt if clip.label == NORMAL)
    np.testing.assert_array_equal(full_normal.samples[:32000], excerpt_normal.samples)
