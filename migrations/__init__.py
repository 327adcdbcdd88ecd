"""Alembic migrations of the service schema (run ``alembic upgrade head``)."""
