"""The demo's API behind the gateway: every POST it executes creates an order and says how
many requests it has executed so far, so that a replayed answer is easy to tell from a second
execution (the count does not move). GET /executions returns the count alone.

Python's standard library only: python3 upstream.py [port] (9000 by default).
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_lock = threading.Lock()
_executions = 0


class Handler(BaseHTTPRequestHandler):
    # Keep-alive, as an API behind a gateway would.
    protocol_version = "HTTP/1.1"

    def _send(self, status, body, headers=()):
        data = json.dumps(body).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        global _executions
        length = int(self.headers.get("Content-Length") or 0)
        request = self.rfile.read(length)
        with _lock:
            _executions += 1
            n = _executions
        try:
            item = json.loads(request or b"{}")
        except ValueError:
            item = request.decode("utf-8", "replace")
        self._send(
            201,
            {"order": n, "item": item, "executions": n},
            [("Location", f"/orders/{n}")],
        )

    def do_GET(self):
        if self.path == "/executions":
            with _lock:
                n = _executions
            self._send(200, {"executions": n})
        else:
            self._send(404, {"error": "not found"})

    def log_message(self, fmt, *args):
        sys.stderr.write("upstream: " + (fmt % args) + "\n")


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 9000
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    print(f"demo upstream listening on :{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
