"""Tests for anomalyforge.bundle: writing, loading, checksums, zip safety and thresholds."""

import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest

from anomalyforge import bundle as bundle_module
from anomalyforge.bundle import (
    MANIFEST_NAME,
    SCHEMA,
    check_member_name,
    extract_zip,
    file_entry,
    load_bundle,
    new_manifest,
    set_threshold,
    sha256_file,
    write_manifest,
    zip_bundle,
)
from anomalyforge.errors import BundleError
from anomalyforge.signal import preprocessing_spec
from anomalyforge.thresholds import calibrate_threshold
from anomalyforge.training.datasets import load_ecg5000

EXCERPT = Path(__file__).resolve().parent / "data" / "ecg5000_train_excerpt.txt"
WINDOW_INPUT = [{"name": "window", "shape": [None, 140], "dtype": "float32"}]
SCORE_OUTPUT = [{"name": "score", "shape": [None], "dtype": "float32"}]


@pytest.fixture(scope="module")
def first_threshold() -> dict:
    train, _ = load_ecg5000()
    scores = np.abs(train.x[train.y == 1]).max(axis=1)
    return calibrate_threshold(scores, target_fpr=0.01).to_dict()


@pytest.fixture
def bundle_dir(tmp_path, first_threshold) -> Path:
    """Write a bundle with one detector (two formats) and one decoder, all real files."""
    root = tmp_path / "bundle"
    root.mkdir()
    # The bundle module treats model files as opaque bytes, so any real files will do.
    (root / "detector_fp32.onnx").write_bytes(EXCERPT.read_bytes()[:4096])
    (root / "detector_int8.onnx").write_bytes(bytes(range(256)) * 8)
    (root / "decoder.bin").write_bytes(EXCERPT.read_bytes()[-2048:])

    task = {"modality": "ecg", "window_length": 140, "hop": 140, "channels": 1, "sample_format": "float32"}
    manifest = new_manifest(task, preprocessing_spec())
    manifest["default_detector"] = "autoencoder"
    manifest["models"]["autoencoder"] = {
        "role": "detector",
        "output": "score",
        "formats": {
            "onnx_fp32": file_entry(root, "detector_fp32.onnx", "onnx", "fp32", WINDOW_INPUT, SCORE_OUTPUT),
            "onnx_int8": file_entry(root, "detector_int8.onnx", "onnx", "int8", WINDOW_INPUT, SCORE_OUTPUT,
                                    opset=17),
        },
        "threshold": dict(first_threshold),
        "threshold_history": [],
    }
    manifest["models"]["generator"] = {
        "role": "decoder",
        "output": "window",
        "formats": {"raw": file_entry(root, "decoder.bin", "raw", "fp32", [], WINDOW_INPUT)},
    }
    write_manifest(root, manifest)
    return root


def test_file_entry_records_checksum(bundle_dir):
    entry = file_entry(bundle_dir, "decoder.bin", "raw", "fp32", [], WINDOW_INPUT, note="test")

    assert entry["sha256"] == sha256_file(bundle_dir / "decoder.bin")
    assert entry["size_bytes"] == 2048
    assert entry["file"] == "decoder.bin"
    assert entry["note"] == "test"


def test_write_manifest_leaves_no_temporary(bundle_dir):
    assert sorted(path.name for path in bundle_dir.iterdir()) == [
        "decoder.bin", "detector_fp32.onnx", "detector_int8.onnx", MANIFEST_NAME,
    ]


def test_load_bundle_directory(bundle_dir):
    loaded = load_bundle(bundle_dir)

    assert loaded.temporary is None
    assert loaded.root == bundle_dir
    assert loaded.manifest["schema"] == SCHEMA
    assert loaded.task["window_length"] == 140
    assert loaded.detectors() == ["autoencoder"]
    assert loaded.manifest["preprocessing"] == preprocessing_spec()
    entry = loaded.file_entry("autoencoder", "onnx_int8")
    assert entry["opset"] == 17
    assert loaded.path_of(entry).read_bytes() == bytes(range(256)) * 8


def test_load_bundle_zip(bundle_dir, tmp_path):
    zip_path = zip_bundle(bundle_dir, tmp_path / "bundle.zip")

    loaded = load_bundle(zip_path)

    assert loaded.temporary is not None
    assert loaded.source == zip_path
    assert loaded.root != bundle_dir
    assert loaded.manifest == json.loads((bundle_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    entry = loaded.file_entry("generator", "raw")
    assert loaded.path_of(entry).read_bytes() == (bundle_dir / "decoder.bin").read_bytes()


def test_bundle_unknown_model(bundle_dir):
    loaded = load_bundle(bundle_dir)

    with pytest.raises(BundleError, match=r"model 'vae' is not in bundle .* available: \['autoencoder', 'generator'\]"):
        loaded.model("vae")


def test_bundle_unknown_format(bundle_dir):
    loaded = load_bundle(bundle_dir)

    with pytest.raises(BundleError, match=r"has no 'tflite_int8' file .* available: \['onnx_fp32', 'onnx_int8'\]"):
        loaded.file_entry("autoencoder", "tflite_int8")


def test_load_bundle_tampered_byte(bundle_dir):
    path = bundle_dir / "detector_int8.onnx"
    data = bytearray(path.read_bytes())
    data[1000] ^= 0x01
    path.write_bytes(bytes(data))

    with pytest.raises(BundleError, match=r"checksum mismatch for 'detector_int8.onnx'"):
        load_bundle(bundle_dir)


def test_load_bundle_tampered_zip_member(bundle_dir, tmp_path):
    # The zip is internally consistent (valid CRC), so only the manifest checksum can
    # catch the change.
    (bundle_dir / "decoder.bin").write_bytes(b"x" + (bundle_dir / "decoder.bin").read_bytes()[1:])
    zip_path = zip_bundle(bundle_dir, tmp_path / "tampered.zip")

    with pytest.raises(BundleError, match=r"checksum mismatch for 'decoder.bin'"):
        load_bundle(zip_path)


def test_load_bundle_corrupt_zip_data(bundle_dir, tmp_path):
    # A byte flipped inside a stored zip member breaks its CRC. The loader must report
    # that as a BundleError, like every other damaged bundle.
    zip_path = tmp_path / "corrupt.zip"
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_STORED) as archive:
        for path in sorted(bundle_dir.iterdir()):
            archive.write(path, arcname=path.name)
    data = bytearray(zip_path.read_bytes())
    offset = data.find(bytes(range(16, 32)))
    assert offset > 0
    data[offset] ^= 0xFF
    zip_path.write_bytes(bytes(data))

    with pytest.raises(BundleError, match=r"detector_int8.onnx"):
        load_bundle(zip_path)


def test_load_bundle_missing_file(bundle_dir):
    (bundle_dir / "decoder.bin").unlink()

    with pytest.raises(BundleError, match=r"file 'decoder.bin' of model 'generator' \(raw\) is missing"):
        load_bundle(bundle_dir)


def test_load_bundle_missing_manifest(bundle_dir):
    (bundle_dir / MANIFEST_NAME).unlink()

    with pytest.raises(BundleError, match=r"manifest.json not found"):
        load_bundle(bundle_dir)


def test_load_bundle_invalid_json(bundle_dir):
    (bundle_dir / MANIFEST_NAME).write_text('{"schema": ', encoding="utf-8")

    with pytest.raises(BundleError, match=r"manifest.json is not valid JSON"):
        load_bundle(bundle_dir)


def test_load_bundle_manifest_not_object(bundle_dir):
    (bundle_dir / MANIFEST_NAME).write_text("[1, 2]", encoding="utf-8")

    with pytest.raises(BundleError, match=r"must contain a JSON object"):
        load_bundle(bundle_dir)


def edit_manifest(bundle_dir: Path, **changes) -> None:
    manifest = json.loads((bundle_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    manifest.update(changes)
    write_manifest(bundle_dir, manifest)


def test_load_bundle_schema_major_two(bundle_dir):
    edit_manifest(bundle_dir, schema="anomalyforge.bundle/2")

    with pytest.raises(BundleError, match=r"bundle schema 'anomalyforge.bundle/2' is not supported"):
        load_bundle(bundle_dir)


def test_load_bundle_schema_other_name(bundle_dir):
    edit_manifest(bundle_dir, schema="otherkit.bundle/1")

    with pytest.raises(BundleError, match=r"bundle schema 'otherkit.bundle/1' is not supported"):
        load_bundle(bundle_dir)


def test_load_bundle_schema_minor_accepted(bundle_dir):
    edit_manifest(bundle_dir, schema="anomalyforge.bundle/1.4")

    assert load_bundle(bundle_dir).manifest["schema"] == "anomalyforge.bundle/1.4"


def test_load_bundle_schema_missing(bundle_dir):
    edit_manifest(bundle_dir, schema=None)

    with pytest.raises(BundleError, match=r"no valid 'schema' field \(got None\)"):
        load_bundle(bundle_dir)


def test_load_bundle_required_field_missing(bundle_dir):
    manifest = json.loads((bundle_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    del manifest["preprocessing"]
    write_manifest(bundle_dir, manifest)

    with pytest.raises(BundleError, match=r"missing the required field 'preprocessing'"):
        load_bundle(bundle_dir)


def test_load_bundle_manifest_escaping_path(bundle_dir):
    manifest = json.loads((bundle_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    manifest["models"]["generator"]["formats"]["raw"]["file"] = "../decoder.bin"
    write_manifest(bundle_dir, manifest)

    with pytest.raises(BundleError, match=r"'\.\./decoder.bin' would leave the bundle directory"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("name", ["../evil", "models/../../evil", "/etc/passwd", "C:evil", "dir\\evil", "", "."])
def test_check_member_name_rejects(name):
    with pytest.raises(BundleError, match=r"would leave the bundle directory"):
        check_member_name(name)


@pytest.mark.parametrize("name", ["model.onnx", "models/model.onnx", "a.b..c"])
def test_check_member_name_accepts(name):
    assert check_member_name(name) == name


@pytest.mark.parametrize("member", ["../evil", "sub/../../evil"])
def test_load_bundle_zip_relative_escape(bundle_dir, tmp_path, member):
    zip_path = zip_bundle(bundle_dir, tmp_path / "evil.zip")
    with zipfile.ZipFile(zip_path, "a") as archive:
        archive.writestr(member, b"payload")

    with pytest.raises(BundleError, match="bundle member path " + re.escape(repr(member)) + " would leave"):
        load_bundle(zip_path)


def test_extract_zip_relative_escape(bundle_dir, tmp_path):
    zip_path = zip_bundle(bundle_dir, tmp_path / "evil.zip")
    with zipfile.ZipFile(zip_path, "a") as archive:
        archive.writestr("../evil", b"payload")
    target = tmp_path / "out"
    target.mkdir()

    with pytest.raises(BundleError, match=r"'\.\./evil' would leave the bundle directory"):
        extract_zip(zip_path, target)
    assert not (tmp_path / "evil").exists()


def test_extract_zip_absolute_member(bundle_dir, tmp_path):
    absolute = tmp_path / "absolute_evil"
    zip_path = zip_bundle(bundle_dir, tmp_path / "evil.zip")
    with zipfile.ZipFile(zip_path, "a") as archive:
        archive.writestr(str(absolute), b"payload")
    target = tmp_path / "out"
    target.mkdir()

    with pytest.raises(BundleError, match=r"would leave the bundle directory"):
        extract_zip(zip_path, target)
    assert not absolute.exists()


def test_extract_zip_oversized_member(bundle_dir, tmp_path, monkeypatch):
    zip_path = zip_bundle(bundle_dir, tmp_path / "bundle.zip")
    monkeypatch.setattr(bundle_module, "MAX_MEMBER_BYTES", 3000)
    target = tmp_path / "out"
    target.mkdir()

    with pytest.raises(BundleError, match=r"'detector_fp32.onnx' is 4096 bytes, over the 3000-byte limit"):
        extract_zip(zip_path, target)


def test_extract_zip_not_a_zip(tmp_path):
    path = tmp_path / "bundle.zip"
    path.write_bytes(EXCERPT.read_bytes()[:500])

    with pytest.raises(BundleError, match=r"is not a valid zip file"):
        extract_zip(path, tmp_path)


def test_load_bundle_not_a_zip(tmp_path):
    # The file exists, so the message must state that it is not a zip file, not that
    # it is missing.
    path = tmp_path / "bundle.zip"
    path.write_bytes(EXCERPT.read_bytes()[:500])

    with pytest.raises(BundleError, match=r"is not a valid zip file"):
        load_bundle(path)


def test_load_bundle_missing_path(tmp_path):
    with pytest.raises(BundleError, match=r"bundle .*nowhere not found"):
        load_bundle(tmp_path / "nowhere")


def test_set_threshold_keeps_history(bundle_dir):
    old = load_bundle(bundle_dir).model("autoencoder")["threshold"]
    new = dict(old, value=old["value"] + 0.25, source="device")

    returned = set_threshold(bundle_dir, "autoencoder", new)

    reloaded = load_bundle(bundle_dir).model("autoencoder")
    assert returned["models"]["autoencoder"]["threshold"] == new
    assert reloaded["threshold"] == new
    assert reloaded["threshold_history"] == [old]


def test_set_threshold_twice_appends(bundle_dir):
    first = load_bundle(bundle_dir).model("autoencoder")["threshold"]
    second = dict(first, value=1.0)
    third = dict(first, value=2.0)

    set_threshold(bundle_dir, "autoencoder", second)
    set_threshold(bundle_dir, "autoencoder", third)

    reloaded = load_bundle(bundle_dir).model("autoencoder")
    assert reloaded["threshold"] == third
    assert reloaded["threshold_history"] == [first, second]


def test_set_threshold_refuses_decoder(bundle_dir):
    before = (bundle_dir / MANIFEST_NAME).read_bytes()

    with pytest.raises(BundleError, match=r"model 'generator' is a decoder, not a detector"):
        set_threshold(bundle_dir, "generator", {"value": 1.0})
    assert (bundle_dir / MANIFEST_NAME).read_bytes() == before


def test_set_threshold_refuses_zip(bundle_dir, tmp_path):
    zip_path = zip_bundle(bundle_dir, tmp_path / "bundle.zip")

    with pytest.raises(BundleError, match=r"is a zip file; thresholds can only be written into a bundle directory"):
        set_threshold(zip_path, "autoencoder", {"value": 1.0})
