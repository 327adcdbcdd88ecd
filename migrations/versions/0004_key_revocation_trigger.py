"""api_keys: a trigger notifies the API processes of every revocation, by any path

An operator's ``UPDATE api_keys SET revoked_at = now()``, a ``DELETE`` (also through ``DELETE FROM
users``, which cascades), a ``TRUNCATE``: each sends ``NOTIFY ssql_key_revoked`` in its own
transaction, so every API process forgets the key when it commits (docs/decisions/011, 014).
Payload: the key's hash, or ``*`` (a TRUNCATE: forget every cached key). Postgres only: SQLite
(embedded mode) has no notifications; its cached keys live one second.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 03:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: persistence.keys.REVOKED_CHANNEL (a migration keeps its own copy: the code may change later)
CHANNEL = "ssql_key_revoked"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"""
        CREATE OR REPLACE FUNCTION ssql_notify_key_change() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'TRUNCATE' THEN
                PERFORM pg_notify('{CHANNEL}', '*');
            ELSIF TG_OP = 'DELETE' THEN
                PERFORM pg_notify('{CHANNEL}', OLD.key_hash);
            ELSIF NEW.revoked_at IS DISTINCT FROM OLD.revoked_at OR NEW.key_hash IS DISTINCT FROM OLD.key_hash
                  OR NEW.user_id IS DISTINCT FROM OLD.user_id THEN
                PERFORM pg_notify('{CHANNEL}', OLD.key_hash);
            END IF;
            RETURN NULL;
        END $$
    """)
    op.execute("CREATE TRIGGER api_keys_notify_change AFTER UPDATE OR DELETE ON api_keys "
               "FOR EACH ROW EXECUTE FUNCTION ssql_notify_key_change()")
    op.execute("CREATE TRIGGER api_keys_notify_truncate AFTER TRUNCATE ON api_keys "
               "FOR EACH STATEMENT EXECUTE FUNCTION ssql_notify_key_change()")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS api_keys_notify_truncate ON api_keys")
    op.execute("DROP TRIGGER IF EXISTS api_keys_notify_change ON api_keys")
    op.execute("DROP FUNCTION IF EXISTS ssql_notify_key_change()")
