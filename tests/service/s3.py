"""A real S3 endpoint for tests: moto's server over HTTP on 127.0.0.1 (no in-process mocks)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import boto3

from ssql_cli.stack import free_port

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


@contextmanager
def moto_endpoint(bucket: str) -> Iterator[str]:
    """Start ``ThreadedMotoServer`` on a free port with ``bucket`` made; yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=bucket)
        yield url
    finally:
        server.stop()
