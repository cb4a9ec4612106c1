"""Serial side of the firmware: the binary frame protocol and a simulated serial device.

The simulator needs POSIX pseudo-terminals, so it is imported on first use: the protocol
and the receiver also work where ``termios`` does not exist (Windows).
"""

from importlib import import_module

SIMULATOR_NAMES = ("PtySerialDevice", "format_line")

__all__ = ["PtySerialDevice", "format_line"]


def __getattr__(name: str):
    if name in SIMULATOR_NAMES:
        return getattr(import_module("anomalyforge.firmware_bridge.simulator"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
