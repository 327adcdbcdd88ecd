"""The CLI's client is :mod:`ssql_client` (kept importable here for older code)."""

from ssql_client.client import TERMINAL, ApiError, ChecksumMismatch, Client, ServerUnreachable

__all__ = ["TERMINAL", "ApiError", "ChecksumMismatch", "Client", "ServerUnreachable"]
