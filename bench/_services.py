"""What the storage benches stand on: a real S3 endpoint (moto's server on 127.0.0.1) with one
bucket, and a fresh Postgres database migrated to head; both gone again after ``stop()``."""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CREDS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}


def _pg_user() -> str:
    import psycopg

    for user in ("postgres", "root"):
        try:
            with psycopg.connect(host="127.0.0.1", dbname="test", user=user, connect_timeout=3):
                return user
        except psycopg.OperationalError:
            continue
    raise SystemExit("Postgres is not reachable on 127.0.0.1:5432 (db 'test', user postgres or root)")


@dataclass
class BenchServices:
    """A running moto server (``endpoint``, bucket ``bucket``) and a database (``url``, ``db``)."""

    endpoint: str
    url: str
    db: str
    user: str
    bucket: str
    creds: dict[str, str] = field(default_factory=lambda: dict(CREDS))
    _moto: Any = None

    @classmethod
    def start(cls, bucket: str = "bench") -> BenchServices:
        import boto3
        import psycopg
        from moto.server import ThreadedMotoServer

        from ssql_cli.stack import free_port

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
        os.environ.update(CREDS)
        port = free_port()
        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        moto.start()
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        user, db = _pg_user(), f"ssql_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(host="127.0.0.1", dbname="test", user=user, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{db}"')
        return cls(endpoint, f"postgresql://{user}@127.0.0.1:5432/{db}", db, user, bucket, _moto=moto)

    def migrate_and_key(self, home: Path) -> str:
        """Migrate the database to head and return a new API key for it."""
        from persistence.db import make_engine, make_sessionmaker
        from persistence.keys import create_key
        from persistence.migrate import upgrade_head
        from persistence.settings import Settings

        settings = Settings(home=home, database_url=self.url)
        upgrade_head(settings)
        engine = make_engine(settings)
        try:
            with make_sessionmaker(engine)() as s:
                return create_key(s, "bench")
        finally:
            engine.dispose()

    def stop(self) -> None:
        import psycopg

        self._moto.stop()
        with psycopg.connect(host="127.0.0.1", dbname="test", user=self.user, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')
