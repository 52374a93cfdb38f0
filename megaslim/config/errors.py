"""The config's error type: a bad key, type or value, named in one line."""
from __future__ import annotations

from megaslim.errors import MegaslimError


class ConfigError(MegaslimError, ValueError):
    """A user-facing configuration error (bad key, bad type, bad value)."""
