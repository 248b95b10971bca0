"""regcache's own S3 client: aiobotocore (aio-libs' asyncio wrapper of botocore: SigV4, presigned
URLs, the AWS SDK's credential chain), with a deadline on every call, and what a failure means in
our own terms (StoreUnreachable, StoreRefused): nothing outside objectstore/ sees botocore."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from ..config import S3Access
from ..upstream.state import failure_reason


class StoreUnreachable(Exception):
    """No answer from the object store in time (or a 5xx: it cannot serve): it is down."""


class StoreRefused(Exception):
    """The object store answered with a refusal (a 4xx): a missing object, a permission."""

    def __init__(self, status: int, code: str, message: str = "") -> None:
        super().__init__(f"{status} {code}" + (f": {message}" if message else ""))
        self.status, self.code, self.message = status, code, message

    @property
    def missing(self) -> bool:
        return self.status == 404


def client_context(access: S3Access, timeout: float):
    """An async context manager giving an S3 client of the store `access` names. With an
    endpoint, buckets are addressed by path, as registry:2 2.8 always does then."""
    config = AioConfig(
        connect_timeout=timeout, read_timeout=timeout, signature_version="s3v4",
        retries={"mode": "standard", "total_max_attempts": 1},  # the caller decides; a retry would pass the deadline
        s3={"addressing_style": "path"} if access.endpoint else None)
    return get_session().create_client(
        "s3", endpoint_url=access.endpoint, region_name=access.region, config=config,
        aws_access_key_id=access.access_key or None, aws_secret_access_key=access.secret_key or None,
        aws_session_token=access.session_token or None)


async def within(timeout: float, call: Callable[[], Awaitable[Any]]) -> Any:
    """`call()` within `timeout` seconds. Raises StoreUnreachable when the store gave no answer
    it could serve with (no connection, a timeout, a 5xx); StoreRefused for a refusal (4xx)."""
    try:
        async with asyncio.timeout(timeout):
            return await call()
    except ClientError as e:
        if _status(e) >= 500:
            raise StoreUnreachable(f"{_status(e)} {_error_code(e)}") from e
        raise StoreRefused(_status(e), _error_code(e), e.response.get("Error", {}).get("Message", "")) from None
    except (TimeoutError, BotoCoreError, OSError, aiohttp.ClientError) as e:  # aiohttp's: a pooled connection closed
        raise StoreUnreachable(failure_reason(e)) from e


def _status(error: ClientError) -> int:
    return error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)


def _error_code(error: ClientError) -> str:
    return error.response.get("Error", {}).get("Code", "") or str(_status(error))
