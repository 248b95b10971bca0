"""A cache's bucket, made ready as `regcache up` starts it: created when missing (registry:2
never creates it), and checked writable, so that wrong credentials, a missing permission or an
unreachable store is one line at start, naming the setting, rather than failures at each pull."""

from __future__ import annotations

import asyncio
import secrets

from ..config import ObjectStore, S3Access
from .client import StoreRefused, StoreUnreachable, client_context, within

# What a refusal's code means for the operator.
_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "InvalidClientTokenId"}


def prepare_bucket(var: str, access: S3Access, store: ObjectStore, timeout: float) -> str | None:
    """Create the bucket if it is missing and write (then delete) one object under the prefix;
    None when that worked, else why not, in one line naming `var`. Blocking: runs its own loop."""
    try:
        asyncio.run(_prepare(access, store, timeout))
    except StoreUnreachable as e:
        return f"{var}: cannot reach the object store at {access.describe()}: {e}"
    except _Refused as e:
        return f"{var}: {store} at {access.describe()}: {e}"
    return None


class _Refused(Exception):
    pass


async def _prepare(access: S3Access, store: ObjectStore, timeout: float) -> None:
    async with client_context(access, timeout) as s3:
        check = store.key(f"regcache-write-check-{secrets.token_hex(4)}")
        put = lambda: s3.put_object(Bucket=store.bucket, Key=check, Body=b"")  # noqa: E731
        try:
            try:
                await within(timeout, put)
            except StoreRefused as e:
                if e.code != "NoSuchBucket":
                    raise
                await _create(s3, access, store, timeout)
                await within(timeout, put)
            await within(timeout, lambda: s3.delete_object(Bucket=store.bucket, Key=check))
        except StoreRefused as e:
            raise _Refused(_refusal(e, access)) from None


async def _create(s3, access: S3Access, store: ObjectStore, timeout: float) -> None:
    # AWS S3 wants the region named, except its first one.
    where = {} if access.region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": access.region}}
    try:
        await within(timeout, lambda: s3.create_bucket(Bucket=store.bucket, **where))
    except StoreRefused as e:
        if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise _Refused(f"the bucket is missing and cannot be created: {_refusal(e)}") from None


def _refusal(error: StoreRefused, access: S3Access | None = None) -> str:
    code = error.code
    said = f"{error.status} {code}"
    if code in _CREDENTIALS:
        token = " and AWS_SESSION_TOKEN (temporary credentials expire)" if access and access.session_token else ""
        return f"the store refused the credentials ({said}): check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY{token}"
    if code == "AccessDenied" or error.status == 403:
        return (f"access denied ({said}): the credentials need s3:PutObject, s3:GetObject, s3:DeleteObject and "
                "s3:ListBucket there (docs/storage-s3.md)")
    return f"refused ({said}: {error.message})"
