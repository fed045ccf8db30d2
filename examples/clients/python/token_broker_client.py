"""A small client for token-broker on grpcio.

- ``BrokerClient.get_token``: ``GetCollectionToken`` with a deadline.
- ``BrokerClient.invalidate``: ``InvalidateToken(collection, version)``, the
  compare-and-invalidate call to make when the upstream answers 401: pass the
  version of the token that was refused; only if it is still current does the
  broker refresh, so many callers reporting the same token cause one refresh.
- ``TokenWatcher``: keeps the current token through ``WatchToken`` in a
  background thread, reconnecting with backoff after stream errors and resuming
  with ``after_version`` = the last version seen, so no rotation is missed.

Token values are secrets: nothing here logs or prints them, and ``Token``'s repr
leaves the value out.
"""

import random
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone

import grpc

from generate import ensure_stubs

ensure_stubs()

from token_broker.v1 import token_broker_pb2 as pb  # noqa: E402
from token_broker.v1 import token_broker_pb2_grpc as pb_grpc  # noqa: E402

# Reconnect quickly when the broker restarts (grpcio's default backoff reaches
# two minutes), and notice a dead peer on a quiet watch stream.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 5000),
    ("grpc.keepalive_time_ms", 30000),
    ("grpc.keepalive_timeout_ms", 10000),
]

# Codes after which retrying the same watch cannot help.
PERMANENT = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
}


@dataclass(frozen=True)
class Token:
    collection: str
    value: str = field(repr=False)  # a secret: never in repr, logs or output
    version: int
    expires_at: datetime
    refresh_at: datetime
    stale: bool

    @classmethod
    def from_pb(cls, t):
        return cls(
            collection=t.collection,
            value=t.value,
            version=t.version,
            expires_at=t.expires_at.ToDatetime(tzinfo=timezone.utc),
            refresh_at=t.refresh_at.ToDatetime(tzinfo=timezone.utc),
            stale=t.stale,
        )


class BrokerClient:
    """One channel to a broker. target: ``127.0.0.1:50051`` or ``unix:/path.sock``."""

    def __init__(self, target, options=CHANNEL_OPTIONS):
        self.target = target
        options = list(options)
        if target.startswith("unix:") and not any(k == "grpc.default_authority" for k, _ in options):
            # grpcio sends the socket's path as :authority, which the broker's
            # HTTP/2 server refuses (RST_STREAM, PROTOCOL_ERROR).
            options.append(("grpc.default_authority", "localhost"))
        self.channel = grpc.insecure_channel(target, options=options)
        self.stub = pb_grpc.TokenBrokerStub(self.channel)

    def close(self):
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def get_token(self, collection, timeout=5.0):
        """The collection's current token; raises grpc.RpcError (e.g.
        DEADLINE_EXCEEDED after ``timeout`` seconds)."""
        resp = self.stub.GetCollectionToken(
            pb.GetCollectionTokenRequest(collection=collection), timeout=timeout
        )
        return Token.from_pb(resp.token)

    def invalidate(self, collection, version, reason="", timeout=10.0):
        """Reports that the upstream refused ``version``. Returns (token,
        refreshed): the current token after the call, and whether this report
        forced its refresh (False when the version was no longer current)."""
        resp = self.stub.InvalidateToken(
            pb.InvalidateTokenRequest(collection=collection, version=version, reason=reason),
            timeout=timeout,
        )
        return Token.from_pb(resp.token), resp.refreshed

    def watch(self, collection, **kwargs):
        """A started TokenWatcher on this channel."""
        w = TokenWatcher(self, collection, **kwargs)
        w.start()
        return w


class TokenWatcher:
    """Keeps the collection's current token up to date from ``WatchToken``.

    A daemon thread holds the stream open. After an error, or the server ending
    the stream (e.g. ``UNAVAILABLE: server is shutting down``), it waits a
    jittered, doubling delay (``initial_backoff`` up to ``max_backoff``; reset
    once a token arrives) and reconnects with ``after_version`` set to the last
    version it saw, so it receives every rotation since. A broker with the
    in-memory store restarts its versions at 1; it answers such a watcher with
    its current token, which is then taken as current even though its version
    is lower.

    ``current()`` is safe from any thread. ``on_token(token)`` and
    ``on_error(code, after_version, retry_in)`` run on the watcher thread.
    ``stop()`` cancels the stream and joins the thread.
    """

    def __init__(
        self,
        client,
        collection,
        on_token=None,
        on_error=None,
        initial_backoff=0.25,
        max_backoff=10.0,
    ):
        self.client = client
        self.collection = collection
        self.on_token = on_token
        self.on_error = on_error
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.reconnects = 0
        self.error = None  # the permanent error that ended the watch, if any
        self._token = None
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._call = None
        self._thread = threading.Thread(
            target=self._run, name=f"token-watcher-{collection}", daemon=True
        )

    def start(self):
        self._thread.start()
        return self

    def current(self):
        """The latest token seen, or None before the first one."""
        with self._cond:
            return self._token

    def wait_for(self, pred=lambda t: t is not None, timeout=None):
        """Waits until pred(current token) holds; returns the token or None."""
        with self._cond:
            if self._cond.wait_for(lambda: pred(self._token), timeout):
                return self._token
            return None

    def offer(self, token):
        """Takes a token obtained elsewhere (e.g. from invalidate) as current
        if it is newer than the one held."""
        with self._cond:
            if self._token is None or token.version > self._token.version:
                self._token = token
                self._cond.notify_all()

    def stop(self, timeout=5.0):
        self._stopping.set()
        with self._cond:
            call = self._call
        if call is not None:
            call.cancel()
        self._thread.join(timeout)

    def _run(self):
        delay = self.initial_backoff
        after = 0
        while not self._stopping.is_set():
            code = None
            try:
                call = self.client.stub.WatchToken(
                    pb.WatchTokenRequest(collection=self.collection, after_version=after)
                )
                with self._cond:
                    self._call = call
                if self._stopping.is_set():
                    call.cancel()
                for resp in call:
                    token = Token.from_pb(resp.token)
                    after = token.version
                    delay = self.initial_backoff
                    with self._cond:
                        self._token = token
                        self._cond.notify_all()
                    if self.on_token:
                        self.on_token(token)
                code = grpc.StatusCode.OK  # the server ended the stream
            except grpc.RpcError as e:
                code = e.code()
            with self._cond:
                self._call = None
            if self._stopping.is_set():
                return
            if code in PERMANENT:
                self.error = code
                if self.on_error:
                    self.on_error(code, after, None)
                return
            retry_in = random.uniform(delay / 2, delay)
            if self.on_error:
                self.on_error(code, after, retry_in)
            if self._stopping.wait(retry_in):
                return
            delay = min(delay * 2, self.max_backoff)
            self.reconnects += 1
