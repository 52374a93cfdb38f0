"""User-facing errors: printed as one clear line (no traceback) by the launchers."""


class MegaslimError(Exception):
    """Bad input detected before compute: message says what is wrong and how to fix it."""
