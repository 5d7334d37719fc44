"""EvalHub's inference server process: ``models.serving.app.InferenceServer`` on HTTP, for the
web app (and for any client given its token).

    python -m models.serving --port 8100 --model smollm2=/var/evalhub/checkpoints/smollm2

Everything but ``/healthz`` and ``/metrics`` needs the server's bearer token when one is set.
Endpoints: POST /v1/completions, /v1/chat/completions (``models.serving.protocol``), GET
/v1/models, /healthz (queue and load as JSON), /metrics (Prometheus text format).

Plain Python on ``http.server``: one thread per connection, which is what a server whose
requests spend their time waiting on the engine needs, and no web framework to install.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from models.backends import REGISTRY, BackendError
from models.serving import protocol
from models.serving.app import InferenceServer, Spec
from models.serving.protocol import RequestError


class Handler(BaseHTTPRequestHandler):
    server_version = "EvalHubInference/1"
    protocol_version = "HTTP/1.1"
    app: InferenceServer  # set on the subclass by ``make_http_server``

    def log_message(self, format, *args):  # noqa: A002 - http.server's signature
        if os.environ.get("EVALHUB_INFERENCE_ACCESS_LOG"):
            super().log_message(format, *args)

    def _send(self, status: int, body: dict | str, content_type: str = "application/json") -> None:
        data = (json.dumps(body) if isinstance(body, dict) else body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        token = self.app.token
        if not token or self.headers.get("Authorization", "") == f"Bearer {token}":
            return True
        self._send(401, protocol.error_body("a valid bearer token is required", 401))
        return False

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/healthz":
            return self._send(200, self.app.health())
        if self.path == "/metrics":
            return self._send(200, self.app.prometheus(), "text/plain; version=0.0.4")
        if not self._authorised():
            return None
        if self.path == "/v1/models":
            data = [
                {"id": name, "object": "model", "owned_by": "evalhub"} for name in self.app.named
            ]
            return self._send(200, {"object": "list", "data": data})
        return self._send(404, protocol.error_body(f"no such endpoint {self.path}", 404))

    def do_POST(self) -> None:  # noqa: N802
        routes = {"/v1/completions": False, "/v1/chat/completions": True}
        if self.path not in routes:
            return self._send(404, protocol.error_body(f"no such endpoint {self.path}", 404))
        if not self._authorised():
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"null")
            answer = self.app.complete(body, chat=routes[self.path])
        except (ValueError, RequestError) as exc:
            status = exc.status if isinstance(exc, RequestError) else 400
            param = exc.param if isinstance(exc, RequestError) else None
            message = str(exc) if isinstance(exc, RequestError) else f"malformed request: {exc}"
            return self._send(status, protocol.error_body(message, status, param))
        except BackendError as exc:
            self.app.metrics.failed += 1
            return self._send(502, protocol.error_body(f"the model failed: {exc}", 502))
        except Exception as exc:  # noqa: BLE001 - one request's failure is reported, not fatal
            self.app.metrics.failed += 1
            return self._send(
                500, protocol.error_body(f"inference failed: {type(exc).__name__}: {exc}", 500)
            )
        if isinstance(answer, dict):
            return self._send(200, answer)
        self._stream(answer)

    def _stream(self, events: Iterator[str]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            for event in events:
                self.wfile.write(event.encode())
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left; closing the generator cancels its request
        except Exception:  # noqa: BLE001 - the status line is out: end the stream
            self.app.metrics.failed += 1
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()


def make_http_server(app: InferenceServer, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"app": app})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def parse_named(values: list[str]) -> dict[str, Spec]:
    """``name=checkpoint_dir`` (built-in) or ``name=kind:location``."""
    named = {}
    for value in values:
        name, _, where = value.partition("=")
        if not name or not where:
            raise SystemExit(f"--model wants name=location, got {value!r}")
        kind, _, location = where.partition(":")
        if kind not in REGISTRY:  # a plain path: a built-in checkpoint
            kind, location = "builtin", where
        named[name] = Spec(kind, location)
    return named


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument(
        "--model", action="append", default=[], help="name=checkpoint, loaded at start"
    )
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--cache-bytes", type=int, default=8 << 30)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    serve(
        args.host,
        args.port,
        named=parse_named(args.model),
        max_batch=args.max_batch,
        cache_bytes=args.cache_bytes,
        token=os.environ.get("EVALHUB_INFERENCE_TOKEN") or None,
        threads=args.threads,
    )


def serve(
    host: str,
    port: int,
    *,
    named: dict[str, Spec],
    max_batch: int = 16,
    cache_bytes: int = 8 << 30,
    token: str | None = None,
    threads: int | None = None,
    preload: list[Spec] | None = None,
) -> None:
    """Listen at once (requests wait while models load), then load ``named`` and
    ``preload`` models in the background, and serve until interrupted."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    app = InferenceServer(cache_bytes=cache_bytes, max_batch=max_batch, token=token, named=named)
    http = make_http_server(app, host, port)

    def warm() -> None:
        for spec in [*named.values(), *(preload or [])]:
            try:
                app.load(spec)
            except Exception as exc:  # noqa: BLE001 - a bad model must not stop the server
                print(f"could not load {spec.location}: {exc}", flush=True)

    threading.Thread(target=warm, name="preload", daemon=True).start()
    print(f"EvalHub inference server on http://{host}:{port}", flush=True)
    try:
        http.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        http.server_close()
