"""Exceptions shared by every module (kept import-free so any module can raise them)."""


class ConfigError(ValueError):
    """A user-fixable problem in the configuration; the message names the key and the fix."""
