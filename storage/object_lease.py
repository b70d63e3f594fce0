"""A lease on an object store: one object with an expiry, taken and renewed with conditional PUTs.

A file lock (``flock``) cannot work on an object store, so a store at ``s3://...`` has its writer
lease as the object ``STORE/.writer.lease`` (audit and cache tables: ``STORE/.TABLE.lock``) holding the
holder's pid, host, a random token and an expiry time:

- **taking it** is ``PUT`` with ``If-None-Match: *``: of two writers racing, the object store lets
  exactly one create it (the other gets ``412 Precondition Failed`` and a one-line error naming the
  holder);
- **a lease whose expiry has passed** (its holder was killed) is taken over with ``PUT`` and
  ``If-Match: <its ETag>``: of two writers taking over the same dead lease, one wins;
- **the holder renews it** from a background thread every third of :attr:`ObjectLease.ttl` (60 s),
  again with ``If-Match`` on its own last ETag; a renewal refused means another process took the
  lease (this one was stalled for longer than the ttl): :attr:`ObjectLease.lost` is set and
  :meth:`check` raises;
- **releasing it** deletes the object if it is still this holder's.

Guarantee: while the holder's process runs and reaches the object store at least once per ttl, no
other forvalue writer takes the lease. A writer killed with ``kill -9`` blocks the next one for at
most the ttl (the message says until when). Beyond the lease, the samples table is protected by
Lance itself: every commit is a conditional PUT of the next version, so two commits never overwrite
each other, and :meth:`forvalue.storage.store.Store.append` drops ids another writer committed since
its snapshot. Needs an object store with conditional writes (AWS S3 since 2024, MinIO, moto, Ceph
recent); the expiry is compared with this machine's clock (keep clocks within seconds: NTP).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from typing import Callable

from forvalue.schemas.errors import StoreError
from forvalue.storage.location import RemotePath, boto3_client, describe_failure

_TAKEN = ("PreconditionFailed", "ConditionalRequestConflict")


class ObjectLease:
    """A held lease object (see the module docstring); take one with :meth:`acquire`."""

    ttl = 60.0

    def __init__(self, target: RemotePath, client, etag: str, token: str, ttl: float):
        self.target, self._client, self._etag, self.token, self._ttl = target, client, etag, token, ttl
        self.lost = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._renew_loop, name="forvalue-lease", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(
        cls, target: RemotePath, busy: Callable[[str], str], wait: bool = False, ttl: float | None = None
    ) -> "ObjectLease":
        """Take the lease at ``target`` now; when another process holds it, raise :class:`StoreError` with
        ``busy(holder)`` (or with ``wait``, poll every second until it is free or expired)."""
        from botocore.exceptions import BotoCoreError, ClientError

        ttl = float(ttl or cls.ttl)
        client = boto3_client(target.options)
        token = secrets.token_hex(8)
        while True:
            try:
                reply = client.put_object(Bucket=target.bucket, Key=target.key, Body=_note(token, ttl), IfNoneMatch="*")
                return cls(target, client, reply["ETag"], token, ttl)
            except ClientError as exc:
                if _code(exc) not in _TAKEN:
                    raise _error(target, exc) from None
            except BotoCoreError as exc:
                raise _error(target, exc) from None
            # held: by whom, until when?
            try:
                got = client.get_object(Bucket=target.bucket, Key=target.key)
                etag, info = got["ETag"], _parse(got["Body"].read())
            except ClientError as exc:
                if _code(exc) in ("NoSuchKey", "404"):
                    continue  # released between the two requests: try again
                raise _error(target, exc) from None
            if info.get("expires", 0) < time.time():  # its holder died (or stalled past the ttl): take it over
                try:
                    reply = client.put_object(
                        Bucket=target.bucket, Key=target.key, Body=_note(token, ttl), IfMatch=etag
                    )
                    return cls(target, client, reply["ETag"], token, ttl)
                except ClientError as exc:
                    if _code(exc) not in _TAKEN + ("NoSuchKey", "404"):
                        raise _error(target, exc) from None
                    continue  # another process took it over first, or it was released: look again
            if not wait:
                raise StoreError(busy(_holder(info)))
            time.sleep(1.0)

    def _renew_loop(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        while not self._stop.wait(self._ttl / 3):
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    reply = self._client.put_object(
                        Bucket=self.target.bucket,
                        Key=self.target.key,
                        Body=_note(self.token, self._ttl),
                        IfMatch=self._etag,
                    )
                    self._etag = reply["ETag"]
                except ClientError as exc:
                    if _code(exc) in _TAKEN + ("NoSuchKey", "404"):
                        self.lost = True
                        return
                except BotoCoreError:
                    pass  # unreachable for a moment: try again at the next beat (the expiry leaves two more)

    def check(self) -> None:
        """Raise :class:`StoreError` if another process took this lease over (this one stalled past its ttl)."""
        if self.lost:
            raise StoreError(
                f"{self.target.parent}: this writer's lease was taken over by another process (this one was "
                f"stalled for more than {self._ttl:.0f} s); stop and re-run (committed batches are kept)"
            )

    def release(self) -> None:
        """Stop renewing and delete the lease object if it is still this holder's."""
        from botocore.exceptions import BotoCoreError, ClientError

        self._stop.set()
        with self._lock:
            if self.lost:
                return
            try:
                head = self._client.head_object(Bucket=self.target.bucket, Key=self.target.key)
                if head["ETag"] == self._etag:
                    self._client.delete_object(Bucket=self.target.bucket, Key=self.target.key)
            except (ClientError, BotoCoreError):
                pass  # it expires on its own
            self.lost = True

    def __enter__(self) -> "ObjectLease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _note(token: str, ttl: float) -> bytes:
    now = time.time()
    return json.dumps(
        {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "expires": now + ttl,
            "token": token,
        }
    ).encode()


def _parse(data: bytes) -> dict:
    try:
        info = json.loads(data)
        return info if isinstance(info, dict) else {}
    except (ValueError, RecursionError):
        return {}


def _holder(info: dict) -> str:
    if "pid" not in info:
        return "holder unknown"
    until = time.strftime("%H:%M:%S", time.localtime(float(info.get("expires", 0))))
    return f"pid {info['pid']} on {info.get('host', '?')} since {info.get('since', '?')}, lease renewed until {until}"


def _code(exc) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _error(target: RemotePath, exc: BaseException) -> StoreError:
    return StoreError(describe_failure(target, exc) or f"{target}: cannot take the writer lease ({exc})")
