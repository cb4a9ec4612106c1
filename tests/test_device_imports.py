"""The device side must run on a host without torch, TensorFlow or scikit-learn."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

import anomalyforge

PACKAGE_ROOT = Path(anomalyforge.__file__).parent
DEVICE_PACKAGES = ("device", "firmware_bridge")
FORBIDDEN = {"torch", "tensorflow", "sklearn"}
# anomalyforge modules the device side may import besides its own packages.
ALLOWED_ANOMALYFORGE = {"anomalyforge", "anomalyforge.signal", "anomalyforge.thresholds",
                        "anomalyforge.bundle", "anomalyforge.errors", "anomalyforge.argtypes"}

DEVICE_SCRIPT = textwrap.dedent("""
    import importlib.abc
    import json
    import sys

    BLOCKED = {"torch", "tensorflow", "sklearn"}

    class BlockHeavyPackages(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked: the device side must not import it")
            return None

    sys.meta_path.insert(0, BlockHeavyPackages())

    import numpy as np

    import anomalyforge.device
    import anomalyforge.device.cli
    import anomalyforge.firmware_bridge
    from anomalyforge.device import DeviceDetector, stream_port
    from anomalyforge.firmware_bridge import PtySerialDevice

    bundle_dir, beats_path = sys.argv[1], sys.argv[2]
    beats = np.load(beats_path)
    detector = DeviceDetector.from_bundle(bundle_dir)
    with PtySerialDevice() as device:
        device.play_lines(beats, close_when_done=True)
        summary = stream_port(detector, device.port, on_open=device.host_opened, summary_stream=None)
    loaded = sorted(name for name in sys.modules if name.split(".")[0] in BLOCKED)
    print(json.dumps({"windows": summary.windows, "loaded": loaded}))
""")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_device_sources_import_no_heavy_packages():
    sources = [path for package in DEVICE_PACKAGES for path in (PACKAGE_ROOT / package).rglob("*.py")]
    assert sources, "no device sources found"
    for path in sources:
        for name in imported_modules(path):
            top = name.split(".")[0]
            assert top not in FORBIDDEN, f"{path.name} imports {name}"
            if top == "anomalyforge" and name.split(".")[1:2] not in (["device"], ["firmware_bridge"]):
                assert name in ALLOWED_ANOMALYFORGE, f"{path.name} imports {name}"


def test_device_streams_with_heavy_packages_blocked(tiny_bundle, tiny_bundle_data, tmp_path):
    beats_path = tmp_path / "beats.npy"
    beats = tiny_bundle_data["test_x"][:12]
    np.save(beats_path, beats)

    result = subprocess.run(
        [sys.executable, "-c", DEVICE_SCRIPT, str(tiny_bundle), str(beats_path)],
        capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["windows"] == len(beats)
    assert report["loaded"] == []
