#!/usr/bin/env python3
"""Runs the services of a compose file with plain `podman run`, in dependency order.

podman-compose cannot bring docker-compose.yml up unattended with podman 4.3: healthchecks
need systemd to run by themselves, `service_healthy` is ignored before podman 4.6, and
`--requires` on a dependency that has its own dependency fails ("not found in input list").
This reads the same file and does what `docker compose up` does for the keys it uses: image,
command, environment, read_only, cap_drop, security_opt, volumes, ports, healthcheck and
depends_on with its three conditions, waiting for each condition itself.

  compose_up.py --list-images FILE            service=image, one a line
  compose_up.py --project P [--image SVC=IMG]... --ports-out JSON FILE
                                              network P, containers P-<service>, volumes
                                              P-<volume>; ports published on 127.0.0.1 at free
                                              ports, written to JSON as {service: {ctr: host}}
  compose_up.py --project P [--image SVC=IMG]... --run-args SVC FILE
                                              `podman run` arguments (one a line, image last)
                                              for a one-off container of SVC on P's network

Removing what it made is the caller's job (everything is named after the project).
"""
import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time

import yaml


def log(msg):
    print(f"# {msg}", file=sys.stderr, flush=True)


def seconds(value, default):
    if value is None:
        return default
    m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?(?:(\d+)ms)?", str(value))
    if not m or not any(m.groups()):
        raise ValueError(f"unreadable duration {value!r}")
    mins, secs, ms = m.groups()
    return int(mins or 0) * 60 + float(secs or 0) + int(ms or 0) / 1000


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def depends(service):
    """{dependency: condition}; the short list form means service_started."""
    dep = service.get("depends_on") or {}
    if isinstance(dep, list):
        return {d: "service_started" for d in dep}
    return {d: (v or {}).get("condition", "service_started") for d, v in dep.items()}


def start_order(services):
    order, seen = [], set()

    def visit(name, path):
        if name in path:
            raise SystemExit(f"dependency cycle: {' -> '.join(path + [name])}")
        if name in seen:
            return
        for d in depends(services[name]):
            if d not in services:
                raise SystemExit(f"{name} depends on unknown service {d}")
            visit(d, path + [name])
        seen.add(name)
        order.append(name)

    for name in services:
        visit(name, [])
    return order


class Project:
    def __init__(self, path, project, images):
        self.dir = os.path.dirname(os.path.abspath(path))
        with open(path) as f:
            self.compose = yaml.safe_load(f)
        self.services = self.compose["services"]
        self.project = project
        self.images = images
        self.ports = {}

    def container(self, name):
        return f"{self.project}-{name}"

    def image(self, name):
        return self.images.get(name, self.services[name]["image"])

    def common_args(self, name):
        """What a one-off container of the service shares with the service's own."""
        s = self.services[name]
        args = ["--network", self.project]
        env = s.get("environment") or {}
        if isinstance(env, list):
            env = dict(e.split("=", 1) for e in env)
        for k, v in env.items():
            args += ["--env", f"{k}={v}"]
        if s.get("read_only"):
            args.append("--read-only")
        for cap in s.get("cap_drop", []):
            args += ["--cap-drop", cap]
        for opt in s.get("security_opt", []):
            args += ["--security-opt", opt]
        for vol in s.get("volumes", []):
            parts = str(vol).split(":")
            src = parts[0]
            if src.startswith((".", "/")):
                src = os.path.normpath(os.path.join(self.dir, src))
                if not os.path.exists(src):
                    raise SystemExit(f"{name}: mounted {parts[0]} does not exist")
            else:
                src = f"{self.project}-{src}"
            args += ["--volume", ":".join([src] + parts[1:])]
        return args

    def run(self, name):
        s = self.services[name]
        args = ["podman", "run", "-d", "--name", self.container(name), "--network-alias", name]
        args += self.common_args(name)
        self.ports[name] = {}
        for p in s.get("ports", []):
            target = str(p).rsplit(":", 1)[-1]
            host = free_port()
            self.ports[name][target] = host
            args += ["--publish", f"127.0.0.1:{host}:{target}"]
        args.append(self.image(name))
        args += [str(c) for c in s.get("command", [])]
        log(f"start {name} ({self.image(name)})")
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL)

    def healthy(self, name):
        """Runs the service's healthcheck test in its container until it passes, as often as
        the compose file's interval and retries allow."""
        hc = self.services[name]["healthcheck"]
        test = hc["test"]
        if test[0] == "CMD":
            cmd = test[1:]
        elif test[0] == "CMD-SHELL":
            cmd = ["sh", "-c", test[1]]
        else:
            raise SystemExit(f"{name}: unsupported healthcheck test {test!r}")
        interval = seconds(hc.get("interval"), 30)
        timeout = seconds(hc.get("timeout"), 30)
        retries = int(hc.get("retries", 3))
        started = time.monotonic()
        for _ in range(retries + 1):
            try:
                r = subprocess.run(["podman", "exec", self.container(name)] + cmd,
                                   capture_output=True, timeout=timeout)
                if r.returncode == 0:
                    log(f"{name} healthy after {time.monotonic() - started:.1f} s")
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(interval)
        raise SystemExit(f"{name}: not healthy after {retries} retries every {interval} s")

    def completed(self, name):
        r = subprocess.run(["podman", "wait", self.container(name)], capture_output=True, text=True, check=True)
        code = r.stdout.strip()
        if code != "0":
            raise SystemExit(f"{name} exited {code}")
        log(f"{name} completed successfully")

    def up(self):
        subprocess.run(["podman", "network", "create", self.project], check=True, stdout=subprocess.DEVNULL)
        done = set()
        for name in start_order(self.services):
            for dep, cond in depends(self.services[name]).items():
                if (dep, cond) in done:
                    continue
                if cond == "service_healthy":
                    self.healthy(dep)
                elif cond == "service_completed_successfully":
                    self.completed(dep)
                elif cond != "service_started":
                    raise SystemExit(f"{name}: unknown depends_on condition {cond}")
                done.add((dep, cond))
            self.run(name)
        # Everything with a healthcheck must also become healthy by itself, depended on or not.
        for name, s in self.services.items():
            if "healthcheck" in s and (name, "service_healthy") not in done:
                self.healthy(name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--project")
    ap.add_argument("--image", action="append", default=[], metavar="SERVICE=IMAGE")
    ap.add_argument("--list-images", action="store_true")
    ap.add_argument("--ports-out")
    ap.add_argument("--run-args", metavar="SERVICE")
    a = ap.parse_args()
    images = dict(i.split("=", 1) for i in a.image)
    p = Project(a.file, a.project or "compose", images)
    if a.list_images:
        for name, s in p.services.items():
            print(f"{name}={s['image']}")
    elif a.run_args:
        print("\n".join(p.common_args(a.run_args) + [p.image(a.run_args)]))
    else:
        p.up()
        with open(a.ports_out, "w") as f:
            json.dump(p.ports, f)


if __name__ == "__main__":
    main()
