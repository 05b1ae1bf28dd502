"""Typed errors. Every OnnxpipeError is a mistake or condition a user can act on:
the CLI prints its message on one line and exits 1, without a traceback."""
from __future__ import annotations


class OnnxpipeError(Exception):
    """Base of all user-facing errors."""


class ConfigError(OnnxpipeError):
    """A bad option, --set key, config file or model name."""


class DataError(OnnxpipeError):
    """Input data that cannot be used: bad IDX magic, mismatched counts, wrong shapes, labels out of range."""


class RunFolderError(OnnxpipeError):
    """A missing run folder, or a folder that is not an onnxpipe run."""


class ArtifactError(OnnxpipeError):
    """An artifact that is missing, corrupt, or changed since it was recorded (sha256 mismatch)."""


class DeviceError(OnnxpipeError):
    """An execution provider that was asked for and is not available."""


class ExportError(OnnxpipeError):
    """The exporter failed or produced a graph that breaks the spec (e.g. a dynamic axis made static)."""


class ParityError(OnnxpipeError):
    """Outputs of two variants differ beyond tolerance; carries the full report."""

    def __init__(self, report):
        self.report = report
        super().__init__(report.summary())
