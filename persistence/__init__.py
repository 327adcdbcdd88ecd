"""The persistence layer shared by ``api`` and ``worker``: settings, tables, job transitions, broker."""
