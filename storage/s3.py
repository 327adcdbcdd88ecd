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
                 multipart_bytes: int = 8 << 20, public_endpoint_url: str | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"expected s3://bucket[/prefix], got {url!r}")
        self.bucket, self.prefix = parts.netloc, parts.path.strip("/")
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        kwargs: dict[str, Any] = {k: v for k, v in {
            "endpoint_url": endpoint_url, "region_name": region, "aws_access_key_id": access_key_id,
            "aws_secret_access_key": secret_access_key}.items() if v}  # fmt: skip
        self.client = boto3.session.Session().client(
            "s3", config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60,
                                signature_version="s3v4"), **kwargs)
        signing = dict(kwargs, endpoint_url=public_endpoint_url) if public_endpoint_url else kwargs
        self._signer = self.client if not public_endpoint_url else boto3.session.Session().client(
            "s3", config=Config(signature_version="s3v4"), **signing)
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

    def size(self, key: str) -> int:
        """The object's size in bytes (FileNotFoundError when there is none)."""
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(f"no object {key!r} in {self.url}") from e
            raise _translate(e) from e
        except BotoCoreError as e:
            raise _translate(e) from e

    def read_range(self, key: str, start: int, length: int) -> bytes:
        """``length`` bytes of the object from ``start`` (fewer at its end; FileNotFoundError when there is none)."""
        if length <= 0:
            return b""
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self._key(key), Range=f"bytes={start}-{start + length - 1}")
            return r["Body"].read()
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code")
            if code in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(f"no object {key!r} in {self.url}") from e
            if code in ("InvalidRange", "416"):
                return b""
            raise _translate(e) from e
        except BotoCoreError as e:
            raise _translate(e) from e

    def put_bytes(self, key: str, data: bytes) -> None:
        """Replace a small object whole (one PUT: readers see the old bytes or the new ones)."""
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except (BotoCoreError, ClientError) as e:
            raise _translate(e) from e

    def presigned_url(self, key: str, expires_s: int, method: str = "GET", filename: str | None = None) -> str | None:
        """A URL that reads the object without credentials for ``expires_s`` seconds (``method`` GET
        or HEAD: the signature covers it). Signed for ``public_endpoint_url`` when set (the
        address clients reach the store by, e.g. MinIO's published port), else the endpoint."""
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key)}
        if filename:
            params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
            params["ResponseContentType"] = "application/octet-stream"
        operation = {"GET": "get_object", "HEAD": "head_object"}[method]
        if operation == "head_object":  # head_object takes no response-* overrides
            params = {"Bucket": params["Bucket"], "Key": params["Key"]}
        return self._signer.generate_presigned_url(operation, Params=params, ExpiresIn=expires_s, HttpMethod=method)

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
