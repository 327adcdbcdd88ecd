"""A real S3 endpoint for tests: moto's server over HTTP on 127.0.0.1 (no in-process mocks)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import boto3

from ssql_cli.stack import free_port

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


class MotoServer:
    """moto's server app on one port, in a thread of this process, that can be stopped (an
    outage: new connections are refused, and none is held open: each answer closes its
    connection) and started again on the same port with its buckets and objects kept (moto keeps
    them in this process, not in the server)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        class Handler(MotoRequestHandler):
            protocol_version = "HTTP/1.0"  # no keep-alive: a stopped server leaves no connection being served

        self._server = make_server("127.0.0.1", self.port, DomainDispatcherApplication(create_backend_app), threaded=True,
                                   request_handler=Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()  # the port refuses connections (and can be bound again)
            assert self._thread is not None
            self._thread.join()
            self._server = None


@contextmanager
def moto_server(bucket: str) -> Iterator[MotoServer]:
    """Start a :class:`MotoServer` with ``bucket`` made; yields it (``.url`` is the endpoint)."""
    server = MotoServer()
    server.start()
    try:
        boto3.client("s3", endpoint_url=server.url, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=bucket)
        yield server
    finally:
        server.stop()


@contextmanager
def moto_endpoint(bucket: str) -> Iterator[str]:
    """Start moto's server on a free port with ``bucket`` made; yields the endpoint URL."""
    with moto_server(bucket) as server:
        yield server.url
