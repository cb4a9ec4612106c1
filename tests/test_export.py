"""ONNX export, int8 quantization and bundle writing, on tiny models trained on ECG5000.

Three real models train for a few seconds on the embedded ECG5000 training split: a
Conv1d autoencoder score module, a fully connected classifier and a conditional Conv1d +
Upsample decoder. One bundle holding all three is written once per module and shared.
"""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from sklearn.metrics import roc_auc_score  # noqa: E402
from torch import nn  # noqa: E402

from anomalyforge.bundle import load_bundle  # noqa: E402
from anomalyforge.errors import BundleError, InvalidInputError  # noqa: E402
from anomalyforge.export import (  # noqa: E402
    BundleWriter,
    export_onnx,
    parity,
    quantize_onnx_int8,
    run_onnx,
)
from anomalyforge.export import onnx_export  # noqa: E402
from anomalyforge.export.onnx_export import ExportError, onnx_io  # noqa: E402
from anomalyforge.signal import preprocessing_spec  # noqa: E402
from anomalyforge.thresholds import calibrate_threshold  # noqa: E402
from anomalyforge.training.datasets import ECG5000_NORMAL_CLASS, load_ecg5000  # noqa: E402

logger = logging.getLogger(__name__)

SEED = 0
WINDOW_LENGTH = 140
LATENT_DIM = 8
CLASSES = [1, 2, 3, 4, 5]
N_TRAIN_NORMALS = 192
N_TEST_SUBSET = 1000
FP32_TOLERANCE = 1e-4
AUC_TOLERANCE = 0.02


class ConvAutoencoderScore(nn.Module):
    """Mean squared reconstruction error of a Conv1d autoencoder: (batch, 140) -> (batch,)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv1d(1, 8, 7, padding=3), nn.ReLU(),
            nn.Conv1d(8, 8, 7, stride=2, padding=3), nn.ReLU(),
            nn.Conv1d(8, 8, 7, stride=2, padding=3), nn.ReLU(),
        )
        self.decoder = nn.Sequential(
            nn.Upsample(scale_factor=2), nn.Conv1d(8, 8, 7, padding=3), nn.ReLU(),
            nn.Upsample(scale_factor=2), nn.Conv1d(8, 1, 7, padding=3),
        )

    def forward(self, window):
        reconstruction = self.decoder(self.encoder(window.unsqueeze(1))).squeeze(1)
        return ((reconstruction - window) ** 2).mean(dim=1)


class BeatClassifier(nn.Module):
    """Logit of "abnormal beat" from a fully connected network: (batch, 140) -> (batch,)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(WINDOW_LENGTH, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 1),
        )

    def forward(self, window):
        return self.layers(window).squeeze(1)


class ConditionalDecoder(nn.Module):
    """(z (batch, 8), one-hot condition (batch, 5)) -> beat (batch, 140), Upsample + Conv1d."""

    def __init__(self):
        super().__init__()
        self.project = nn.Linear(LATENT_DIM + len(CLASSES), 16 * 35)
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.Upsample(scale_factor=2), nn.Conv1d(16, 8, 5, padding=2), nn.ReLU(),
            nn.Upsample(scale_factor=2), nn.Conv1d(8, 1, 5, padding=2),
        )

    def forward(self, z, condition):
        hidden = self.project(torch.cat([z, condition], dim=1)).reshape(-1, 16, 35)
        return self.body(hidden).squeeze(1)


class SignDependentScore(nn.Module):
    """A score with a Python branch on tensor values, which no exporter can capture as a graph."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(WINDOW_LENGTH, 1)

    def forward(self, window):
        if window.sum() > 0:
            return self.linear(window).squeeze(1)
        return -self.linear(window).squeeze(1)


class TransposedDecoder(nn.Module):
    """A decoder that breaks the no-ConvTranspose1d rule."""

    def __init__(self):
        super().__init__()
        self.project = nn.Linear(LATENT_DIM + len(CLASSES), 16 * 70)
        self.up = nn.ConvTranspose1d(16, 1, 4, stride=2, padding=1)

    def forward(self, z, condition):
        return self.up(self.project(torch.cat([z, condition], dim=1)).reshape(-1, 16, 70)).squeeze(1)


def train(module, loss_of_batch, n_rows: int, steps: int):
    """Run Adam for ``steps`` minibatches of 64 seeded row indices; return the module in eval mode."""
    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    for _ in range(steps):
        rows = torch.randint(0, n_rows, (64,), generator=generator)
        loss = loss_of_batch(rows)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return module.eval()


def one_hot(labels: np.ndarray) -> np.ndarray:
    return np.eye(len(CLASSES), dtype=np.float32)[[CLASSES.index(int(label)) for label in labels]]


@pytest.fixture(scope="module")
def ecg():
    train_set, test_set = load_ecg5000()
    normals = train_set.x[train_set.y == ECG5000_NORMAL_CLASS]
    subset = np.random.default_rng(SEED).choice(len(test_set), N_TEST_SUBSET, replace=False)
    return {
        "train_x": train_set.x,
        "train_y": train_set.y,
        "fit_normals": normals[:N_TRAIN_NORMALS],
        "held_out_normals": normals[N_TRAIN_NORMALS:],
        "test_x": test_set.x[subset],
        "test_anomalous": (test_set.y[subset] != ECG5000_NORMAL_CLASS).astype(int),
    }


@pytest.fixture(scope="module")
def models(ecg):
    torch.manual_seed(SEED)
    # One thread: tiny models train many times slower with two when other processes compete.
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    normals = torch.from_numpy(ecg["fit_normals"])
    train_x = torch.from_numpy(ecg["train_x"])
    abnormal = torch.from_numpy((ecg["train_y"] != ECG5000_NORMAL_CLASS).astype(np.float32))
    condition = torch.from_numpy(one_hot(ecg["train_y"]))

    autoencoder = ConvAutoencoderScore()
    train(autoencoder, lambda rows: autoencoder(normals[rows]).mean(), len(normals), steps=150)

    classifier = BeatClassifier()
    train(
        classifier,
        lambda rows: nn.functional.binary_cross_entropy_with_logits(classifier(train_x[rows]), abnormal[rows]),
        len(train_x), steps=150,
    )

    decoder = ConditionalDecoder()
    latent_generator = torch.Generator().manual_seed(SEED + 1)

    def decoder_loss(rows):
        z = torch.randn(len(rows), LATENT_DIM, generator=latent_generator)
        return ((decoder(z, condition[rows]) - train_x[rows]) ** 2).mean()

    train(decoder, decoder_loss, len(train_x), steps=100)
    torch.set_num_threads(previous_threads)
    return {"conv_ae": autoencoder, "classifier": classifier, "decoder": decoder}


@pytest.fixture(scope="module")
def decoder_calibration():
    rng = np.random.default_rng(SEED)
    labels = np.tile(CLASSES, 20)
    return {
        "z": rng.standard_normal((len(labels), LATENT_DIM)).astype(np.float32),
        "condition": one_hot(labels),
    }


@pytest.fixture(scope="module")
def written_bundle(tmp_path_factory, ecg, models, decoder_calibration):
    """Bundle directory and zip holding conv_ae, classifier (detectors) and decoder."""
    root = tmp_path_factory.mktemp("export")
    out_dir = root / "bundle"
    writer = BundleWriter(out_dir, {"modality": "ecg", "window_length": WINDOW_LENGTH, "hop": WINDOW_LENGTH},
                          preprocessing_spec())
    paths = {}
    for name, output in (("conv_ae", "reconstruction mean squared error"),
                         ("classifier", "logit of an abnormal beat")):
        module = models[name]
        with torch.no_grad():
            held_out_scores = module(torch.from_numpy(ecg["held_out_normals"])).numpy()
        threshold = calibrate_threshold(held_out_scores, target_fpr=0.05).to_dict()
        paths[name] = writer.add_detector(
            name, module, ecg["fit_normals"][:1], threshold, output, ecg["fit_normals"],
        )
    paths["decoder"] = writer.add_decoder("decoder", models["decoder"], LATENT_DIM, CLASSES, decoder_calibration)
    zip_path = writer.finish("conv_ae", {"note": "tiny test models"}, zip_path=root / "bundle.zip")
    return {"dir": out_dir, "zip": zip_path, "paths": paths, "manifest": writer.manifest}


def torch_scores(module, windows: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(windows)).numpy()


def output_features(node, weight) -> int:
    """Return the output channel count of a Conv, or the output feature count of a Gemm / MatMul."""
    transposed = any(attribute.name == "transB" and attribute.i == 1 for attribute in node.attribute)
    if node.op_type == "Conv" or transposed:
        return weight.dims[0]
    return weight.dims[1]


def initializers(model) -> dict:
    return {tensor.name: tensor for tensor in model.graph.initializer}


@pytest.mark.parametrize("name", ["conv_ae", "classifier"])
def test_fp32_parity_on_test_beats(written_bundle, models, ecg, name):
    result = parity(models[name], written_bundle["paths"][name]["onnx-fp32"], {"window": ecg["test_x"]})
    logger.info("fp32 parity of %s: %s", name, result)
    assert result["n_samples"] == N_TEST_SUBSET
    assert result["max_abs_diff"] < FP32_TOLERANCE
    assert result["mean_abs_diff"] < FP32_TOLERANCE


@pytest.mark.parametrize("batch", [1, 37])
@pytest.mark.parametrize("format_key", ["onnx-fp32", "onnx-int8"])
@pytest.mark.parametrize("name", ["conv_ae", "classifier"])
def test_dynamic_batch_runs(written_bundle, models, ecg, name, format_key, batch):
    windows = ecg["test_x"][:batch]
    (scores,) = run_onnx(written_bundle["paths"][name][format_key], {"window": windows})
    assert scores.shape == (batch,)
    assert scores.dtype == np.float32
    if format_key == "onnx-fp32":
        np.testing.assert_allclose(scores, torch_scores(models[name], windows), atol=FP32_TOLERANCE)


@pytest.mark.parametrize("name", ["conv_ae", "classifier"])
def test_int8_auc_close_to_torch(written_bundle, models, ecg, name):
    labels = ecg["test_anomalous"]
    torch_auc = roc_auc_score(labels, torch_scores(models[name], ecg["test_x"]))
    (int8_scores,) = run_onnx(written_bundle["paths"][name]["onnx-int8"], {"window": ecg["test_x"]})
    int8_auc = roc_auc_score(labels, int8_scores)
    logger.info("%s ROC-AUC on %d test beats: torch %.4f, int8 %.4f", name, len(labels), torch_auc, int8_auc)
    # A floor on the torch AUC shows the models learned something, so the comparison is not
    # between two chance-level rankings.
    assert torch_auc > 0.85
    assert abs(int8_auc - torch_auc) <= AUC_TOLERANCE


@pytest.mark.parametrize("name", ["conv_ae", "classifier", "decoder"])
def test_int8_file_has_qdq_and_int8_weights(written_bundle, name):
    model = onnx.load(str(written_bundle["paths"][name]["onnx-int8"]))
    op_types = [node.op_type for node in model.graph.node]
    assert op_types.count("QuantizeLinear") > 0
    assert op_types.count("DequantizeLinear") > 0

    constants = initializers(model)
    producers = {output: node for node in model.graph.node for output in node.output}
    weight_nodes = [node for node in model.graph.node if node.op_type in ("Conv", "Gemm", "MatMul")]
    int8_weight_nodes = []
    for node in weight_nodes:
        producer = producers.get(node.input[1])
        if producer is None or producer.op_type != "DequantizeLinear":
            continue
        weight = constants[producer.input[0]]
        assert weight.data_type == onnx.TensorProto.INT8, f"{node.name} weight is not int8"
        scale = constants[producer.input[1]]
        # Per-channel: one scale per output channel (Conv) or output feature (Gemm).
        assert list(scale.dims) == [output_features(node, weight)], f"{node.name} weight is not per-channel"
        int8_weight_nodes.append(node.name)
    # Only the node that computes the graph output may keep float weights.
    assert len(int8_weight_nodes) >= len(weight_nodes) - 1
    assert len(int8_weight_nodes) >= 2


def test_int8_conv_ae_keeps_score_in_float(written_bundle, models, ecg):
    (int8_scores,) = run_onnx(written_bundle["paths"]["conv_ae"]["onnx-int8"], {"window": ecg["test_x"]})
    reference = torch_scores(models["conv_ae"], ecg["test_x"])
    # A score quantized to int8 would take at most 256 distinct values.
    assert len(np.unique(int8_scores)) > 256
    relative_error = np.mean(np.abs(int8_scores - reference)) / np.mean(np.abs(reference))
    assert relative_error < 0.1


def test_decoder_has_two_inputs_and_no_convtranspose(written_bundle, models, decoder_calibration):
    for format_key in ("onnx-fp32", "onnx-int8"):
        path = written_bundle["paths"]["decoder"][format_key]
        inputs, outputs = onnx_io(path)
        assert inputs == [
            {"name": "z", "shape": [None, LATENT_DIM], "dtype": "float32"},
            {"name": "condition", "shape": [None, len(CLASSES)], "dtype": "float32"},
        ]
        assert outputs == [{"name": "beat", "shape": [None, WINDOW_LENGTH], "dtype": "float32"}]
        op_types = {node.op_type for node in onnx.load(str(path)).graph.node}
        assert "ConvTranspose" not in op_types
        assert "Conv" in op_types

    fp32 = parity(models["decoder"], written_bundle["paths"]["decoder"]["onnx-fp32"], decoder_calibration)
    assert fp32["max_abs_diff"] < FP32_TOLERANCE
    int8 = parity(models["decoder"], written_bundle["paths"]["decoder"]["onnx-int8"], decoder_calibration)
    logger.info("decoder parity: fp32 %s, int8 %s", fp32, int8)
    # Beats are z-normalised (unit standard deviation), so 0.1 is a tenth of one.
    assert int8["mean_abs_diff"] < 0.1


@pytest.mark.parametrize("batch", [1, 37])
def test_decoder_dynamic_batch(written_bundle, decoder_calibration, batch):
    inputs = {key: np.resize(array, (batch, array.shape[1])) for key, array in decoder_calibration.items()}
    for format_key in ("onnx-fp32", "onnx-int8"):
        (beats,) = run_onnx(written_bundle["paths"]["decoder"][format_key], inputs)
        assert beats.shape == (batch, WINDOW_LENGTH)


def test_decoder_with_convtranspose_rejected(tmp_path, decoder_calibration):
    writer = BundleWriter(tmp_path / "bundle", {"window_length": WINDOW_LENGTH}, preprocessing_spec())
    with pytest.raises(InvalidInputError, match="ConvTranspose1d"):
        writer.add_decoder("bad", TransposedDecoder(), LATENT_DIM, CLASSES, decoder_calibration)


@pytest.mark.parametrize("source", ["dir", "zip"])
def test_bundle_loads(written_bundle, source):
    loaded = load_bundle(written_bundle[source])
    assert loaded.manifest["default_detector"] == "conv_ae"
    assert sorted(loaded.detectors()) == ["classifier", "conv_ae"]
    assert loaded.model("decoder")["role"] == "decoder"
    for name in ("conv_ae", "classifier", "decoder"):
        for format_key in ("onnx-fp32", "onnx-int8"):
            assert loaded.path_of(loaded.file_entry(name, format_key)).is_file()


def test_bundle_model_files_self_contained(written_bundle):
    names = sorted(path.name for path in written_bundle["dir"].iterdir())
    expected = sorted(
        [f"{model}.{precision}.onnx" for model in ("conv_ae", "classifier", "decoder") for precision in ("fp32", "int8")]
        + ["manifest.json"]
    )
    assert names == expected


def test_manifest_detector_entries(written_bundle):
    manifest = load_bundle(written_bundle["dir"]).manifest
    model = manifest["models"]["conv_ae"]
    assert model["role"] == "detector"
    assert model["output"] == "reconstruction mean squared error"
    assert np.isfinite(model["threshold"]["value"])
    assert model["threshold"]["target_fpr"] == 0.05

    for format_key, precision in (("onnx-fp32", "float32"), ("onnx-int8", "int8")):
        entry = model["formats"][format_key]
        assert entry["file"] == f"conv_ae.{'fp32' if precision == 'float32' else 'int8'}.onnx"
        assert entry["format"] == format_key
        assert entry["precision"] == precision
        assert len(entry["sha256"]) == 64
        assert int(entry["sha256"], 16) >= 0
        assert entry["size_bytes"] > 0
        assert entry["inputs"] == [{"name": "window", "shape": [None, WINDOW_LENGTH], "dtype": "float32"}]
        assert entry["outputs"] == [{"name": "score", "shape": [None], "dtype": "float32"}]
        assert entry["parity"]["n_samples"] == N_TRAIN_NORMALS

    assert model["formats"]["onnx-fp32"]["parity"]["max_abs_diff"] < FP32_TOLERANCE
    quantization = model["formats"]["onnx-int8"]["quantization"]
    assert quantization["format"] == "QDQ"
    assert quantization["activation_type"] == "QInt8"
    assert quantization["weight_type"] == "QInt8"
    assert quantization["per_channel"] is True
    assert quantization["calibration_method"] == "MinMax"
    assert quantization["calibration_samples"] == N_TRAIN_NORMALS
    assert "quantization" not in model["formats"]["onnx-fp32"]


def test_manifest_decoder_entry(written_bundle):
    model = load_bundle(written_bundle["dir"]).manifest["models"]["decoder"]
    assert model["latent_dim"] == LATENT_DIM
    assert model["classes"] == CLASSES
    assert model["condition"]["encoding"] == "one-hot"
    assert model["condition"]["order"] == CLASSES
    assert "beat" in model["output"]
    assert "threshold" not in model
    assert model["formats"]["onnx-int8"]["inputs"][1]["shape"] == [None, len(CLASSES)]


def test_tampered_model_byte_raises(written_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(written_bundle["dir"], copy)
    target = copy / "conv_ae.int8.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"conv_ae\.int8\.onnx"):
        load_bundle(copy)


def test_export_is_deterministic(models, ecg, tmp_path):
    example = (torch.from_numpy(ecg["fit_normals"][:2]),)
    first = export_onnx(models["classifier"], example, tmp_path / "a.onnx", ["window"], ["score"])
    second = export_onnx(models["classifier"], example, tmp_path / "b.onnx", ["window"], ["score"])
    assert first.read_bytes() == second.read_bytes()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.onnx", "b.onnx"]


def test_export_fixed_batch(models, ecg, tmp_path):
    example = (torch.from_numpy(ecg["fit_normals"][:4]),)
    path = export_onnx(models["classifier"], example, tmp_path / "fixed.onnx", ["window"], ["score"],
                       dynamic_batch=False)
    inputs, outputs = onnx_io(path)
    assert inputs[0]["shape"] == [4, WINDOW_LENGTH]
    assert outputs[0]["shape"] == [4]


def test_export_torchscript_fallback(models, ecg, tmp_path, monkeypatch):
    def failing_dynamo_export(*args, **kwargs):
        raise torch.onnx.OnnxExporterError("forced dynamo failure")

    monkeypatch.setattr(onnx_export, "export_with_dynamo", failing_dynamo_export)
    example = (torch.from_numpy(ecg["fit_normals"][:2]),)
    path = export_onnx(models["conv_ae"], example, tmp_path / "legacy.onnx", ["window"], ["score"])
    inputs, outputs = onnx_io(path)
    assert inputs == [{"name": "window", "shape": [None, WINDOW_LENGTH], "dtype": "float32"}]
    assert outputs[0]["shape"] == [None]
    result = parity(models["conv_ae"], path, {"window": ecg["test_x"][:37]})
    assert result["max_abs_diff"] < FP32_TOLERANCE


def test_export_rejects_value_dependent_branch(ecg, tmp_path):
    torch.manual_seed(SEED)
    example = (torch.from_numpy(ecg["fit_normals"][:2]),)
    with pytest.raises(ExportError, match="TracerWarning"):
        export_onnx(SignDependentScore(), example, tmp_path / "branch.onnx", ["window"], ["score"])


def test_export_rejects_name_count_mismatch(models, ecg, tmp_path):
    example = (torch.from_numpy(ecg["fit_normals"][:2]),)
    with pytest.raises(InvalidInputError, match="2 input names"):
        export_onnx(models["classifier"], example, tmp_path / "x.onnx", ["window", "extra"], ["score"])


def test_quantize_rejects_wrong_calibration_key(written_bundle, ecg, tmp_path):
    with pytest.raises(InvalidInputError, match=r"one array per model input \['window'\]"):
        quantize_onnx_int8(written_bundle["paths"]["conv_ae"]["onnx-fp32"], tmp_path / "q.onnx",
                           {"windows": ecg["fit_normals"]})


def test_quantize_rejects_non_finite_calibration(written_bundle, ecg, tmp_path):
    windows = ecg["fit_normals"].copy()
    windows[3, 7] = np.nan
    with pytest.raises(InvalidInputError, match="1 non-finite"):
        quantize_onnx_int8(written_bundle["paths"]["conv_ae"]["onnx-fp32"], tmp_path / "q.onnx",
                           {"window": windows})


def test_run_onnx_rejects_unknown_input(written_bundle, ecg):
    with pytest.raises(InvalidInputError, match="takes inputs"):
        run_onnx(written_bundle["paths"]["conv_ae"]["onnx-fp32"], {"beat": ecg["test_x"][:2]})


def test_writer_rejects_non_empty_directory(tmp_path):
    (tmp_path / "old.onnx").write_bytes(b"x")
    with pytest.raises(BundleError, match="not empty"):
        BundleWriter(tmp_path, {"window_length": WINDOW_LENGTH}, preprocessing_spec())


def test_writer_rejects_duplicate_model(written_bundle, models, ecg, tmp_path):
    writer = BundleWriter(tmp_path / "bundle", {"window_length": WINDOW_LENGTH}, preprocessing_spec())
    writer.manifest["models"]["conv_ae"] = written_bundle["manifest"]["models"]["conv_ae"]
    with pytest.raises(BundleError, match="already in bundle"):
        writer.add_detector("conv_ae", models["conv_ae"], ecg["fit_normals"][:1], {"value": 1.0},
                            "score", ecg["fit_normals"])


def test_writer_rejects_threshold_without_value(models, ecg, tmp_path):
    writer = BundleWriter(tmp_path / "bundle", {"window_length": WINDOW_LENGTH}, preprocessing_spec())
    with pytest.raises(InvalidInputError, match="finite numeric 'value'"):
        writer.add_detector("conv_ae", models["conv_ae"], ecg["fit_normals"][:1], {"value": float("nan")},
                            "score", ecg["fit_normals"])


def test_writer_rejects_wrong_window_length(models, ecg, tmp_path):
    writer = BundleWriter(tmp_path / "bundle", {"window_length": WINDOW_LENGTH}, preprocessing_spec())
    with pytest.raises(InvalidInputError, match="expects 140"):
        writer.add_detector("conv_ae", models["conv_ae"], ecg["fit_normals"][:1, :100], {"value": 1.0},
                            "score", ecg["fit_normals"][:, :100])


def test_finish_rejects_unknown_default_detector(written_bundle, tmp_path):
    writer = BundleWriter(tmp_path / "bundle", {"window_length": WINDOW_LENGTH}, preprocessing_spec())
    with pytest.raises(BundleError, match="not a detector"):
        writer.finish("conv_ae")
