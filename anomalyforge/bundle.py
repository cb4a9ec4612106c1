"""Model bundle: a directory (or the same content as one zip file) holding ``manifest.json``
and the model files it lists, each with its sha256 (numpy-free, standard library only).

The manifest layout::

    schema                "anomalyforge.bundle/1"; readers reject other major versions
    created, anomalyforge_version
    task                  modality, window_length, hop, channels, sample_format, ...
    preprocessing         list of anomalyforge.signal steps with their parameters
    default_detector      name of the detector the device uses unless told otherwise
    models                name -> {role, output, formats: {format key -> file entry},
                          threshold (detectors only), threshold_history}
    metrics               evaluation at export time

A file entry holds ``file`` (a plain name inside the bundle), ``format``, ``precision``,
``sha256``, ``size_bytes``, ``inputs`` and ``outputs`` (name, shape, dtype; ``None`` marks
a dynamic dimension). Loading verifies every checksum before any model is used, and zip
members that would land outside the bundle are rejected. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from anomalyforge import __version__
from anomalyforge.errors import BundleError

logger = logging.getLogger(__name__)

SCHEMA_NAME = "anomalyforge.bundle"
SCHEMA_MAJOR = 1
SCHEMA = f"{SCHEMA_NAME}/{SCHEMA_MAJOR}"
MANIFEST_NAME = "manifest.json"
MAX_MEMBER_BYTES = 512 * 1024 * 1024


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def new_manifest(task: dict, preprocessing: list[dict]) -> dict:
    """Return an empty manifest for ``task`` with no models yet."""
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "anomalyforge_version": __version__,
        "task": task,
        "preprocessing": preprocessing,
        "default_detector": None,
        "models": {},
        "metrics": {},
    }


def file_entry(bundle_dir: Path, file_name: str, fmt: str, precision: str, inputs: list[dict],
               outputs: list[dict], **extra) -> dict:
    """Describe a model file already written into ``bundle_dir``, with its checksum and size."""
    path = Path(bundle_dir) / check_member_name(file_name)
    entry = {
        "file": file_name,
        "format": fmt,
        "precision": precision,
        "sha256": sha256_file(path),
        "size_bytes": path.stat().st_size,
        "inputs": inputs,
        "outputs": outputs,
    }
    entry.update(extra)
    return entry


def check_member_name(name: str) -> str:
    """Return ``name`` if it is a plain relative path that stays inside the bundle, else raise."""
    pure = PurePosixPath(name)
    if not pure.parts or "\\" in name or pure.is_absolute() or ".." in pure.parts or ":" in pure.parts[0]:
        raise BundleError(
            f"bundle member path {name!r} would leave the bundle directory; "
            "only plain relative file names are allowed"
        )
    return name


def write_manifest(bundle_dir: Path, manifest: dict) -> Path:
    """Write ``manifest.json`` atomically (temporary file, then rename)."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_NAME
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    temporary.replace(path)
    return path


def zip_bundle(bundle_dir: Path, zip_path: Path) -> Path:
    """Pack a bundle directory into one zip file for copying to a device."""
    bundle_dir, zip_path = Path(bundle_dir), Path(zip_path)
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(bundle_dir.iterdir()):
            if path.is_file():
                archive.write(path, arcname=path.name)
    return zip_path


def extract_zip(zip_path: Path, target_dir: Path) -> None:
    """Extract a bundle zip, rejecting members that leave the target or are oversized."""
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as error:
        raise BundleError(f"{zip_path} is not a valid zip file ({error}); copy the bundle again") from error
    with archive:
        for info in archive.infolist():
            check_member_name(info.filename)
            if info.is_dir():
                continue
            if info.file_size > MAX_MEMBER_BYTES:
                raise BundleError(
                    f"bundle member {info.filename!r} is {info.file_size} bytes, over the "
                    f"{MAX_MEMBER_BYTES}-byte limit"
                )
            destination = target_dir / info.filename
            destination.parent.mkdir(parents=True, exist_ok=True)
            try:
                with archive.open(info) as source, open(destination, "wb") as sink:
                    shutil.copyfileobj(source, sink)
            except (zipfile.BadZipFile, zlib.error, EOFError) as error:
                raise BundleError(
                    f"bundle member {info.filename!r} in {zip_path} is corrupt ({error}); "
                    "copy the bundle again"
                ) from error


@dataclass
class Bundle:
    """A loaded, checksum-verified bundle. ``root`` is the directory holding the files."""

    root: Path
    manifest: dict
    source: Path
    temporary: tempfile.TemporaryDirectory | None = None

    @property
    def task(self) -> dict:
        return self.manifest["task"]

    def model(self, name: str) -> dict:
        models = self.manifest["models"]
        if name not in models:
            raise BundleError(
                f"model {name!r} is not in bundle {self.source}; available: {sorted(models)}"
            )
        return models[name]

    def detectors(self) -> list[str]:
        return [name for name, model in self.manifest["models"].items() if model.get("role") == "detector"]

    def file_entry(self, name: str, format_key: str) -> dict:
        formats = self.model(name)["formats"]
        if format_key not in formats:
            raise BundleError(
                f"model {name!r} has no {format_key!r} file in bundle {self.source}; "
                f"available: {sorted(formats)}"
            )
        return formats[format_key]

    def path_of(self, entry: dict) -> Path:
        return self.root / check_member_name(entry["file"])


def check_schema(manifest: dict, source: Path) -> None:
    schema = manifest.get("schema")
    if not isinstance(schema, str) or "/" not in schema:
        raise BundleError(f"{source}: manifest has no valid 'schema' field (got {schema!r})")
    name, _, version = schema.partition("/")
    major = version.split(".")[0]
    if name != SCHEMA_NAME or major != str(SCHEMA_MAJOR):
        raise BundleError(
            f"{source}: bundle schema {schema!r} is not supported; this anomalyforge "
            f"{__version__} reads {SCHEMA!r}. Install the anomalyforge version that wrote it"
        )
    for key in ("task", "preprocessing", "models"):
        if key not in manifest:
            raise BundleError(f"{source}: manifest is missing the required field {key!r}")


def verify_files(root: Path, manifest: dict, source: Path) -> None:
    """Check that every model file listed in the manifest exists and matches its sha256."""
    for name, model in manifest["models"].items():
        for format_key, entry in model.get("formats", {}).items():
            path = root / check_member_name(entry["file"])
            if not path.is_file():
                raise BundleError(
                    f"{source}: file {entry['file']!r} of model {name!r} ({format_key}) is missing; "
                    "copy the whole bundle again"
                )
            actual = sha256_file(path)
            if actual != entry["sha256"]:
                raise BundleError(
                    f"{source}: checksum mismatch for {entry['file']!r} of model {name!r}: manifest "
                    f"says sha256 {entry['sha256']}, file has {actual}. The file is corrupt or was "
                    "modified; copy the bundle again or re-export it"
                )


def load_bundle(path) -> Bundle:
    """Load a bundle directory or zip file and verify its schema and every checksum."""
    source = Path(path)
    temporary = None
    if source.is_file():
        temporary = tempfile.TemporaryDirectory(prefix="anomalyforge-bundle-")
        root = Path(temporary.name)
        extract_zip(source, root)
    elif source.is_dir():
        root = source
    else:
        raise BundleError(
            f"bundle {source} not found (expected a directory with {MANIFEST_NAME} or a .zip "
            "file); pass the bundle directory or bundle.zip written by 'anomalyforge demo'"
        )

    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleError(f"{source}: {MANIFEST_NAME} not found; this is not an anomalyforge bundle")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"{source}: {MANIFEST_NAME} is not valid JSON ({error})") from error
    if not isinstance(manifest, dict):
        raise BundleError(f"{source}: {MANIFEST_NAME} must contain a JSON object")

    check_schema(manifest, source)
    verify_files(root, manifest, source)
    logger.info("loaded bundle %s (%d models, checksums verified)", source, len(manifest["models"]))
    return Bundle(root=root, manifest=manifest, source=source, temporary=temporary)


def set_threshold(bundle_dir: Path, detector: str, threshold: dict) -> dict:
    """Replace a detector's threshold in a bundle directory, appending the old one to its history."""
    bundle = load_bundle(bundle_dir)
    if bundle.temporary is not None:
        raise BundleError(
            f"{bundle_dir} is a zip file; thresholds can only be written into a bundle directory"
        )
    model = bundle.model(detector)
    if model.get("role") != "detector":
        raise BundleError(f"model {detector!r} is a {model.get('role')}, not a detector")
    previous = model.get("threshold")
    if previous is not None:
        model.setdefault("threshold_history", []).append(previous)
    model["threshold"] = threshold
    write_manifest(bundle.root, bundle.manifest)
    return bundle.manifest
