"""Where the service keeps what in the store: the keys API and workers agree on (decision 018)."""

from __future__ import annotations


def artifact_key(sha256: str) -> str:
    """A finished job's registered file, by content (identical files, one object)."""
    return f"artifacts/{sha256}"


def log_key(job_id: str, attempt: int) -> str:
    """An attempt's log (stdout and stderr of its runner), replaced whole as it grows."""
    return f"logs/{job_id}/attempt-{attempt}.log"
