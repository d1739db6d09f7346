"""The error every configuration check raises, and the check itself."""

from __future__ import annotations

from conure_dist.errors import UserError


class ConfigError(UserError):
    """A configuration value or key is wrong; the message names the key and the file."""


def check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"key '{key}': {msg}")
