"""``s3://`` as runs use it: bounded waits, errors that name the endpoint and the URL, and no
bucket ever created implicitly.

``StoreFileSystem`` is s3fs's filesystem with three changes, registered for ``s3://`` whenever
``conure_dist`` is imported (``conure_dist/__init__.py``, which does not import this module
until an ``s3://`` URL is opened):

* **Bounded waits.** Every request gets a 5 s connect and a 10 s read timeout and at most
  ``MAX_ATTEMPTS`` attempts, retried by botocore's ``standard`` mode (exponential backoff with
  jitter, also on throttling); s3fs's own retry loop, which multiplied botocore's, is off. An
  endpoint that accepts connections and never answers fails a request after about
  ``MAX_ATTEMPTS`` x 10 s plus the backoff (about 35 s); one that refuses them, in seconds.
  ``AWS_MAX_ATTEMPTS`` and ``AWS_RETRY_MODE`` set botocore's retries instead, as usual.
* **One line on failure.** A request that finds no endpoint, times out or has no credentials
  raises ``ObjectStoreError``: the ``s3://`` URL, the endpoint, the attempts and time spent.
* **No implicit buckets.** ``makedirs``/``mkdir`` of a path inside a bucket (what writers do
  before they write; object stores have no folders) checks that the bucket exists and raises
  ``MissingBucketError`` naming it where it does not: a mistyped bucket in ``--out`` is refused,
  and a store that lost its buckets mid-run (restarted empty) is not refilled by the checkpoint
  writer. ``mkdir("bucket")`` alone still creates one: that is asked for by name.
"""

from __future__ import annotations

import os
import time
from typing import Any

import fsspec
from botocore.exceptions import ConnectionError as EndpointUnreachable
from botocore.exceptions import HTTPClientError, NoCredentialsError, PartialCredentialsError
from s3fs import S3FileSystem

from conure_dist.errors import UserError

MAX_ATTEMPTS = 3
"""Attempts per object-store request (the first and two retries)."""
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 10
_UNREACHABLE = (EndpointUnreachable, HTTPClientError)  # no endpoint, connect or read timeout, closed
_NO_CREDENTIALS = (NoCredentialsError, PartialCredentialsError)


class ObjectStoreError(UserError):
    """The object store could not be reached, or refused who we are; the message names the
    ``s3://`` URL and the endpoint."""


class MissingBucketError(ObjectStoreError, FileNotFoundError):
    """A bucket that a write needs does not exist (buckets are never created implicitly)."""


def _url(params: dict[str, Any]) -> str:
    bucket, key = params.get("Bucket", ""), params.get("Key") or params.get("Prefix") or ""
    return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"


class StoreFileSystem(S3FileSystem):
    """s3fs with bounded waits, one-line errors and no implicit buckets (module docstring)."""

    retries = 1  # botocore retries each request; s3fs's loop around it would multiply them
    connect_timeout = CONNECT_TIMEOUT_S
    read_timeout = READ_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        config = dict(kwargs.pop("config_kwargs", None) or {})
        if "retries" not in config and "AWS_MAX_ATTEMPTS" not in os.environ:
            config["retries"] = {"total_max_attempts": MAX_ATTEMPTS, "mode": "standard"}
        super().__init__(*args, config_kwargs=config, **kwargs)

    def _attempts(self) -> str:
        retries = self.config_kwargs.get("retries") or {}
        attempts = retries.get("total_max_attempts") or os.environ.get("AWS_MAX_ATTEMPTS")
        return f"{attempts} attempts" if attempts else "botocore's attempts"

    async def set_session(self, refresh: bool = False, kwargs: dict | None = None) -> Any:
        client = await super().set_session(refresh, kwargs or {})
        if not getattr(client, "_conure_named", False):
            self._name_failures(client)
        return client

    def _name_failures(self, client: Any) -> None:
        """Wrap the client's one entry point for requests so that a failure names its URL."""
        call, endpoint = client._make_api_call, client.meta.endpoint_url

        async def named(operation: str, params: dict[str, Any]) -> Any:
            start = time.monotonic()
            try:
                return await call(operation, params)
            except _NO_CREDENTIALS as exc:
                raise ObjectStoreError(
                    f"{_url(params)}: no credentials for the object store at {endpoint} ({exc}); set "
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
                ) from exc
            except _UNREACHABLE as exc:
                raise ObjectStoreError(
                    f"{_url(params)}: the object store at {endpoint} did not answer {operation} "
                    f"({type(exc).__name__} after {self._attempts()} in {time.monotonic() - start:.0f} s; "
                    f"timeouts {self.connect_timeout} s to connect, {self.read_timeout} s to read). "
                    "Check AWS_ENDPOINT_URL and the network"
                ) from exc

        client._make_api_call = named
        client._conure_named = True

    async def _mkdir(self, path: str, acl: Any = False, create_parents: bool = True, **kwargs: Any) -> None:
        bucket, key, _ = self.split_path(self._strip_protocol(path).rstrip("/"))
        if not key:  # a bucket asked for by name
            await super()._mkdir(path, acl=acl, create_parents=create_parents, **kwargs)
            return
        await self._require_bucket(bucket)

    async def _require_bucket(self, bucket: str) -> None:
        try:
            await self._call_s3("head_bucket", Bucket=bucket)
        except FileNotFoundError:
            endpoint = (await self.set_session()).meta.endpoint_url
            raise MissingBucketError(
                f"s3://{bucket}: no such bucket at {endpoint}; buckets are never created implicitly: "
                "check the name, or create it first"
            ) from None

    require_bucket = fsspec.asyn.sync_wrapper(_require_bucket)


def check_output(url: str, option: str = "--out") -> None:
    """Refuse an output URL whose bucket does not exist or whose store does not answer (naming
    ``option`` and the URL) before a run starts: its first write would otherwise come only at the
    end of the first phase. Local paths pass."""
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, StoreFileSystem):
        try:
            fs.require_bucket(fs.split_path(path)[0])
        except ObjectStoreError as exc:
            raise type(exc)(f"{option} {url}: {exc}") from exc
