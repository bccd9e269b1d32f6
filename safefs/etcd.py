"""A small blocking client for etcd's v3 JSON gateway (`/v3/kv/...`, `/v3/lease/...`), over httpx.

Why this and not a gRPC client: the gateway is plain HTTP/JSON, served by every etcd since 3.3
(3.4 is in Debian), and httpx gives each request a hard timeout; nothing here needs more than
single requests and one streaming watch.

Invariants:
- Every call has a timeout (connect, read, write, pool) and raises `EtcdError` (an OSError, so the
  lease keeper treats it as a failed store call) for any failure: unreachable, slow, an HTTP
  error, or an answer it cannot read. Nothing here retries; callers decide.
- Keys and values are bytes on our side and base64 on the wire; 64-bit numbers arrive as strings.
- Endpoints are tried in order; a failure of one moves on to the next within the same call.

Threading: every method blocks. Callers in the daemon run them in worker threads behind a named
limiter ("etcd"), abandoning the thread when their own deadline passes. One Client may be used
from several threads at once (httpx.Client is thread-safe).
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import json
import logging
from collections.abc import Sequence
from typing import Any

import httpx

# httpx logs every request at INFO: far too much for a lease that renews every few seconds.
logging.getLogger("httpx").setLevel(logging.WARNING)
logging.getLogger("httpcore").setLevel(logging.WARNING)

DEFAULT_TIMEOUT = 5.0


class EtcdError(OSError):
    """etcd could not be asked, or its answer could not be read."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EHOSTUNREACH, message)

    def __str__(self) -> str:
        return str(self.strerror)


@dataclasses.dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _kv(raw: dict[str, Any]) -> KeyValue:
    return KeyValue(
        key=base64.b64decode(raw.get("key", "")),
        value=base64.b64decode(raw.get("value", "")),
        create_revision=int(raw.get("create_revision", 0)),
        mod_revision=int(raw.get("mod_revision", 0)),
        lease=int(raw.get("lease", 0)),
    )


def create_is_absent(key: bytes) -> dict[str, Any]:
    """Compare: `key` does not exist."""
    return {"key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}


def create_revision_is(key: bytes, revision: int) -> dict[str, Any]:
    """Compare: `key` exists and was created at `revision` (the lease's fencing token)."""
    return {"key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": str(revision)}


def mod_revision_is(key: bytes, revision: int) -> dict[str, Any]:
    return {"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}


def put(key: bytes, value: bytes, lease: int = 0) -> dict[str, Any]:
    request: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        request["lease"] = str(lease)
    return {"request_put": request}


def delete(key: bytes) -> dict[str, Any]:
    return {"request_delete_range": {"key": b64(key)}}


def get(key: bytes) -> dict[str, Any]:
    return {"request_range": {"key": b64(key)}}


@dataclasses.dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int  # the store's revision after the transaction
    ranges: list[KeyValue | None]  # one per request_range in the branch taken, None if absent


class Client:
    """etcd at `endpoints` (http://host:port, tried in order)."""

    def __init__(self, endpoints: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoints")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout = timeout
        self.calls = 0  # requests sent, for status and the scale bench
        self.revision = 0  # the highest store revision any answer reported
        self._http = httpx.Client(timeout=httpx.Timeout(timeout), trust_env=False)

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, body: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        errors = []
        for endpoint in self.endpoints:
            self.calls += 1
            try:
                response = self._http.post(endpoint + path, json=body, timeout=timeout or self.timeout)
            except httpx.HTTPError as e:
                errors.append(f"{endpoint}: {type(e).__name__}: {e}" if str(e) else f"{endpoint}: {type(e).__name__}")
                continue
            try:
                data = response.json()
            except ValueError:
                data = None
            if response.status_code != 200 or not isinstance(data, dict):
                detail = data.get("error") or data.get("message") if isinstance(data, dict) else response.text[:200]
                errors.append(f"{endpoint}: HTTP {response.status_code}: {detail}")
                continue
            self._note_revision(data)
            return data
        raise EtcdError(f"etcd did not answer {path}: {'; '.join(errors)}")

    def _note_revision(self, data: dict[str, Any]) -> None:
        header = data.get("header") or (data.get("result") or {}).get("header") or {}
        try:
            self.revision = max(self.revision, int(header.get("revision", 0)))
        except (TypeError, ValueError):
            pass

    # -- kv ---------------------------------------------------------------------------------

    def range(self, key: bytes) -> KeyValue | None:
        data = self._post("/v3/kv/range", {"key": b64(key)})
        kvs = data.get("kvs") or []
        return _kv(kvs[0]) if kvs else None

    def txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]],
            failure: list[dict[str, Any]] | None = None) -> TxnResult:  # fmt: skip
        data = self._post("/v3/kv/txn", {"compare": compare, "success": success, "failure": failure or []})
        ranges: list[KeyValue | None] = []
        for response in data.get("responses") or []:
            if "response_range" in response:
                kvs = response["response_range"].get("kvs") or []
                ranges.append(_kv(kvs[0]) if kvs else None)
        revision = int((data.get("header") or {}).get("revision", 0))
        return TxnResult(bool(data.get("succeeded", False)), revision, ranges)

    # -- leases -----------------------------------------------------------------------------

    def grant(self, ttl: int) -> int:
        data = self._post("/v3/lease/grant", {"TTL": str(ttl)})
        if data.get("error"):
            raise EtcdError(f"etcd refused a lease: {data['error']}")
        return int(data["ID"])

    def keepalive(self, lease: int) -> int:
        """Renew `lease`; return its TTL as etcd now counts it (0: it has expired, or is unknown)."""
        data = self._post("/v3/lease/keepalive", {"ID": str(lease)})
        return int((data.get("result") or {}).get("TTL", 0))

    def time_to_live(self, lease: int) -> int:
        """Seconds left on `lease` (-1 or 0: gone)."""
        data = self._post("/v3/lease/timetolive", {"ID": str(lease)})
        return int(data.get("TTL", -1))

    def revoke(self, lease: int) -> None:
        self._post("/v3/lease/revoke", {"ID": str(lease)})

    # -- watch ------------------------------------------------------------------------------

    def watch_once(self, key: bytes, start_revision: int, wait: float) -> KeyValue | None | bool:
        """Wait up to `wait` seconds for a change of `key` at or after `start_revision`.

        Returns the new KeyValue, None if the key was deleted, False if nothing happened in time.
        A long-poll: one streaming request, closed after the first event or the wait.
        """
        body = {"create_request": {"key": b64(key), "start_revision": str(start_revision)}}
        timeout = httpx.Timeout(self.timeout, read=wait)
        errors = []
        for endpoint in self.endpoints:
            self.calls += 1
            try:
                with self._http.stream("POST", endpoint + "/v3/watch", json=body, timeout=timeout) as response:
                    if response.status_code != 200:
                        errors.append(f"{endpoint}: HTTP {response.status_code}")
                        continue
                    for line in response.iter_lines():
                        if not line.strip():
                            continue
                        result = json.loads(line).get("result") or {}
                        self._note_revision(result)
                        events = result.get("events") or []
                        if events:
                            event = events[-1]
                            return None if event.get("type") == "DELETE" else _kv(event.get("kv") or {})
                        if result.get("canceled"):
                            raise EtcdError(f"etcd cancelled the watch: {result.get('cancel_reason')}")
                    errors.append(f"{endpoint}: the watch stream ended")
            except httpx.ReadTimeout:
                return False
            except (httpx.HTTPError, ValueError) as e:
                errors.append(f"{endpoint}: {type(e).__name__}: {e}")
        raise EtcdError(f"etcd watch failed: {'; '.join(errors)}")
