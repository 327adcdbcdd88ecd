"""Exceptions that callers (CLI, worker) turn into user-facing messages."""

from __future__ import annotations


class SSQLError(Exception):
    """Base class of every error ssql_core raises on purpose."""


class ConfigError(SSQLError, ValueError):
    """A configuration value is invalid. ``field`` names it so a caller can point at it."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class Cancelled(SSQLError):
    """The run was asked to stop (``Hooks.should_stop`` returned True)."""


class NonFiniteLoss(SSQLError):
    """The loss became NaN or infinite: the run cannot continue meaningfully."""
