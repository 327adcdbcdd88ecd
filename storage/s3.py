"""Any S3-compatible store (AWS, MinIO, moto) through boto3.

Endpoint, region and credentials: boto3's own chain (``AWS_ENDPOINT_URL``, ``AWS_REGION``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, profiles), each overridable by the settings
(``SSQL_AWS_*``). Files above ``multipart_bytes`` go up as a multipart upload (boto3's transfer
manager); S3 makes the object visible only once the upload completes, so a reader never sees half
of one. The sha256 is computed locally before the upload and kept by the caller (Postgres); it
is also put in the object's metadata for operators.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, EndpointConnectionError

from storage.base import ObjectStore, StoreUnavailable, check_key, sha256_file

_UNREACHABLE = (EndpointConnectionError, ConnectionError)


class S3Store(ObjectStore):
    def __init__(self, url: str, endpoint_url: str | None = None, region: str | None = None,
                 access_key_id: str | None = None, secret_access_key: str | None = None,
                 multipart_bytes: int = 8 << 20) -> None:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"expected s3://bucket[/prefix], got {url!r}")
        self.bucket, self.prefix = parts.netloc, parts.path.strip("/")
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        kwargs: dict[str, Any] = {k: v for k, v in {
            "endpoint_url": endpoint_url, "region_name": region, "aws_access_key_id": access_key_id,
            "aws_secret_access_key": secret_access_key}.items() if v}  # fmt: skip
        self.client = boto3.session.Session().client(
            "s3", config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60), **kwargs)
        self.transfer = TransferConfig(multipart_threshold=multipart_bytes, multipart_chunksize=max(multipart_bytes, 5 << 20))

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_file(self, key: str, path: Path, sha256: str | None = None) -> str:
        digest = sha256 or sha256_file(path)
        try:
            self.client.upload_file(str(path), self.bucket, self._key(key), Config=self.transfer,
                                    ExtraArgs={"Metadata": {"sha256": digest}})
        except S3UploadFailedError as e:
            raise StoreUnavailable(f"object store refused the upload: {e}") from e
        except (BotoCoreError, ClientError) as e:
            raise _translate(e) from e
        return digest

    def _download(self, key: str, dest: Path) -> None:
        try:
            self.client.download_file(self.bucket, self._key(key), str(dest), Config=self.transfer)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                raise FileNotFoundError(f"no object {key!r} in {self.url}") from e
            raise _translate(e) from e
        except BotoCoreError as e:
            raise _translate(e) from e

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except (BotoCoreError, ClientError) as e:
            raise _translate(e) from e

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise _translate(e) from e
        except BotoCoreError as e:
            raise _translate(e) from e
        return True

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as e:
            translated = _translate(e)
            raise translated if isinstance(translated, StoreUnavailable) else StoreUnavailable(f"bucket {self.bucket}: {e}") from e

    def etag(self, key: str) -> str:
        """The store's ETag of an object (a multipart upload's ends in ``-<parts>``)."""
        return self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ETag"].strip('"')


def _translate(e: Exception) -> Exception:
    """Connection-level failures become :class:`StoreUnavailable` (the caller answers 503 or retries)."""
    if isinstance(e, _UNREACHABLE):
        return StoreUnavailable(f"object store unreachable: {e}")
    if isinstance(e, ClientError) and e.response.get("Error", {}).get("Code") in (
            "NoSuchBucket", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "SlowDown", "ServiceUnavailable",
            "InternalError", "503", "500"):
        return StoreUnavailable(f"object store refused the request: {e}")
    if isinstance(e, BotoCoreError):
        return StoreUnavailable(f"object store error: {e}")
    return e
