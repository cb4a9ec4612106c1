"""Exception hierarchy: every error the toolkit raises on purpose derives from AnomalyForgeError."""


class AnomalyForgeError(Exception):
    """Root of the toolkit's exceptions."""


class InvalidInputError(AnomalyForgeError, ValueError):
    """Input data has the wrong shape, non-finite values or cannot be parsed."""


class BundleError(AnomalyForgeError):
    """A model bundle is missing, malformed, tampered with or of an unsupported version."""


class SerialPortError(AnomalyForgeError):
    """A serial port cannot be opened or stopped delivering data."""


class MissingDependencyError(AnomalyForgeError, ImportError):
    """An optional package that this feature needs is not installed."""


class ExportError(AnomalyForgeError):
    """A model could not be exported, validated or quantized."""
