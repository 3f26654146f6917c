"""Exceptions that carry a message a person can act on.

Every user-facing failure raises a subclass of :class:`TorchSlimError`; the CLI turns these into a
one-line message and exit code 2. The config/data/artifact errors are also ``ValueError``s so
callers that catch ``ValueError`` keep working.
"""

from __future__ import annotations


class TorchSlimError(Exception):
    """Base class for errors caused by the user's input, files or environment."""


class ConfigError(TorchSlimError, ValueError):
    """A configuration field holds a value outside its allowed range."""


class DataError(TorchSlimError, ValueError):
    """A data spec, data file or batch does not have the expected form."""


class ModelError(TorchSlimError, ValueError):
    """A model name, factory or model structure cannot be used."""


class ArtifactError(TorchSlimError, ValueError):
    """A ``.slim`` file is missing, corrupted, untrusted or of an unsupported version."""


class MissingDependencyError(TorchSlimError, ImportError):
    """An optional dependency needed for the requested feature is not installed."""
