"""Gets a token from token-broker, calls a protected API with it, and on a 401
reports the token to the broker (InvalidateToken) and retries once with the
new one; exits 1 unless the API then answers 2xx. With --watch, then keeps the
current token through WatchToken in a background thread and prints each
rotation until the time is up or Ctrl-C.

--demo-api calls a small protected API that this script serves itself on
127.0.0.1 (a free port), which refuses the first token it sees (401) and
accepts any other, so that the 401 path can be tried without a real API.

Prints versions, statuses and times; never a token value. --json prints one
JSON object per line instead of text.

    python example.py --target 127.0.0.1:50051 --collection demo --demo-api --watch 60
    python example.py --target 127.0.0.1:50051 --collection overdrive-main \
        --api-url https://api.example.com/v1/me
"""

import argparse
import json
import signal
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc

from token_broker_client import BrokerClient

_print_lock = threading.Lock()
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
JSON = False


def emit(event, **fields):
    """One line of output: text, or a JSON object with --json. Never pass a
    token value here."""
    with _print_lock:
        if JSON:
            print(json.dumps({"event": event, **fields}), flush=True)
        else:
            rest = " ".join(f"{k}={v}" for k, v in fields.items())
            print(f"{event:<12} {rest}", flush=True)


def call_api(url, token, timeout):
    """GET url with the token as a bearer; returns the HTTP status."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token.value}"})
    # A loopback API (--demo-api) is called directly even when HTTP_PROXY is set.
    local = urllib.parse.urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1")
    opener = _DIRECT if local else urllib.request.build_opener()
    try:
        with opener.open(req, timeout=timeout) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


class DemoApi:
    """A protected API on 127.0.0.1 (a free port) for --demo-api: GET /protected
    answers 401 to the first bearer token it ever sees and 200 to any other, as
    an upstream does that has rotated the token the broker still holds."""

    def __init__(self):
        first = []
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                auth = self.headers.get("Authorization", "")
                bearer = auth[len("Bearer ") :] if auth.startswith("Bearer ") else ""
                with lock:
                    if not first:
                        first.append(bearer)
                    ok = bool(bearer) and bearer != first[0]
                self.send_response(200 if ok else 401)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):  # no access log: it would interleave with the output
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/protected"
        threading.Thread(target=self.server.serve_forever, name="demo-api", daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def safe_url(url):
    """host/path of url, without query string or user info (for reasons and logs)."""
    u = urllib.parse.urlsplit(url)
    return f"{u.hostname}{':' + str(u.port) if u.port else ''}{u.path}"


def call_with_retry(client, collection, url, token, timeout):
    """Calls the API; on 401 invalidates the refused version and retries once
    with the broker's replacement. Returns the final status."""
    status = call_api(url, token, timeout)
    emit("api", status=status, version=token.version)
    if status != 401:
        return status
    new, refreshed = client.invalidate(
        collection, token.version, reason=f"401 from {safe_url(url)}", timeout=timeout
    )
    emit("invalidated", rejected_version=token.version, version=new.version, refreshed=refreshed)
    status = call_api(url, new, timeout)
    emit("api", status=status, version=new.version)
    return status


def main(argv=None):
    global JSON
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="127.0.0.1:50051", help="broker address: HOST:PORT or unix:/path.sock")
    p.add_argument("--collection", default="demo")
    api = p.add_mutually_exclusive_group()
    api.add_argument("--api-url", help="a protected API to GET with Authorization: Bearer <token>")
    api.add_argument(
        "--demo-api",
        action="store_true",
        help="serve a local API on 127.0.0.1 that refuses the first token it sees, and call it",
    )
    p.add_argument("--timeout", type=float, default=5.0, help="deadline of each call, in seconds")
    p.add_argument("--watch", type=float, default=0.0, metavar="SECONDS", help="then watch rotations this long")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    args = p.parse_args(argv)
    JSON = args.json

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    demo_api = DemoApi() if args.demo_api else None
    if demo_api:
        args.api_url = demo_api.url
    try:
        return run(args, stop)
    finally:
        if demo_api:
            demo_api.close()


def run(args, stop):
    with BrokerClient(args.target) as client:
        try:
            token = client.get_token(args.collection, timeout=args.timeout)
        except grpc.RpcError as e:
            emit("error", call="GetCollectionToken", code=e.code().name, message=e.details())
            return 1
        emit("token", version=token.version, expires_at=token.expires_at.isoformat(), stale=token.stale)

        if args.api_url:
            try:
                status = call_with_retry(client, args.collection, args.api_url, token, args.timeout)
            except grpc.RpcError as e:
                emit("error", call="InvalidateToken", code=e.code().name, message=e.details())
                return 1
            except (urllib.error.URLError, OSError) as e:
                emit("error", call="api", url=safe_url(args.api_url), message=str(getattr(e, "reason", e)))
                return 1
            if not 200 <= status < 300:
                return 1

        if args.watch > 0:
            watcher = client.watch(
                args.collection,
                on_token=lambda t: emit(
                    "watch", version=t.version, expires_at=t.expires_at.isoformat(), stale=t.stale
                ),
                on_error=lambda code, after, retry_in: emit(
                    "watch_error", code=code.name, after_version=after, retry_in=retry_in
                ),
            )
            end = time.monotonic() + args.watch
            while not stop.is_set() and watcher.error is None and time.monotonic() < end:
                stop.wait(0.2)
            watcher.stop()
            last = watcher.current()
            emit("stopped", version=last.version if last else None, reconnects=watcher.reconnects)
            if watcher.error is not None:
                return 1

    return 0


if __name__ == "__main__":
    sys.exit(main())
