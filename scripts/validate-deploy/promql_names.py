"""Checks the PromQL of a Grafana dashboard and of Prometheus rule files against a /metrics
scrape: every metric name must be one the scrape exposes, and every label a selector or a
`by`/`without` clause names must be one the metric carries.

  promql_names.py SCRAPE [--dashboard JSON]... [--rules YAML]... [--external NAME]...
                  [--emit-rules OUT]

SCRAPE is the text of a live /metrics. Families that have no sample yet (a labelled counter
nothing has bumped) are known from their `# TYPE` line; their labels are then unknown and not
checked. Names passed with --external come from other exporters (e.g. kube-state-metrics) and
are accepted as they are. --emit-rules writes every expression as a recording rule, for
`promtool check rules` to parse. Prints one line per problem; exits 1 when there is one.
"""
import argparse
import json
import re
import sys

import yaml

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
            "unless", "offset", "inf", "nan", "atan2"}
# Labels Prometheus adds at scrape time, so a scrape of the target itself never shows them.
TARGET_LABELS = {"job", "instance"}
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def scrape_families(text):
    """{sample name: set of label names or None (unknown: no sample yet)}."""
    names = {}
    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"],
                "summary": ["_sum", "_count", "_created", ""], "gauge": [""], "unknown": [""],
                "info": ["_info"], "stateset": [""], "gaugehistogram": ["_bucket", "_gsum", "_gcount"]}
    for line in text.splitlines():
        m = re.match(r"# TYPE (\S+) (\S+)", line)
        if m:
            base, kind = m.groups()
            for s in suffixes.get(kind, [""]):
                # Text format 0.0.4 names counters with their _total already.
                name = base if base.endswith(s) and s else base + s
                names.setdefault(name, None)
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s", line)
        if m and not line.startswith("#"):
            labels = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', m.group(3) or ""))
            names[m.group(1)] = (names.get(m.group(1)) or set()) | labels
    return names


def analyse(expr):
    """(metric names, [(metric or None, label)]) used by one expression."""
    e = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h")
    e = re.sub(r"\[[^\]]*\]", "", e)
    uses = []
    for m in GROUPING.finditer(e):
        uses += [(None, label.strip()) for label in m.group(2).split(",") if label.strip()]
    e = GROUPING.sub(" ", e)
    names = []
    # A selector: an optional name and an optional {matchers}.
    for m in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*(\{(?:[^{}\"]|\"(?:\\.|[^\"\\])*\")*\})?", e):
        name, matchers = m.group(1), m.group(2)
        if not name and not matchers:
            continue
        rest = e[m.end():]
        if name and (name in KEYWORDS or re.match(r"\s*\(", rest)):
            name = None if not matchers else name
            if name in KEYWORDS:
                name = None
        if name and re.fullmatch(r"[0-9.eE+-]+", name):
            name = None
        if name:
            names.append(name)
        if matchers:
            body = re.sub(r'"(?:\\.|[^"\\])*"', '""', matchers)
            for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", body):
                if label == "__name__":
                    continue
                uses.append((name, label))
    return names, uses


def dashboard_exprs(path):
    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                yield node["expr"]
            q = node.get("query")
            if node.get("type") == "query" and isinstance(q, dict) and isinstance(q.get("query"), str):
                m = re.fullmatch(r"\s*label_values\((.*),\s*[a-zA-Z_][a-zA-Z0-9_]*\s*\)\s*", q["query"])
                yield m.group(1) if m else q["query"]
            for v in node.values():
                yield from walk(v)
        elif isinstance(node, list):
            for v in node:
                yield from walk(v)

    with open(path) as f:
        return list(walk(json.load(f)))


def rules_exprs(path):
    with open(path) as f:
        doc = yaml.safe_load(f)
    return [r["expr"] for g in doc["groups"] for r in g["rules"]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("scrape")
    ap.add_argument("--dashboard", action="append", default=[])
    ap.add_argument("--rules", action="append", default=[])
    ap.add_argument("--external", action="append", default=[])
    ap.add_argument("--emit-rules")
    a = ap.parse_args()
    with open(a.scrape) as f:
        families = scrape_families(f.read())
    if not families:
        print(f"{a.scrape}: no metric families (not a /metrics scrape?)")
        return 1
    exprs = [(p, e) for p in a.dashboard for e in dashboard_exprs(p)]
    exprs += [(p, e) for p in a.rules for e in rules_exprs(p)]
    problems = 0
    for path, expr in exprs:
        names, uses = analyse(expr)
        one_line = " ".join(expr.split())
        if not names:
            print(f"{path}: no metric name found in {one_line}")
            problems += 1
        for name in names:
            if name not in families and name not in a.external:
                print(f"{path}: {name} is not exposed by /metrics (in {one_line})")
                problems += 1
        for name, label in uses:
            if label in TARGET_LABELS or name in a.external:
                continue
            candidates = [name] if name else [n for n in names if n not in a.external]
            known = [families.get(n) for n in candidates if families.get(n) is not None]
            if known and not any(label in k or (label == "le" and n.endswith("_bucket"))
                                 for k, n in zip(known, candidates)):
                print(f"{path}: label {label} is not on {', '.join(candidates)} (in {one_line})")
                problems += 1
    if a.emit_rules:
        rules = [{"record": f"check:expr_{i}", "expr": e.replace("$__rate_interval", "5m")
                  .replace("$job", ".*").replace("$instance", ".*")} for i, (_, e) in enumerate(exprs)]
        with open(a.emit_rules, "w") as f:
            yaml.safe_dump({"groups": [{"name": "check", "rules": rules}]}, f)
    print(f"{len(exprs)} expressions, {problems} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
