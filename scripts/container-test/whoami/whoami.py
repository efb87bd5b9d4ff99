#!/usr/bin/env python3
"""Echoes each request's line and headers back as text/plain, like traefik/whoami, and logs
each request line to stdout, so a test can tell which requests reached the application."""
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        lines = [f"Hostname: {socket.gethostname()}", f"{self.command} {self.path} {self.request_version}"]
        lines += [f"{name}: {value}" for name, value in self.headers.items()]
        body = ("\n".join(lines) + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = answer

    def log_message(self, fmt, *args):
        print(f"{self.command} {self.path} x-auth-user-id={self.headers.get('X-Auth-User-Id', '-')}", flush=True)


ThreadingHTTPServer(("0.0.0.0", 80), Echo).serve_forever()
