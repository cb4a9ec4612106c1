"""``anomalyforge bridge simulate`` and ``anomalyforge bridge c-sources`` subcommands.

The top-level CLI calls :func:`add_bridge_commands` on its ``bridge`` sub-parser and runs
``args.handler(args)``, which returns the exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from importlib import resources
from pathlib import Path

import numpy as np

from anomalyforge.argtypes import non_negative_int, positive_float, positive_int
from anomalyforge.errors import InvalidInputError
from anomalyforge.firmware_bridge.firmware import (
    DEFAULT_SAMPLES_PER_FRAME,
    ECG5000_NOMINAL_RATE_HZ,
    FaultPlan,
    build_transmission,
    inject_faults,
)

logger = logging.getLogger(__name__)

C_SOURCE_FILES = ("af_frame.h", "af_frame.c")
SOURCES = ("ecg5000",)


def load_ecg5000_beats(split: str) -> np.ndarray:
    """Return the embedded ECG5000 beats of ``split`` ("train" or "test"), shape (n, 140), float32.

    Reads the same package resource as ``anomalyforge.training.datasets.load_ecg5000``
    without importing the workstation package, which the device side must not depend on.
    """
    with resources.files("anomalyforge.data").joinpath("ecg5000.npz").open("rb") as handle:
        with np.load(handle) as archive:
            return np.asarray(archive[f"{split}_x"], dtype=np.float32)


def add_bridge_commands(subparsers) -> None:
    """Register the ``simulate`` and ``c-sources`` subcommands on ``subparsers``."""
    simulate = subparsers.add_parser(
        "simulate",
        help="run a simulated firmware on a pseudo-terminal",
        description="Create a pseudo-terminal that behaves like sensor firmware speaking the binary "
                    "frame protocol: a hello, then samples frames at the signal's rate (or faster "
                    "with --speedup), heartbeats every second and a hello every 5 s. Prints the "
                    "port path to open on the first line of standard output, streams at once like "
                    "real firmware (frames the host does not read are dropped), and prints a JSON "
                    "report of the injected faults when done. POSIX only.",
    )
    simulate.add_argument("--source", choices=SOURCES, default="ecg5000",
                          help="signal to send: ECG5000 beats one after another (default: %(default)s)")
    simulate.add_argument("--split", choices=("train", "test"), default="test",
                          help="ECG5000 split to send (default: %(default)s)")
    simulate.add_argument("--beats", type=positive_int, metavar="N",
                          help="send only the first N beats (default: the whole split)")
    simulate.add_argument("--port", choices=("pty",), default="pty",
                          help="where to send: a new pseudo-terminal (default: %(default)s)")
    simulate.add_argument("--sample-rate", type=positive_float, default=ECG5000_NOMINAL_RATE_HZ, metavar="HZ",
                          help="sample rate announced and played in samples per second; ECG5000 beats "
                               "have no true rate, %(default)s Hz plays one beat per second")
    simulate.add_argument("--speedup", type=positive_float, default=1.0, metavar="X",
                          help="play X times faster than the sample rate (default: %(default)s)")
    simulate.add_argument("--samples-per-frame", type=positive_int, default=DEFAULT_SAMPLES_PER_FRAME,
                          metavar="N", help="samples per samples frame (default: %(default)s)")
    simulate.add_argument("--sample-format", choices=("float32", "int16"), default="float32",
                          help="wire format of the samples; int16 carries a scale factor "
                               "(default: %(default)s)")
    faults = simulate.add_argument_group("fault injection")
    faults.add_argument("--flip-bits", type=non_negative_int, default=0, metavar="N",
                        help="invert N single bits at random stream positions (default: 0)")
    faults.add_argument("--drop-bytes", type=non_negative_int, default=0, metavar="N",
                        help="remove N single bytes at random stream positions (default: 0)")
    faults.add_argument("--drop-frames", type=non_negative_int, default=0, metavar="N",
                        help="never send N samples frames, chosen among those a later frame of the same "
                             "boot reveals, so a receiver can count every lost sample (default: 0)")
    faults.add_argument("--reset-after", type=positive_int, metavar="N",
                        help="reboot after N samples frames: cut the next frame in half, then send a "
                             "hello with sequence number 0 and restart the sample index at 0")
    faults.add_argument("--disconnect-after", type=positive_int, metavar="N",
                        help="close the port after N samples frames")
    faults.add_argument("--seed", type=int, default=0,
                        help="seed of the random fault positions (default: %(default)s)")
    simulate.set_defaults(handler=run_simulate)

    c_sources = subparsers.add_parser(
        "c-sources",
        help="write the C99 reference encoder / decoder for firmware",
        description=f"Copy the C99 reference implementation of the frame protocol "
                    f"({', '.join(C_SOURCE_FILES)}: no heap, no stdio, caller-provided buffers) "
                    "into a directory of your firmware project.",
    )
    c_sources.add_argument("--out", required=True, type=Path, metavar="DIR",
                           help="directory to write the files to (created if missing; files of the same "
                                "name are replaced)")
    c_sources.set_defaults(handler=run_c_sources)


def write_c_sources(out_dir) -> list[Path]:
    """Copy the C reference files into ``out_dir`` and return their paths."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidInputError(f"--out {out_dir} exists and is not a directory; pass a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    package = resources.files("anomalyforge.firmware_bridge").joinpath("c")
    written = []
    for name in C_SOURCE_FILES:
        target = out_dir / name
        with resources.as_file(package.joinpath(name)) as source:
            shutil.copyfile(source, target)
        written.append(target)
    return written


def run_c_sources(args: argparse.Namespace) -> int:
    for path in write_c_sources(args.out):
        print(path)
    return 0


def run_simulate(args: argparse.Namespace) -> int:
    """Run ``bridge simulate`` until the playback ends and return the exit code."""
    from anomalyforge.firmware_bridge.simulator import PtySerialDevice

    beats = load_ecg5000_beats(args.split)
    if args.beats is not None:
        beats = beats[: args.beats]
    plan = FaultPlan(flip_bits=args.flip_bits, drop_bytes=args.drop_bytes, drop_frames=args.drop_frames,
                     reset_after=args.reset_after, disconnect_after=args.disconnect_after, seed=args.seed)
    items = build_transmission(beats.reshape(-1), args.sample_rate, args.samples_per_frame, args.sample_format,
                               reset_after=plan.reset_after, disconnect_after=plan.disconnect_after,
                               restart_alignment=beats.shape[1])
    items, ledger = inject_faults(items, plan)

    with PtySerialDevice() as device:
        print(device.port, flush=True)
        logger.info("simulated firmware on %s: %d beats at %g Hz x %g, %d frames",
                    device.port, len(beats), args.sample_rate, args.speedup, len(items))
        device.play_chunks([item.data for item in items], [item.time_s / args.speedup for item in items],
                           wait_for_host=False, overflow="drop")
        try:
            device.wait_written()
        except KeyboardInterrupt:
            logger.warning("interrupted; closing %s", device.port)
            device.stop_writing.set()
    report = {"port": device.port, "chunks_written": device.lines_written,
              "chunks_skipped_host_not_reading": device.chunks_skipped, **ledger.__dict__}
    print(json.dumps(report), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the bridge commands on their own: ``python -m anomalyforge.firmware_bridge.cli``."""
    parser = argparse.ArgumentParser(prog="anomalyforge bridge",
                                     description="Firmware bridge: simulated firmware and C sources.")
    add_bridge_commands(parser.add_subparsers(dest="bridge_command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
