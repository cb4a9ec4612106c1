"""Serial side of the firmware: a simulated serial device for tests and demos (standard library only)."""

from anomalyforge.firmware_bridge.simulator import PtySerialDevice, format_line

__all__ = ["PtySerialDevice", "format_line"]
