"""Objects in an S3 bucket (AWS S3, or any server speaking its API), through boto3.

Credentials and region come the usual AWS ways (environment variables, `~/.aws`, instance
roles); `endpoint_url` points at anything that is not AWS, such as MinIO. Conditional writes
are S3's own `If-None-Match: *` and `If-Match: <etag>` on PutObject, and `If-Match` on
DeleteObject (AWS since 2024; MinIO, Ceph and moto support them); a store that ignores them
would let two replicas' writes race, so `S3Objects` checks once at start that a conditional
write of an existing key is refused.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import BinaryIO

from plait.server.storage.objects import (
    ObjectInfo,
    ObjectStore,
    ObjectStoreUnavailable,
    PreconditionFailed,
    StoredObject,
    check_key,
)

_MISSING = {"NoSuchKey", "404", "NotFound"}
_PRECONDITION = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_PROBE = ".plait-probe/"


class S3Objects(ObjectStore):
    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}" + (f" at {endpoint_url}" if endpoint_url else "")
        config = Config(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=32)
        self._s3 = boto3.client("s3", endpoint_url=endpoint_url, config=config)
        self._check_conditional_writes()

    def read(self, key: str) -> StoredObject | None:
        try:
            answer = self._s3.get_object(Bucket=self.bucket, Key=self._key(key))
        except self._s3.exceptions.NoSuchKey:
            return None
        except Exception as exc:
            if _code(exc) in _MISSING:
                return None
            raise
        return StoredObject(answer["Body"].read(), answer["ETag"])

    def open(self, key: str) -> BinaryIO | None:
        try:
            return self._s3.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except Exception as exc:
            if _code(exc) in _MISSING:
                return None
            raise

    def download(self, key: str, path: Path) -> bool:
        try:
            self._s3.download_file(self.bucket, self._key(key), str(path))
        except Exception as exc:
            if _code(exc) in _MISSING:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                return False
            raise
        return True

    def write(self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None) -> str:
        conditions = {}
        if if_absent:
            conditions["IfNoneMatch"] = "*"
        if if_match is not None:
            conditions["IfMatch"] = if_match
        try:
            answer = self._s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **conditions)
        except Exception as exc:
            if conditions and _code(exc) in _PRECONDITION | _MISSING:
                raise PreconditionFailed(key) from None
            raise
        return answer["ETag"]

    def upload(self, key: str, path: Path) -> None:
        self._s3.upload_file(str(path), self.bucket, self._key(key))

    def copy(self, source: str, target: str) -> bool:
        try:
            self._s3.copy_object(
                Bucket=self.bucket, Key=self._key(target), CopySource={"Bucket": self.bucket, "Key": self._key(source)}
            )
        except Exception as exc:
            if _code(exc) in _MISSING:
                return False
            raise
        return True

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        conditions = {"IfMatch": if_match} if if_match is not None else {}
        try:
            self._s3.delete_object(Bucket=self.bucket, Key=self._key(key), **conditions)
        except Exception as exc:
            if conditions and _code(exc) in _PRECONDITION | _MISSING:
                raise PreconditionFailed(key) from None
            if _code(exc) not in _MISSING:
                raise

    def list(self, prefix: str) -> list[ObjectInfo]:
        found = []
        pages = self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + prefix)
        for page in pages:
            for item in page.get("Contents", ()):
                key = item["Key"][len(self.prefix) :]
                found.append(ObjectInfo(key, item["ETag"], item["LastModified"].timestamp()))
        return sorted(found, key=lambda info: info.key)

    def delete_prefix(self, prefix: str) -> None:
        keys = [{"Key": self.prefix + info.key} for info in self.list(prefix)]
        for start in range(0, len(keys), 1000):  # S3's limit per request
            self._s3.delete_objects(Bucket=self.bucket, Delete={"Objects": keys[start : start + 1000], "Quiet": True})

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _check_conditional_writes(self) -> None:
        """Fail at start, with one line, when the bucket cannot be used or ignores conditions."""
        probe = f"{_PROBE}{uuid.uuid4().hex}"
        try:
            self.write(probe, b"1", if_absent=True)
            try:
                self.write(probe, b"2", if_absent=True)
            except PreconditionFailed:
                pass
            else:
                raise ObjectStoreUnavailable(
                    f"{self.url} ignores conditional writes (If-None-Match); replicas could overwrite each "
                    "other's changes, so Plait will not use it"
                )
            self.delete(probe)
        except ObjectStoreUnavailable:
            raise
        except Exception as exc:
            raise ObjectStoreUnavailable(f"cannot use {self.url}: {_describe(exc)}") from None


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _describe(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if response:
        error = response.get("Error", {})
        return f"{error.get('Code', '')}: {error.get('Message', '')}".strip(": ")
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
