"""Python client of the SSQL training service (``from ssql_client import Client``); see README,
"Python client"."""

from ssql_client.client import (
    TERMINAL,
    ApiError,
    Checkpoint,
    ChecksumMismatch,
    Client,
    Job,
    JobError,
    Progress,
    ResultRow,
    ServerUnreachable,
)
from ssql_client.overrides import UnknownField
from ssql_client.plot import (
    PAPER_ORDER,
    bits_order,
    pareto_front,
    plot_pareto,
    plot_results,
    plot_top1,
)

__all__ = [
    "TERMINAL", "ApiError", "Checkpoint", "ChecksumMismatch", "Client", "Job", "JobError", "Progress",
    "ResultRow", "ServerUnreachable", "UnknownField", "PAPER_ORDER", "bits_order", "plot_top1",
    "plot_pareto", "plot_results", "pareto_front",
]  # fmt: skip
