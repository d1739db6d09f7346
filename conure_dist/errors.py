"""The error of a user's mistake: ``conure`` prints its message on one line and exits with 2.

Raise ``UserError`` (or a subclass: ``ConfigError``, ``ShardError``) where the message describes
something the user gave (a config, a path, a data file, a checkpoint that does not fit the run)
and says what to change. An internal bug is anything else; the command line lets it through with
its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in what the user gave; the message names the file, key or option."""
