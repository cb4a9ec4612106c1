"""Machine-sound demo: log-mel detectors on MIMII or DCASE 2020 Task 2 clips, export, device replay.

:func:`run_audio_demo` evaluates, per machine id and over several splits that hold out
whole clips, an RMS level baseline, the DCASE baseline autoencoder, the interpolation
model and the classifier trained on normals + k real + synthetic anomalies, under three
input conditions:

``original``
    Clips as recorded.
``random_gain``
    Every clip scaled by a random gain, uniform in [-max_gain_db, +max_gain_db] dB.
``random_gain_level_normalised``
    The same scaled clips, with each stacked log-mel vector shifted to zero mean, which
    removes any constant gain. The RMS baseline then has nothing left to score.

It then exports the first split's detectors (``original`` condition) into a bundle,
replays held-out clips through the device path and calibrates the bundle on held-out
normal clips played at another gain, as a new sensor would record them.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from anomalyforge.signal import log_mel_features, log_mel_frames, log_mel_spec, log_mel_window_length
from anomalyforge.thresholds import calibrate_threshold
from anomalyforge.training.audio_data import NORMAL, AudioClip, clip_rms_db, load_audio_dataset
from anomalyforge.training.audio_models import (
    DenseTrainingConfig,
    auc_metrics,
    clip_scores,
    fit_audio_cvae,
    fit_dense_autoencoder,
    fit_dense_classifier,
    fit_interpolation,
    mix_at_snr,
    sample_audio_cvae,
)
from anomalyforge.training.fitting import score_windows

logger = logging.getLogger(__name__)

CONDITIONS = ("original", "random_gain", "random_gain_level_normalised")
DETECTORS = ("rms_level", "dense_autoencoder", "interpolation", "classifier_synthetic")
# Vectors per device segment: 31 vectors span 30 * 512 + 3072 samples, about 1.15 s at 16 kHz.
SEGMENT_FRAMES = 31


@dataclass
class AudioDemoConfig:
    """Settings of :func:`run_audio_demo`.

    ``k`` real anomaly clips per machine id train the classifier and the CVAE;
    ``n_test_normals`` normal clips per split are held out for evaluation. ``n_mixed``
    mixtures of a real training anomaly into a training normal are made at SNRs drawn
    uniformly from ``mix_snr_db``.
    """

    dataset: str
    data_dir: Path
    run_dir: Path = Path("runs/audio-demo")
    channel: int | str = 0
    seed: int = 0
    n_splits: int = 3
    k: int = 2
    n_test_normals: int = 4
    max_gain_db: float = 6.0
    n_synthetic: int = 2000
    n_mixed: int = 4
    mix_snr_db: tuple = (-6.0, 6.0)
    target_fpr: float = 0.05
    epochs: int = 30
    device_gain_db: float = -5.0


def split_clips(clips: list[AudioClip], config: AudioDemoConfig, split: int):
    """Return (train normals, k train anomalies, test clips) for one split of one machine id.

    Normals rotate through the held-out block; the k training anomalies rotate as well.
    Whole clips are held out, so no test clip contributes a frame to training.
    """
    normals = [clip for clip in clips if clip.label == NORMAL]
    anomalies = [clip for clip in clips if clip.label != NORMAL]
    order = np.random.default_rng(config.seed).permutation(len(normals))
    n_test = min(config.n_test_normals, len(normals) - 2)
    start = (split * n_test) % len(normals)
    test_index = set(np.roll(order, -start)[:n_test].tolist())
    train_normals = [clip for index, clip in enumerate(normals) if index not in test_index]
    test_normals = [clip for index, clip in enumerate(normals) if index in test_index]
    k = min(config.k, max(0, len(anomalies) - 1))
    anomaly_order = np.roll(np.arange(len(anomalies)), -split * k)
    train_anomalies = [anomalies[index] for index in anomaly_order[:k]]
    test_anomalies = [anomalies[index] for index in anomaly_order[k:]]
    return train_normals, train_anomalies, test_normals + test_anomalies


def clip_gains(clips: list[AudioClip], condition: str, max_gain_db: float, seed: int) -> dict[Path, float]:
    """Return the gain in dB applied to each clip under ``condition`` (0 dB for ``original``)."""
    if condition == "original":
        return {clip.path: 0.0 for clip in clips}
    rng = np.random.default_rng(seed)
    return {clip.path: float(rng.uniform(-max_gain_db, max_gain_db)) for clip in clips}


def evaluate_split(train_normals, train_anomalies, test_clips, condition: str, config: AudioDemoConfig,
                   seed: int) -> dict:
    """Train every detector on one split under one condition and return clip-level metrics."""
    all_clips = train_normals + train_anomalies + test_clips
    gains = clip_gains(all_clips, condition, config.max_gain_db, seed)
    step = log_mel_spec(level_normalisation="stack_mean" if condition.endswith("normalised") else "none")[0]

    def audio(clip):
        return clip.samples * 10.0 ** (gains[clip.path] / 20.0)

    def features(clip):
        return log_mel_features(audio(clip), step)

    normal_vectors = np.concatenate([features(clip) for clip in train_normals])
    anomaly_vectors = np.concatenate([features(clip) for clip in train_anomalies])
    test_features = [features(clip) for clip in test_clips]
    labels = np.array([clip.label for clip in test_clips])
    training = DenseTrainingConfig(epochs=config.epochs)

    scores = {}
    if condition.endswith("normalised"):
        # Level normalisation leaves RMS nothing to score: every clip gets the same value.
        scores["rms_level"] = np.zeros(len(test_clips))
    else:
        scores["rms_level"] = np.array([clip_rms_db(audio(clip)) for clip in test_clips])
    autoencoder = fit_dense_autoencoder(normal_vectors, seed, training)
    scores["dense_autoencoder"] = clip_scores(autoencoder, test_features)
    interpolation = fit_interpolation(normal_vectors, seed, training)
    scores["interpolation"] = clip_scores(interpolation, test_features)
    synthetic = synthetic_vectors(train_normals, train_anomalies, normal_vectors, anomaly_vectors, audio, step,
                                  config, seed)
    classifier = fit_dense_classifier(normal_vectors, anomaly_vectors, synthetic, seed, training)
    scores["classifier_synthetic"] = clip_scores(classifier, test_features)

    metrics = {name: auc_metrics(labels, value) for name, value in scores.items()}
    return {
        "metrics": metrics,
        "n_test_normal": int(np.sum(labels == NORMAL)),
        "n_test_anomalous": int(np.sum(labels != NORMAL)),
        "n_train_normal": len(train_normals),
        "n_train_anomalous": len(train_anomalies),
        "n_synthetic": int(len(synthetic)),
        "models": {"dense_autoencoder": autoencoder, "interpolation": interpolation, "classifier": classifier},
        "train_normal_vectors": normal_vectors,
        "step": step,
    }


def synthetic_vectors(train_normals, train_anomalies, normal_vectors, anomaly_vectors, audio, step,
                      config: AudioDemoConfig, seed: int) -> np.ndarray:
    """CVAE samples plus vectors of real training anomalies mixed into training normals."""
    cvae = fit_audio_cvae(normal_vectors, anomaly_vectors, seed)
    generated = sample_audio_cvae(cvae, config.n_synthetic, seed)
    rng = np.random.default_rng(seed + 7)
    mixed = []
    for _ in range(config.n_mixed):
        normal = train_normals[rng.integers(len(train_normals))]
        anomaly = train_anomalies[rng.integers(len(train_anomalies))]
        snr = rng.uniform(*config.mix_snr_db)
        mixed.append(log_mel_features(mix_at_snr(audio(normal), audio(anomaly), snr), step))
    return np.concatenate([generated] + mixed).astype(np.float32)


def summarise(per_split: list[dict]) -> dict:
    """Mean and standard deviation over splits of every detector's ROC-AUC and pAUC."""
    summary = {}
    for name in DETECTORS:
        entry = {}
        for metric in ("roc_auc", "pauc"):
            values = [split["metrics"][name][metric] for split in per_split if split["metrics"][name][metric] is not None]
            entry[metric] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}
        summary[name] = entry
    return summary


def export_audio_bundle(bundle_dir: Path, result: dict, clips_seconds: float, target_fpr: float) -> dict:
    """Export the split's detectors and the CVAE decoder into an audio bundle.

    The workstation threshold of each detector comes from segment scores of the training
    normals, which the model trained on, so it is too low; run device calibration.
    """
    from anomalyforge.device.audio import AUDIO_MODALITY
    from anomalyforge.export.writer import BundleWriter

    step = result["step"]
    vectors = result["train_normal_vectors"]
    window_length = log_mel_window_length(step)
    n_values = vectors.shape[1]
    task = {
        "modality": AUDIO_MODALITY,
        "window_length": window_length,
        "hop": int(step["hop_length"]),
        # The models take the 640-value log-mel stack, not the raw window_length samples.
        "feature_length": n_values,
        "channels": 1,
        "sample_format": "pcm_s16 (full scale = 32768)",
        "sample_rate_hz": step["sample_rate_hz"],
        "segment_frames": SEGMENT_FRAMES,
        "segment_aggregation": "mean",
        "reference_level_db": float(result["reference_level_db"]),
        "clip_seconds": clips_seconds,
    }
    writer = BundleWriter(bundle_dir, task, [step])
    rng = np.random.default_rng(0)
    calibration = vectors[rng.choice(len(vectors), size=min(256, len(vectors)), replace=False)]
    thresholds = {}
    for name, model in result["models"].items():
        segment_scores = segment_means(score_windows(model, vectors), result["train_vectors_per_clip"])
        threshold = calibrate_threshold(segment_scores, target_fpr).to_dict()
        threshold["precision"] = "fp32"
        thresholds[name] = threshold
        output = "classifier logit" if name == "classifier" else "mean squared error of the standardised vector"
        writer.add_detector(name, model.eval(), calibration[:2], threshold, output, calibration)
    decoder = result["cvae"].decoder.eval()
    z = rng.standard_normal((256, decoder.body[0].in_features - 1)).astype(np.float32)
    writer.add_decoder("cvae_decoder", decoder, latent_dim=z.shape[1], classes=[1],
                       calibration_inputs={"z": z, "condition": np.ones((256, 1), np.float32)},
                       output="generated stacked log-mel vector in dB, one row per sample")
    writer.finish("dense_autoencoder")
    return thresholds


def segment_means(scores: np.ndarray, vectors_per_clip: list[int]) -> np.ndarray:
    """Mean score of each non-overlapping SEGMENT_FRAMES block within each clip."""
    means, start = [], 0
    for count in vectors_per_clip:
        clip = scores[start:start + count]
        for offset in range(0, count - SEGMENT_FRAMES + 1, SEGMENT_FRAMES):
            means.append(clip[offset:offset + SEGMENT_FRAMES].mean())
        start += count
    return np.asarray(means)


def device_checks(bundle_dir: Path, run_dir: Path, result: dict, test_clips: list[AudioClip],
                  config: AudioDemoConfig) -> dict:
    """Replay held-out clips through the device path, then calibrate for a sensor at another gain."""
    import soundfile

    from anomalyforge.device.audio import calibrate_audio_bundle, replay_wav
    from anomalyforge.device.detector import DeviceDetector

    wav_dir = run_dir / "replay"
    wav_dir.mkdir(parents=True, exist_ok=True)
    checks = {"clips": []}
    model = result["models"]["dense_autoencoder"]
    detector = DeviceDetector.from_bundle(bundle_dir, "dense_autoencoder", "fp32")
    for clip in test_clips[:1] + [clip for clip in test_clips if clip.label != NORMAL][:1]:
        path = wav_dir / f"{'normal' if clip.label == NORMAL else 'anomaly'}_{clip.path.name}"
        soundfile.write(str(path), clip.samples, int(clip.sample_rate_hz), subtype="PCM_16")
        records = []
        summary = replay_wav(detector, path, segment_frames=None, on_segment=records.append)
        workstation = float(clip_scores(model, [log_mel_features(clip.samples, result["step"])])[0])
        checks["clips"].append({
            "file": path.name, "device_clip_score": records[0]["score"], "workstation_clip_score": workstation,
            "realtime_factor": summary.realtime_factor,
        })

    # A new sensor: the held-out normals and anomalies recorded config.device_gain_db quieter.
    gain = 10.0 ** (config.device_gain_db / 20.0)
    normals = [clip.samples * gain for clip in test_clips if clip.label == NORMAL]
    anomalies = [clip.samples * gain for clip in test_clips if clip.label != NORMAL]
    checks["sensor_gain_db"] = config.device_gain_db
    for match_level in (False, True):
        report = calibrate_audio_bundle(bundle_dir, normals, detector="dense_autoencoder", precision="fp32",
                                        target_fpr=0.25, hop_frames=SEGMENT_FRAMES, match_level=match_level,
                                        n_generated=200, input_description="held-out normal clips at sensor gain")
        calibrated = DeviceDetector.from_bundle(bundle_dir, "dense_autoencoder", "fp32")
        from anomalyforge.device.audio import segment_scores, threshold_gain_db

        anomaly_scores = segment_scores(calibrated, anomalies, SEGMENT_FRAMES, None, "mean",
                                        threshold_gain_db(calibrated))
        checks["match_level" if match_level else "threshold_only"] = {
            "input_gain_db": report["input_gain_db"],
            "threshold": report["threshold"]["value"],
            "n_normal_segments": report["n_segments"],
            "anomalous_segments_flagged": float(np.mean(anomaly_scores > calibrated.threshold)),
            "generated_detection_rate": report["detection_rate"],
        }
    return checks


def run_audio_demo(dataset: str, data_dir, run_dir="runs/audio-demo", **options) -> dict:
    """Run the machine-sound chain and write ``metrics.json`` and the bundle into ``run_dir``.

    Parameters
    ----------
    dataset : {"mimii", "dcase", "folder"}
    data_dir : str or Path
        Folder in the dataset's layout (see :mod:`anomalyforge.training.audio_data`).
    run_dir : str or Path, default="runs/audio-demo"
        Output folder; an earlier ``bundle/`` and ``replay/`` in it are replaced.
    **options
        Other :class:`AudioDemoConfig` fields (seed, n_splits, k, max_gain_db, epochs, ...).

    Returns
    -------
    dict
        The content of ``metrics.json``.
    """
    torch.set_num_threads(1)
    config = AudioDemoConfig(dataset=dataset, data_dir=Path(data_dir), run_dir=Path(run_dir), **options)
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    for old in ("bundle", "replay"):
        shutil.rmtree(run_dir / old, ignore_errors=True)

    clips = load_audio_dataset(dataset, config.data_dir, channel=config.channel)
    by_id: dict[str, list[AudioClip]] = {}
    for clip in clips:
        by_id.setdefault(f"{clip.machine_type}/{clip.machine_id}", []).append(clip)

    metrics = {"config": {key: str(value) if isinstance(value, Path) else value
                          for key, value in asdict(config).items()}, "machines": {}}
    first = None
    for machine, machine_clips in sorted(by_id.items()):
        n_normal = sum(clip.label == NORMAL for clip in machine_clips)
        n_anomalous = len(machine_clips) - n_normal
        if n_normal < 3 or n_anomalous < 2:
            logger.warning("%s: %d normal and %d anomalous clips are too few to evaluate (need 3 and 2); "
                           "skipping it", machine, n_normal, n_anomalous)
            metrics["machines"][machine] = {"skipped": f"{n_normal} normal, {n_anomalous} anomalous clips"}
            continue
        entry = {"n_normal_clips": n_normal, "n_anomalous_clips": n_anomalous, "conditions": {}}
        for condition in CONDITIONS:
            per_split = []
            for split in range(config.n_splits):
                train_normals, train_anomalies, test_clips = split_clips(machine_clips, config, split)
                logger.info("%s, %s, split %d/%d", machine, condition, split + 1, config.n_splits)
                result = evaluate_split(train_normals, train_anomalies, test_clips, condition, config,
                                        config.seed + 100 * split)
                per_split.append({key: result[key] for key in (
                    "metrics", "n_test_normal", "n_test_anomalous", "n_train_normal", "n_train_anomalous",
                    "n_synthetic")})
                if first is None and condition == "original":
                    first = (result, train_normals, train_anomalies, test_clips)
            entry["conditions"][condition] = {"splits": per_split, "summary": summarise(per_split)}
        metrics["machines"][machine] = entry

    if first is not None:
        metrics["device"] = export_and_check(first, config)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics


def export_and_check(first, config: AudioDemoConfig) -> dict:
    """Export the first split's models and run the device replay and calibration checks."""
    result, train_normals, train_anomalies, test_clips = first
    step = result["step"]
    result["train_vectors_per_clip"] = [len(log_mel_features(clip.samples, step)) for clip in train_normals]
    result["reference_level_db"] = float(np.mean([
        log_mel_frames(clip.samples, sample_rate_hz=step["sample_rate_hz"]).mean(dtype=np.float64)
        for clip in train_normals
    ]))
    anomaly_vectors = np.concatenate([log_mel_features(clip.samples, step) for clip in train_anomalies])
    result["cvae"] = fit_audio_cvae(result["train_normal_vectors"], anomaly_vectors, config.seed)
    bundle_dir = config.run_dir / "bundle"
    seconds = len(train_normals[0].samples) / train_normals[0].sample_rate_hz
    thresholds = export_audio_bundle(bundle_dir, result, seconds, config.target_fpr)
    checks = device_checks(bundle_dir, config.run_dir, result, test_clips, config)
    return {"bundle": str(bundle_dir), "workstation_thresholds": thresholds, "checks": checks}


def format_audio_summary(metrics: dict) -> str:
    """Return a plain-text table of clip-level ROC-AUC / pAUC per machine id and condition."""
    lines = []
    for machine, entry in metrics["machines"].items():
        if "skipped" in entry:
            lines.append(f"{machine}: skipped ({entry['skipped']})")
            continue
        first_split = entry["conditions"]["original"]["splits"][0]
        lines.append(
            f"{machine}: {entry['n_normal_clips']} normal + {entry['n_anomalous_clips']} anomalous clips; "
            f"per split {first_split['n_train_normal']} normal + {first_split['n_train_anomalous']} anomalous "
            f"for training, {first_split['n_test_normal']} normal + {first_split['n_test_anomalous']} anomalous "
            f"held out; ROC-AUC / pAUC(0.1), mean over splits"
        )
        lines.append(f"  {'detector':<22}" + "".join(f"{condition:>32}" for condition in CONDITIONS))
        for name in DETECTORS:
            cells = []
            for condition in CONDITIONS:
                summary = entry["conditions"][condition]["summary"][name]
                cells.append(f"{summary['roc_auc']['mean']:.2f}±{summary['roc_auc']['std']:.2f} / "
                             f"{summary['pauc']['mean']:.2f}±{summary['pauc']['std']:.2f}")
            lines.append(f"  {name:<22}" + "".join(f"{cell:>32}" for cell in cells))
    return "\n".join(lines)
