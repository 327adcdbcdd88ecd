"""Suite-wide collection order for the parallel run (decision 021).

pytest-xdist (``--dist loadfile --no-loadscope-reorder``) hands whole files to its processes in
collection order; started first, the longest files do not leave one process running alone at the
end (longest-first scheduling). The weights are seconds per file from one run of
``pytest --durations=0`` on the 2-core AMD EPYC machine (2026-12-06); a file not listed runs after
them in its usual order. Only the order changes: every file still runs whole in one process.
"""

from __future__ import annotations

import pytest

#: the files that took 40 s or more, longest first
LONGEST_FIRST = [
    "tests/service/test_worker_lifecycle.py",  # 158 s
    "tests/service/test_job_lifecycle.py",  # 117 s
    "tests/service/test_dashboard.py",  # 104 s
    "tests/service/test_datasets_options.py",  # 90 s
    "tests/service/test_datasets.py",  # 88 s
    "tests/service/test_exports_distill.py",  # 83 s
    "tests/service/test_cli_ux.py",  # 78 s
    "tests/service/test_fuzz_schemathesis.py",  # 69 s
    "tests/service/test_store_resume.py",  # 66 s
    "tests/core/test_distributed.py",  # 63 s
    "tests/service/test_quotas.py",  # 60 s
    "tests/service/test_demo.py",  # 59 s
    "tests/service/test_hardening.py",  # 58 s
    "tests/service/test_service_status.py",  # 58 s
    "tests/core/test_ptq.py",  # 49 s
    "tests/service/test_chaos.py",  # 48 s
    "tests/service/test_worker_failure.py",  # 42 s
    "tests/service/test_embedded.py",  # 42 s
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: a file's tests keep their order
