#!/usr/bin/env python3
"""The protected application of the e2e tests: answers every request with 200 and, as JSON, the
request line and the headers exactly as received (original spelling, order and duplicates).

    echo_upstream.py PORT

Every request is recorded, except those under /__e2e__/, the control paths the test driver
calls directly (never through a proxy):

    GET /__e2e__/requests   the recorded requests, oldest first
"""
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CONTROL = "/__e2e__/"
LOCK = threading.Lock()
SEEN = []


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "e2e-upstream"

    def log_message(self, fmt, *args):  # keep stderr for real problems
        pass

    def _answer(self, status, doc):
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        if self.path.startswith(CONTROL):
            if self.path == CONTROL + "requests":
                with LOCK:
                    return self._answer(200, list(SEEN))
            return self._answer(404, {"detail": "unknown control path"})
        record = {
            "method": self.command,
            "path": self.path,
            "headers": [[k, v] for k, v in self.headers.items()],
        }
        with LOCK:
            SEEN.append(record)
        self._answer(200, record)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle


def main():
    port = int(sys.argv[1])
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
