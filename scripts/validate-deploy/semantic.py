"""Semantic checks of the deploy files, run by scripts/validate-deploy/semantic.sh:
everything a schema cannot say. Prints PASS/FAIL/SKIP lines like the shell checks.

  semantic.py ROOT WORK K8S_VERSION...
"""
import fnmatch
import importlib
import itertools
import json
import os
import re
import sys
import tomllib

import yaml

ROOT, WORK, K8S_VERSIONS = sys.argv[1], sys.argv[2], sys.argv[3:]
os.chdir(ROOT)

#: Every identity header knoxgate can answer with, by its documented (suggested) name: a client's
#: copy of any of them must never reach the application, whether knoxgate sends it or not.
IDENTITY_HEADERS = ("X-Auth-User-Id", "X-Auth-Username", "X-Auth-Email", "X-Auth-Assertion",
                    "X-Auth-User-Staff", "X-Auth-User-Superuser", "X-Auth-User-Groups")
UNDERSCORE_TWINS = tuple(h.replace("-", "_") for h in IDENTITY_HEADERS)


def _underscore_spellings(header):
    """Every spelling of `header` with some or all of its hyphens as underscores: a WSGI server
    that maps underscores reads each as the header itself."""
    parts = header.split("-")
    for seps in itertools.product("-_", repeat=len(parts) - 1):
        if "_" in seps:
            yield parts[0] + "".join(sep + part for sep, part in zip(seps, parts[1:]))


#: The uniform twins and every mixed spelling (X-Auth_User-Id, X_Auth-User_Id, ...).
ALL_UNDERSCORE_SPELLINGS = tuple(sorted({v for h in IDENTITY_HEADERS for v in _underscore_spellings(h)}))


def caddy_deletes(name, deletes):
    """Whether Caddy's request header deletions remove `name`: an exact name, or a `Prefix*`
    (both compared without regard to case)."""
    name = name.lower()
    return any(d.lower() == name or (d.endswith("*") and name.startswith(d[:-1].lower())) for d in deletes)


def report(status, name, detail=None):
    print(f"{status:<4}  {name}")
    if detail:
        for line in str(detail).splitlines()[:40]:
            print("        " + line)


class Checks:
    """Collects the failed assertions of one named check."""

    def __init__(self, name):
        self.name, self.errors = name, []

    def expect(self, cond, message):
        if not cond:
            self.errors.append(message)
        return cond

    def done(self):
        if self.errors:
            report("FAIL", self.name, "\n".join(self.errors))
        else:
            report("PASS", self.name)


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def duration_s(value):
    """'4s', '0.5s', '4' (seconds), '4000ms' -> seconds."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(ms|s|m)?\s*", str(value))
    if not m:
        raise ValueError(f"unreadable duration {value!r}")
    n = float(m.group(1))
    return {"ms": n / 1000, "m": n * 60}.get(m.group(2), n)


HEADER_READ_TIMEOUT_S = 5  # knoxgate's; idle keep-alive connections close after it too

# --- nginx ------------------------------------------------------------------------------------


def nginx_blocks(text, opener):
    """Bodies of the blocks whose opening line matches `opener` (a regex)."""
    text = re.sub(r"#[^\n]*", "", text)
    out = []
    for m in re.finditer(opener + r"\s*\{", text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        out.append(text[m.end():i - 1])
    return out


def check_nginx(name, text):
    c = Checks(f"{name}: auth_request contract (identity overwritten, body off, login open, keepalive < 5 s)")
    protected = nginx_blocks(text, r"location\s+/")
    c.expect(len(protected) == 1, "expected exactly one `location /` block")
    for body in protected:
        for directive in (
            r"auth_request\s+/_knoxgate/verify;",
            r"auth_request_set\s+\$knox_uid\s+\$upstream_http_x_auth_user_id;",
            r"proxy_set_header\s+X-Auth-User-Id\s+\$knox_uid;",
        ):
            c.expect(re.search(directive, body), f"location / lacks {directive}")
    verify = nginx_blocks(text, r"location\s+=\s+/_knoxgate/verify")
    c.expect(len(verify) == 1, "expected one `location = /_knoxgate/verify` block")
    for body in verify:
        for directive in (
            r"\binternal;",
            r"proxy_pass\s+http://knoxgate/verify;",
            r"proxy_pass_request_body\s+off;",
            r'proxy_set_header\s+Content-Length\s+"";',
            r"proxy_set_header\s+X-Original-URI\s+\$request_uri;",
            r"proxy_set_header\s+X-Original-Method\s+\$request_method;",
        ):
            c.expect(re.search(directive, body), f"the verify location lacks {directive}")
    login = nginx_blocks(text, r"location\s+/api/auth/")
    c.expect(len(login) == 1, "expected one `location /api/auth/` block")
    for body in login:
        c.expect("auth_request" not in body, "/api/auth/ must not require auth")
        c.expect(re.search(r"proxy_pass\s+http://knoxgate;", body), "/api/auth/ must go to knoxgate")
        for h in IDENTITY_HEADERS:
            c.expect(re.search(rf'proxy_set_header\s+{h}\s+"";', body), f"/api/auth/ must clear {h}")
    # Every location that reaches the application sets every identity header from the auth
    # answer (an empty value drops it), so no client copy passes, sent by knoxgate or not.
    to_app = [b for b in nginx_blocks(text, r"location\s+[^{;]+") if re.search(r"proxy_pass\s+http://app\b", b)]
    c.expect(to_app, "no location proxies to the application")
    for body in to_app:
        for h in IDENTITY_HEADERS:
            m = re.search(rf"proxy_set_header\s+{h}\s+(\$knox_\w+);", body)
            if c.expect(m, f"a location to the application does not set {h} from the auth answer"):
                c.expect(re.search(rf"auth_request_set\s+\{m.group(1)}\s+\$upstream_http_{h.lower().replace('-', '_')};", body),
                         f"{m.group(1)} is not set from knoxgate's {h}")
    # A 401/403 must reach the client as it is and anything else must stay a 500 from nginx.
    c.expect(not re.search(r"^\s*error_page\b", re.sub(r"#[^\n]*", "", text), re.M),
             "no error_page: it would rewrite knoxgate's 401 or nginx's 500")
    c.expect(not re.search(r"^\s*underscores_in_headers\s+on", text, re.M),
             "underscores_in_headers must stay off (X_Auth_User_Id aliases X-Auth-User-Id in WSGI)")
    upstream = nginx_blocks(text, r"upstream\s+knoxgate")
    c.expect(len(upstream) == 1, "expected one `upstream knoxgate` block")
    for body in upstream:
        m = re.search(r"keepalive_timeout\s+(\S+);", body)
        if c.expect(m, "upstream knoxgate has no keepalive_timeout (nginx's default is 60 s)"):
            c.expect(duration_s(m.group(1)) < HEADER_READ_TIMEOUT_S,
                     f"upstream keepalive_timeout {m.group(1)} is not below knoxgate's {HEADER_READ_TIMEOUT_S} s")
    c.done()


check_nginx("deploy/nginx/knoxgate.conf", open("deploy/nginx/knoxgate.conf").read())
check_nginx("deploy/compose/nginx.conf", open("deploy/compose/nginx.conf").read())
for doc in load_all("deploy/kubernetes/sidecar.yaml"):
    if doc.get("kind") == "ConfigMap" and "nginx.conf" in doc.get("data", {}):
        check_nginx("deploy/kubernetes/sidecar.yaml nginx.conf", doc["data"]["nginx.conf"])
c = Checks("deploy/nginx/knoxgate.conf: uses exactly the placeholders @LISTEN_PORT@ @KNOXGATE@ @UPSTREAM@ @PREFIX@")
found = set(re.findall(r"@[A-Z_]+@", re.sub(r"#[^\n]*", "", open("deploy/nginx/knoxgate.conf").read())))
c.expect(found == {"@LISTEN_PORT@", "@KNOXGATE@", "@UPSTREAM@", "@PREFIX@"}, f"found {sorted(found)}")
c.done()

# --- Caddy ------------------------------------------------------------------------------------


def caddy_handlers(node, out):
    """Handlers in the order Caddy runs them (depth first, handle_response excluded)."""
    if isinstance(node, dict):
        if "handler" in node:
            out.append(node)
        for key, value in node.items():
            if key != "handle_response":
                caddy_handlers(value, out)
    elif isinstance(node, list):
        for value in node:
            caddy_handlers(value, out)
    return out


c = Checks("deploy/caddy/Caddyfile: client identity headers (every spelling) deleted before forward_auth, which times out, /api/auth/* unauthenticated")
try:
    caddy = json.load(open(os.path.join(WORK, "caddy.json")))
    c.expect(caddy.get("admin", {}).get("disabled") is True, "admin off")
    routes = caddy["apps"]["http"]["servers"]["srv0"]["routes"]
    for route in routes:
        paths = [p for m in route.get("match", []) for p in m.get("path", [])]
        handlers = caddy_handlers(route.get("handle", []), [])
        is_auth = [h.get("handler") == "reverse_proxy"
                   and str(h.get("rewrite", {}).get("uri", "")).split("?", 1)[0] == "/verify" for h in handlers]
        deleted = set()
        for h in handlers:
            if h.get("handler") == "reverse_proxy":
                break
            if h.get("handler") == "headers":
                deleted |= set(h.get("request", {}).get("delete", []))
        missing = [n for n in IDENTITY_HEADERS + ALL_UNDERSCORE_SPELLINGS if not caddy_deletes(n, deleted)]
        c.expect(not missing, f"route {paths or '(catch-all)'} does not delete client copies of {sorted(missing)} first")
        for h in handlers:
            if h.get("handler") == "reverse_proxy" and "/verify" in str(h.get("rewrite", {}).get("uri", "")):
                t = h.get("transport", {})
                c.expect(t.get("response_header_timeout") and t.get("dial_timeout"),
                         f"route {paths or '(catch-all)'}: forward_auth without dial_timeout and "
                         "response_header_timeout waits for a knoxgate that does not answer")
        if "/api/auth/*" in paths:
            c.expect(not any(is_auth), "/api/auth/* must not go through forward_auth")
            proxies = [h for h in handlers if h.get("handler") == "reverse_proxy"]
            idle = proxies[0].get("transport", {}).get("keep_alive", {}).get("idle_timeout") if proxies else None
            c.expect(idle is not None and idle / 1e9 < HEADER_READ_TIMEOUT_S,
                     f"/api/auth/* keepalive {idle} ns is not below {HEADER_READ_TIMEOUT_S} s")
            continue
        if not c.expect(any(is_auth), "the catch-all route has no forward_auth to /verify"):
            continue
        at = is_auth.index(True)
        # Caddy's rewrite keeps the request's query when `uri` names none, and on the exact
        # verify path knoxgate reads the query as the route's policy.
        uri = handlers[at]["rewrite"]["uri"]
        c.expect("?" in uri, f"forward_auth uri {uri!r} has no query: the client's own query string "
                             "would reach /verify as policy (write /verify? for none)")
        deletes = [i for i, h in enumerate(handlers)
                   if h.get("handler") == "headers" and "X-Auth-User-Id" in h.get("request", {}).get("delete", [])]
        c.expect(deletes and deletes[0] < at, "request_header -X-Auth-User-Id must run before forward_auth")
        c.expect(any(h.get("handler") == "reverse_proxy" and not h.get("rewrite") for h in handlers[at + 1:]),
                 "the application's reverse_proxy must come after forward_auth")
        idle = handlers[at].get("transport", {}).get("keep_alive", {}).get("idle_timeout")
        c.expect(idle is not None and idle / 1e9 < HEADER_READ_TIMEOUT_S,
                 f"forward_auth keepalive {idle} ns is not below {HEADER_READ_TIMEOUT_S} s")
    caddyfile = open("deploy/caddy/Caddyfile").read()
    c.expect(re.search(r"^\s*auto_https off", caddyfile, re.M), "auto_https off")
    c.expect(re.search(r"copy_headers[^\n]*X-Auth-User-Id", caddyfile), "copy_headers X-Auth-User-Id")
    c.expect(re.search(r"copy_headers[^\n]*X-Auth-Assertion", caddyfile), "copy_headers X-Auth-Assertion")
except (OSError, ValueError, KeyError) as e:
    c.expect(False, f"caddy adapt output unusable: {e!r}")
c.done()

# --- Envoy ------------------------------------------------------------------------------------

report("SKIP", "envoy --mode validate deploy/envoy/envoy.yaml: no Envoy build is available from "
       "the package registries here; its protobuf schema and settings are checked instead")
envoy = yaml.safe_load(open("deploy/envoy/envoy.yaml"))
c = Checks("deploy/envoy/envoy.yaml: parses as envoy.config.bootstrap.v3.Bootstrap (envoy-data-plane 2.2.0, typed_config included)")
try:
    def type_urls(node):
        if isinstance(node, dict):
            if "@type" in node:
                yield node["@type"]
            for v in node.values():
                yield from type_urls(v)
        elif isinstance(node, list):
            for v in node:
                yield from type_urls(v)

    # Importing a message's module registers it for google.protobuf.Any resolution.
    for url in set(type_urls(envoy)):
        importlib.import_module("envoy_data_plane." + url.split("/", 1)[1].rsplit(".", 1)[0])
    from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap

    Bootstrap.from_dict(envoy)
except Exception as e:  # noqa: BLE001 - any parse error is the finding
    c.expect(False, f"{type(e).__name__}: {e}")
c.done()

c = Checks("deploy/envoy/envoy.yaml: ext_authz fails closed with 503, /verify prefix, identity overwritten, /api/auth/ exempt")
try:
    clusters = {cl["name"]: cl for cl in envoy["static_resources"]["clusters"]}
    hcm = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    filters = hcm["http_filters"]
    names = [f["name"] for f in filters]
    c.expect(names[-1] == "envoy.filters.http.router", "router must be the last filter")
    c.expect("envoy.filters.http.ext_authz" in names, "no ext_authz filter")
    c.expect("envoy.filters.http.header_mutation" in names
             and names.index("envoy.filters.http.header_mutation") < names.index("envoy.filters.http.ext_authz"),
             "client identity headers must be removed by a filter before ext_authz")
    mutation = filters[names.index("envoy.filters.http.header_mutation")]["typed_config"]
    removed = {m.get("remove") for m in mutation["mutations"]["request_mutations"]}
    for h in IDENTITY_HEADERS:
        c.expect(h.lower() in removed, f"header_mutation must remove {h.lower()}")
    authz = filters[names.index("envoy.filters.http.ext_authz")]["typed_config"]
    c.expect(authz.get("failure_mode_allow") is False, "failure_mode_allow must be false")
    c.expect(authz.get("status_on_error", {}).get("code") in ("ServiceUnavailable", 503), "status_on_error must be 503")
    http = authz["http_service"]
    c.expect(http.get("path_prefix") == "/verify", "path_prefix must be /verify")
    c.expect(http["server_uri"]["cluster"] in clusters, "ext_authz server_uri.cluster is not defined")
    upstream = [p.get("exact") for p in http["authorization_response"]["allowed_upstream_headers"]["patterns"]]
    client = [p.get("exact") for p in http["authorization_response"]["allowed_client_headers"]["patterns"]]
    for h in IDENTITY_HEADERS:
        c.expect(h.lower() in upstream, f"allowed_upstream_headers must include {h.lower()}")
    c.expect("www-authenticate" in client, "allowed_client_headers must include www-authenticate")
    c.expect(hcm.get("common_http_protocol_options", {}).get("headers_with_underscores_action") in ("DROP_HEADER", "REJECT_REQUEST"),
             "headers_with_underscores_action must drop or reject X_Auth_User_Id-style headers")
    exempt = False
    for vh in hcm["route_config"]["virtual_hosts"]:
        for r in vh["routes"]:
            c.expect(r["route"]["cluster"] in clusters, f"route {r['match']} names an undefined cluster")
            per = r.get("typed_per_filter_config", {}).get("envoy.filters.http.ext_authz", {})
            if r["match"].get("prefix") == "/api/auth/":
                exempt = per.get("disabled") is True and per.get("@type", "").endswith("ExtAuthzPerRoute")
            else:
                c.expect(not per.get("disabled"), f"route {r['match']} must not disable ext_authz")
    c.expect(exempt, "the /api/auth/ route must carry ExtAuthzPerRoute{disabled: true}")
    opts = clusters[http["server_uri"]["cluster"]]["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    idle = opts["common_http_protocol_options"]["idle_timeout"]
    c.expect(duration_s(idle) < HEADER_READ_TIMEOUT_S, f"knoxgate cluster idle_timeout {idle} is not below {HEADER_READ_TIMEOUT_S} s")
except (KeyError, IndexError, TypeError, ValueError) as e:
    c.expect(False, f"unexpected structure: {e!r}")
c.done()

# --- gRPC ext_authz: Envoy, Istio, Envoy Gateway, Contour -----------------------------------------

# knoxgate's policy keys (src/auth/policy.rs), as context_extensions carry them.
POLICY_VALUES = {"anonymous": re.compile(r"allow"), "require": re.compile(r"staff|superuser"),
                 "group": re.compile(r"[^,]{1,150}(,[^,]{1,150})*")}


def check_context(c, where, context):
    for key, value in (context or {}).items():
        c.expect(key in POLICY_VALUES, f"{where}: unknown policy key {key!r}")
        c.expect(key not in POLICY_VALUES or POLICY_VALUES[key].fullmatch(str(value)),
                 f"{where}: bad value {value!r} for {key}")
    c.expect(not ("anonymous" in (context or {}) and ({"require", "group"} & set(context or {}))),
             f"{where}: anonymous cannot be combined with require or group")


grpc_port = next(p["port"] for d in load_all("deploy/kubernetes/service.yaml") for p in d["spec"]["ports"]
                 if p["name"] == "grpc")
main_port = next(p["port"] for d in load_all("deploy/kubernetes/service.yaml") for p in d["spec"]["ports"]
                 if p["name"] == "http")
grpc_listen = tomllib.loads(load_all("deploy/kubernetes/configmap.yaml")[0]["data"]["knoxgate.toml"])[
    "server"].get("grpc_listen", "")
c = Checks("deploy/kubernetes: the grpc port (Service, Deployment, server.grpc_listen) agrees")
deployment = load_all("deploy/kubernetes/deployment.yaml")[0]
container_ports = {p["name"]: p["containerPort"] for ct in deployment["spec"]["template"]["spec"]["containers"]
                   for p in ct.get("ports", [])}
c.expect(grpc_listen.endswith(f":{container_ports.get('grpc')}"), f"grpc_listen {grpc_listen!r} vs containerPort")
c.expect(grpc_port == 9001, f"Service grpc port {grpc_port}")
c.done()

envoy_grpc = yaml.safe_load(open("deploy/envoy/envoy-grpc.yaml"))
c = Checks("deploy/envoy/envoy-grpc.yaml: parses as envoy.config.bootstrap.v3.Bootstrap (envoy-data-plane 2.2.0, typed_config included)")
try:
    for url in set(type_urls(envoy_grpc)):
        importlib.import_module("envoy_data_plane." + url.split("/", 1)[1].rsplit(".", 1)[0])
    from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap

    Bootstrap.from_dict(envoy_grpc)
except Exception as e:  # noqa: BLE001 - any parse error is the finding
    c.expect(False, f"{type(e).__name__}: {e}")
c.done()

c = Checks("deploy/envoy/envoy-grpc.yaml: gRPC ext_authz fails closed with 503, h2 cluster, policies are knoxgate's keys, /api/auth/ exempt")
try:
    clusters = {cl["name"]: cl for cl in envoy_grpc["static_resources"]["clusters"]}
    hcm = envoy_grpc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"] for f in hcm["http_filters"]]
    c.expect(names[-1] == "envoy.filters.http.router", "router must be the last filter")
    authz = hcm["http_filters"][names.index("envoy.filters.http.ext_authz")]["typed_config"]
    c.expect(authz.get("failure_mode_allow") is False, "failure_mode_allow must be false")
    c.expect(authz.get("status_on_error", {}).get("code") in ("ServiceUnavailable", 503), "status_on_error must be 503")
    cluster = clusters.get(authz["grpc_service"]["envoy_grpc"]["cluster_name"])
    c.expect(cluster is not None, "grpc_service cluster is not defined")
    opts = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    c.expect("http2_protocol_options" in opts["explicit_http_config"], "the gRPC cluster must speak HTTP/2")
    port = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"]
    c.expect(port == grpc_port, f"gRPC cluster port {port} is not knoxgate's grpc port {grpc_port}")
    c.expect(hcm.get("common_http_protocol_options", {}).get("headers_with_underscores_action") in ("DROP_HEADER", "REJECT_REQUEST"),
             "headers_with_underscores_action must drop or reject X_Auth_User_Id-style headers")
    exempt = False
    for vh in hcm["route_config"]["virtual_hosts"]:
        for r in vh["routes"]:
            c.expect(r["route"]["cluster"] in clusters, f"route {r['match']} names an undefined cluster")
            per = r.get("typed_per_filter_config", {}).get("envoy.filters.http.ext_authz", {})
            if r["match"].get("prefix") == "/api/auth/":
                exempt = per.get("disabled") is True
            else:
                c.expect(not per.get("disabled"), f"route {r['match']} must not disable ext_authz")
                check_context(c, f"route {r['match']}", per.get("check_settings", {}).get("context_extensions"))
    c.expect(exempt, "the /api/auth/ route must carry ExtAuthzPerRoute{disabled: true}")
except (KeyError, IndexError, TypeError, ValueError, StopIteration) as e:
    c.expect(False, f"unexpected structure: {e!r}")
c.done()

report("SKIP", "schema check of the Istio, Envoy Gateway and Contour custom resources: their CRD schemas "
       "are not available from the package registries here; their settings are checked instead")

c = Checks("deploy/istio/knoxgate.yaml: envoyExtAuthzGrpc provider fails closed on knoxgate's grpc port; CUSTOM policy uses it and checks every request")
try:
    docs_istio = {d["kind"]: d for d in load_all("deploy/istio/knoxgate.yaml")}
    providers = {p["name"]: p for p in docs_istio["IstioOperator"]["spec"]["meshConfig"]["extensionProviders"]}
    policy = docs_istio["AuthorizationPolicy"]
    c.expect(policy["spec"]["action"] == "CUSTOM", "AuthorizationPolicy action must be CUSTOM")
    provider = providers.get(policy["spec"]["provider"]["name"])
    c.expect(provider is not None and "envoyExtAuthzGrpc" in provider, "the policy's provider must be an envoyExtAuthzGrpc provider")
    g = provider["envoyExtAuthzGrpc"]
    c.expect(g.get("failOpen") is False, "failOpen must be false")
    c.expect(g["port"] == grpc_port, f"provider port {g['port']} is not knoxgate's grpc port")
    c.expect(g["service"].startswith("knoxgate."), "provider service must be the knoxgate Service")
    c.expect(duration_s(g["timeout"]) <= 1, "timeout must be set explicitly (Istio's default is 600 s)")
    # A rule narrowed by path, method, host or source leaves the rest unchecked, and an
    # unchecked request keeps the client's identity headers (only an allowed check removes them).
    c.expect(policy["spec"].get("rules") == [{}],
             "the CUSTOM policy must check every request of the workload (rules: [{}]); "
             "login goes to knoxgate's Service, not through an exemption here")
except (KeyError, IndexError, TypeError, ValueError) as e:
    c.expect(False, f"unexpected structure: {e!r}")
c.done()

c = Checks("deploy/envoy-gateway/security-policy.yaml: gRPC extAuth fails closed on knoxgate's grpc port; the ReferenceGrant matches")
try:
    docs_eg = {d["kind"]: d for d in load_all("deploy/envoy-gateway/security-policy.yaml")}
    sp, grant = docs_eg["SecurityPolicy"], docs_eg["ReferenceGrant"]
    ext = sp["spec"]["extAuth"]
    c.expect(ext.get("failOpen") is False, "failOpen must be false")
    ref = ext["grpc"]["backendRefs"][0]
    c.expect(ref["name"] == "knoxgate" and ref["port"] == grpc_port, f"backendRef {ref} is not knoxgate's grpc port")
    c.expect(grant["metadata"]["namespace"] == ref["namespace"], "the ReferenceGrant must live in knoxgate's namespace")
    c.expect(any(f["kind"] == "SecurityPolicy" and f["namespace"] == sp["metadata"]["namespace"] for f in grant["spec"]["from"]),
             "the ReferenceGrant must admit the SecurityPolicy's namespace")
    c.expect(any(t["kind"] == "Service" and t.get("name") == ref["name"] for t in grant["spec"]["to"]),
             "the ReferenceGrant must name the knoxgate Service")
except (KeyError, IndexError, TypeError) as e:
    c.expect(False, f"unexpected structure: {e!r}")
c.done()

c = Checks("deploy/contour/knoxgate.yaml: h2c ExtensionService on knoxgate's grpc port; authorization fails closed; policies are knoxgate's keys")
try:
    docs_ct = load_all("deploy/contour/knoxgate.yaml")
    ext = next(d for d in docs_ct if d["kind"] == "ExtensionService")
    proxy = next(d for d in docs_ct if d["kind"] == "HTTPProxy")
    c.expect(ext["spec"]["protocol"] == "h2c", "ExtensionService protocol must be h2c")
    c.expect(ext["spec"]["services"][0]["port"] == grpc_port, "ExtensionService port is not knoxgate's grpc port")
    authz = proxy["spec"]["virtualhost"]["authorization"]
    c.expect(authz.get("failOpen") is False, "failOpen must be false")
    c.expect(authz["extensionRef"]["name"] == ext["metadata"]["name"]
             and authz["extensionRef"]["namespace"] == ext["metadata"]["namespace"], "extensionRef must name the ExtensionService")
    c.expect("tls" in proxy["spec"]["virtualhost"], "Contour requires TLS on a virtual host with authorization")
    check_context(c, "virtualhost", authz.get("authPolicy", {}).get("context"))
    for r in proxy["spec"]["routes"]:
        prefix = r["conditions"][0]["prefix"]
        ap = r.get("authPolicy", {})
        c.expect(prefix != "/api/auth/", "/api/auth/ goes through the included knoxgate-login proxy")
        c.expect(not ap.get("disabled"), f"route {prefix} must not disable authorization")
        check_context(c, f"route {prefix}", ap.get("context"))
    # Login: an included HTTPProxy in knoxgate's namespace, to knoxgate's HTTP port, unchecked
    # (an HTTPProxy reaches only its own namespace's Services; ExternalName is off by default).
    login = [i for i in proxy["spec"].get("includes", []) if i["conditions"][0]["prefix"] == "/api/auth/"]
    c.expect(len(login) == 1, "myapp's HTTPProxy must include one proxy for /api/auth/")
    for inc in login:
        child = next(d for d in docs_ct if d["kind"] == "HTTPProxy" and d["metadata"]["name"] == inc["name"]
                     and d["metadata"]["namespace"] == inc["namespace"])
        c.expect(inc["namespace"] == ext["metadata"]["namespace"], "the login proxy must be in knoxgate's namespace")
        for r in child["spec"]["routes"]:
            c.expect(r.get("authPolicy", {}).get("disabled") is True, "the login route must carry authPolicy.disabled: true")
            c.expect(all(s["name"] == ext["spec"]["services"][0]["name"] and s["port"] == main_port
                         for s in r["services"]), "the login route must go to knoxgate's HTTP port")
except (KeyError, IndexError, TypeError, StopIteration) as e:
    c.expect(False, f"unexpected structure: {e!r}")
c.done()

# --- Traefik ----------------------------------------------------------------------------------

report("SKIP", "traefik schema check of deploy/traefik/*: neither Traefik nor its configuration schema "
       "is available from the package registries here; YAML and settings are checked instead")


def check_strip(c, where, header_middlewares):
    """The `headers` middlewares a route uses must delete (set to "") every identity header in
    both spellings: authResponseHeaders covers the hyphenated names only, and a route without
    forwardAuth (login) not even those."""
    cleared = {k for m in header_middlewares for k, v in m.get("customRequestHeaders", {}).items() if v == ""}
    missing = set(IDENTITY_HEADERS + UNDERSCORE_TWINS) - cleared
    c.expect(not missing, f"{where}: client copies of {sorted(missing)} are not deleted")


def check_forward_auth(c, where, fa):
    c.expect(str(fa.get("address", "")).endswith("/verify"), f"{where}: address must end in /verify")
    c.expect(fa.get("trustForwardHeader") is False, f"{where}: trustForwardHeader must be false")
    for h in IDENTITY_HEADERS:
        c.expect(h in fa.get("authResponseHeaders", []), f"{where}: authResponseHeaders must list {h}")
    c.expect("Authorization" in fa.get("authRequestHeaders", []), f"{where}: authRequestHeaders must list Authorization")


c = Checks("deploy/traefik/dynamic.yml + traefik.yml: forwardAuth settings, routers refer to defined middlewares/services")
try:
    static = yaml.safe_load(open("deploy/traefik/traefik.yml"))
    dyn = yaml.safe_load(open("deploy/traefik/dynamic.yml"))["http"]
    c.expect(static["providers"]["file"]["filename"].endswith("dynamic.yml"), "file provider must load dynamic.yml")
    entry_points = set(static["entryPoints"])
    for name, ep in static["entryPoints"].items():
        # Traefik's middlewares manage only the hyphen spelling; mixed underscore spellings
        # (X-Auth_User-Id) cannot all be listed in a strip middleware.
        c.expect((ep.get("http") or {}).get("underscoreHeadersStrategy") in ("delete", "reject"),
                 f"entry point {name}: underscoreHeadersStrategy must be delete or reject")
    mws, svcs = dyn["middlewares"], dyn["services"]
    auth = [n for n, m in mws.items() if "forwardAuth" in m]
    c.expect(len(auth) == 1, "expected one forwardAuth middleware")
    for n in auth:
        check_forward_auth(c, n, mws[n]["forwardAuth"])
    for name, r in dyn["routers"].items():
        c.expect(set(r.get("entryPoints", [])) <= entry_points, f"router {name}: unknown entry point")
        c.expect(r["service"] in svcs, f"router {name}: unknown service {r['service']}")
        for m in r.get("middlewares", []):
            c.expect(m in mws, f"router {name}: unknown middleware {m}")
        uses_auth = any(m in auth for m in r.get("middlewares", []))
        check_strip(c, f"router {name}", [mws[m]["headers"] for m in r.get("middlewares", [])
                                          if "headers" in mws.get(m, {})])
        if "/api/auth/" in r["rule"]:
            c.expect(not uses_auth, f"router {name}: login must not require auth")
        else:
            c.expect(uses_auth, f"router {name}: must use the forwardAuth middleware")
    for name, s in svcs.items():
        t = s["loadBalancer"].get("serversTransport")
        c.expect(t is None or t in dyn.get("serversTransports", {}), f"service {name}: unknown serversTransport {t}")
    idle = dyn["serversTransports"]["knoxgate"]["forwardingTimeouts"]["idleConnTimeout"]
    c.expect(duration_s(idle) < HEADER_READ_TIMEOUT_S, f"idleConnTimeout {idle} is not below {HEADER_READ_TIMEOUT_S} s")
except (KeyError, TypeError, ValueError, AttributeError) as e:
    c.expect(False, f"unexpected structure: {e!r}")
c.done()

c = Checks("deploy/traefik/middleware.yaml: Middleware CRDs (traefik.io/v1alpha1) forwardAuth settings")
crd_mws = {d["metadata"]["name"]: d for d in load_all("deploy/traefik/middleware.yaml") if d["kind"] == "Middleware"}
for d in load_all("deploy/traefik/middleware.yaml"):
    c.expect(d["apiVersion"] == "traefik.io/v1alpha1", f"{d['kind']}: apiVersion must be traefik.io/v1alpha1")
fa = [d for d in crd_mws.values() if "forwardAuth" in d["spec"]]
if c.expect(len(fa) == 1, "expected one forwardAuth Middleware"):
    check_forward_auth(c, fa[0]["metadata"]["name"], fa[0]["spec"]["forwardAuth"])
for d in load_all("deploy/traefik/middleware.yaml"):
    if d["kind"] == "IngressRoute":
        for r in d["spec"]["routes"]:
            for m in r.get("middlewares", []):
                c.expect(m["name"] in crd_mws, f"IngressRoute {d['metadata']['name']}: unknown middleware {m['name']}")
            check_strip(c, f"IngressRoute route {r['match']}",
                        [crd_mws[m["name"]]["spec"]["headers"] for m in r.get("middlewares", [])
                         if "headers" in crd_mws.get(m["name"], {}).get("spec", {})])
c.done()

# --- Kubernetes schemas -----------------------------------------------------------------------

import kubernetes_validate  # noqa: E402

K8S_FILES = sorted(
    [os.path.join("deploy/kubernetes", f) for f in os.listdir("deploy/kubernetes") if f.endswith((".yaml", ".yml"))]
    + ["deploy/ingress-nginx/ingress.yaml", "deploy/traefik/middleware.yaml"]
    + ["deploy/istio/knoxgate.yaml", "deploy/envoy-gateway/security-policy.yaml", "deploy/contour/knoxgate.yaml"]
)
rendered = os.path.join(WORK, "kustomize.yaml")
for path in K8S_FILES + ([rendered] if os.path.exists(rendered) and os.path.getsize(rendered) else []):
    label = "`kubectl kustomize deploy/kubernetes`" if path == rendered else path
    for doc in load_all(path):
        if doc.get("kind") == "Kustomization":
            continue  # kustomize's own input, rendered and checked as `kubectl kustomize` output
        what = f"{label}: {doc.get('kind')}/{doc.get('metadata', {}).get('name', '-')} ({doc.get('apiVersion')})"
        errors = []
        try:
            for v in K8S_VERSIONS:
                try:
                    kubernetes_validate.validate(doc, v, strict=True)
                except kubernetes_validate.ValidationError as e:
                    errors.append(f"Kubernetes {v}: {'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError:
            report("SKIP", f"kubernetes-validate {what}: no built-in schema for this custom resource "
                   "(its CRD is not installed here); YAML and settings checked only")
            continue
        if errors:
            report("FAIL", f"kubernetes-validate --strict {what}", "\n".join(errors))
        else:
            report("PASS", f"kubernetes-validate --strict {what} against {', '.join(K8S_VERSIONS)}")

# --- Kubernetes workloads ---------------------------------------------------------------------

docs = {p: load_all(p) for p in K8S_FILES}
all_docs = [d for p in K8S_FILES for d in docs[p]]


def pod_specs():
    for d in all_docs:
        if d["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            yield d, d["spec"]["template"]


def is_knoxgate(container):
    return "knoxgate" in container.get("image", "").rsplit("/", 1)[-1]


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


c = Checks("deploy/kubernetes: knoxgate containers hardened (non-root, read-only root, no privilege escalation, "
           "ALL capabilities dropped, RuntimeDefault seccomp), resources set, URLs from the Secret")
serving, migrating = [], []
for owner, template in pod_specs():
    spec = template["spec"]
    pod_sc = spec.get("securityContext", {})
    for container in spec.get("initContainers", []) + spec.get("containers", []):
        if not is_knoxgate(container):
            continue
        where = f"{owner['kind']}/{owner['metadata']['name']} container {container['name']}"
        # Service links would inject KNOXGATE_SERVICE_HOST & co., which knoxgate rejects.
        c.expect(spec.get("enableServiceLinks") is False, f"{where}: the pod needs enableServiceLinks: false")
        c.expect(not container.get("envFrom"),
                 f"{where}: take single Secret keys with env, not envFrom (an extra KNOXGATE_* key stops knoxgate)")
        sc = container.get("securityContext", {})
        c.expect(sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation must be false")
        c.expect(sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem must be true")
        c.expect(sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{where}: runAsNonRoot must be true")
        c.expect(isinstance(sc.get("runAsUser", pod_sc.get("runAsUser")), int), f"{where}: numeric runAsUser")
        c.expect("ALL" in sc.get("capabilities", {}).get("drop", []), f"{where}: capabilities.drop must include ALL")
        c.expect(sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type") == "RuntimeDefault",
                 f"{where}: seccompProfile RuntimeDefault")
        res = container.get("resources", {})
        c.expect(res.get("requests", {}).keys() >= {"cpu", "memory"}, f"{where}: cpu and memory requests")
        c.expect("memory" in res.get("limits", {}), f"{where}: memory limit")
        env = {e["name"]: e for e in container.get("env", [])}
        for var in ("KNOXGATE_POSTGRES_URL", "KNOXGATE_REDIS_URL", "KNOXGATE_REDIS_ENTRY_KEY"):
            if var == "KNOXGATE_REDIS_ENTRY_KEY" and container.get("args", ["serve"])[:1] == ["migrate"]:
                continue  # migrating writes no Redis entry
            c.expect(var in env and "secretKeyRef" in env[var].get("valueFrom", {}),
                     f"{where}: {var} must come from a Secret")
        args = container.get("args", ["serve"])
        if args[:1] == ["migrate"]:
            migrating.append(where)
        elif args[:1] in (["serve"], []):
            serving.append((owner, template, container, where))
c.expect(serving, "no knoxgate container runs `serve`")
c.done()

c = Checks("deploy/kubernetes: `knoxgate migrate` runs as a Job and as an init container before the sidecar")
c.expect(any(w.startswith("Job/") for w in migrating), "no Job runs `knoxgate migrate`")
c.expect(any(w.startswith("Deployment/") for w in migrating), "no init container runs `knoxgate migrate`")
c.done()

c = Checks("deploy/kubernetes: probes /healthz (liveness) and /readyz (readiness) on admin port 9090, metrics annotations")
for owner, template, container, where in serving:
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    c.expect(ports.get("admin") == 9090, f"{where}: container port `admin` must be 9090")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container.get(probe, {}).get("httpGet", {})
        c.expect(get.get("path") == path and get.get("port") in ("admin", 9090), f"{where}: {probe} must GET {path} on admin")
    ann = template["metadata"].get("annotations", {})
    c.expect(ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") == "9090",
             f"{where}: prometheus.io/scrape and prometheus.io/port annotations")
c.done()

c = Checks("deploy/kubernetes: shared Deployment has 2 replicas; Service, PodDisruptionBudget and ServiceMonitor select it")
deployments = [d for d in docs["deploy/kubernetes/deployment.yaml"] if d["kind"] == "Deployment"]
if c.expect(len(deployments) == 1, "deployment.yaml must hold one Deployment"):
    dep = deployments[0]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    c.expect(dep["spec"]["replicas"] == 2, "replicas must be 2")
    c.expect(matches(dep["spec"]["selector"]["matchLabels"], pod_labels), "Deployment selector must match its pods")
    svc = [d for d in docs["deploy/kubernetes/service.yaml"] if d["kind"] == "Service"][0]
    c.expect(matches(svc["spec"]["selector"], pod_labels), "Service selector must match the pods")
    svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    c.expect(svc_ports.get("admin", {}).get("port") == 9090, "Service needs port `admin` 9090")
    c.expect(svc_ports.get("http", {}).get("port") == 8080, "Service needs port `http` 8080")
    pdb = [d for d in docs["deploy/kubernetes/pdb.yaml"] if d["kind"] == "PodDisruptionBudget"][0]
    c.expect(matches(pdb["spec"]["selector"]["matchLabels"], pod_labels), "PodDisruptionBudget selector must match the pods")
    sm = [d for d in docs["deploy/kubernetes/servicemonitor.yaml"] if d["kind"] == "ServiceMonitor"][0]
    c.expect(sm["apiVersion"] == "monitoring.coreos.com/v1", "ServiceMonitor apiVersion monitoring.coreos.com/v1")
    c.expect(matches(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"]), "ServiceMonitor must select the Service")
    c.expect(any(e.get("port") == "admin" and e.get("path") == "/metrics" for e in sm["spec"]["endpoints"]),
             "ServiceMonitor must scrape /metrics on port admin")
    for vol in dep["spec"]["template"]["spec"].get("volumes", []):
        if "configMap" in vol:
            cm_names = {d["metadata"]["name"] for d in all_docs if d["kind"] == "ConfigMap"}
            c.expect(vol["configMap"]["name"] in cm_names, f"volume {vol['name']}: unknown ConfigMap")
c.done()

c = Checks("deploy/kubernetes/configmap.yaml: knoxgate.toml is valid TOML and holds no credentials")
cm = [d for d in docs["deploy/kubernetes/configmap.yaml"] if d["kind"] == "ConfigMap"][0]
try:
    toml = tomllib.loads(cm["data"]["knoxgate.toml"])
    c.expect(not re.search(r"(postgres|redis)[a-z-]*://", cm["data"]["knoxgate.toml"]),
             "database URLs (with passwords) belong in the Secret")
    server = toml.get("server", {})
    c.expect(server.get("admin_listen", "").endswith(":9090"), "[server] admin_listen must be on port 9090")
    c.expect(server.get("listen", "").endswith(":8080"), "[server] listen must be on port 8080")
    c.expect(duration_s(server.get("header_read_timeout", "5s")) == HEADER_READ_TIMEOUT_S,
             "[server] header_read_timeout: every proxy's idle timeout in deploy/ is set below 5 s")
except tomllib.TOMLDecodeError as e:
    c.expect(False, str(e))
c.done()

c = Checks("deploy/ingress-nginx/ingress.yaml: auth-url /verify, identity headers listed, keepalive < 5 s, login Ingress unauthenticated")
ingresses = [d for d in docs["deploy/ingress-nginx/ingress.yaml"] if d["kind"] == "Ingress"]
for ing in ingresses:
    ann = ing["metadata"].get("annotations", {}) or {}
    paths = [p["path"] for r in ing["spec"]["rules"] for p in r["http"]["paths"]]
    name = ing["metadata"]["name"]
    if any(p.startswith("/api/auth") for p in paths):
        c.expect("nginx.ingress.kubernetes.io/auth-url" not in ann, f"{name}: login must not require auth")
        continue
    c.expect(ann.get("nginx.ingress.kubernetes.io/auth-url", "").endswith("/verify"), f"{name}: auth-url must end in /verify")
    listed = [h.strip() for h in ann.get("nginx.ingress.kubernetes.io/auth-response-headers", "").split(",")]
    for h in IDENTITY_HEADERS:
        c.expect(h in listed, f"{name}: auth-response-headers must list {h}")
    ka = ann.get("nginx.ingress.kubernetes.io/auth-keepalive-timeout")
    c.expect(ka is not None and duration_s(ka) < HEADER_READ_TIMEOUT_S, f"{name}: auth-keepalive-timeout must be below 5")
c.done()

# --- docker-compose.yml -----------------------------------------------------------------------

c = Checks("docker-compose.yml: migrate before knoxgate, healthchecks, ports 8000:80 and 9090, mounted files exist")
compose = yaml.safe_load(open("docker-compose.yml"))
s = compose["services"]
c.expect(s["migrate"].get("command") == ["migrate"], "migrate runs `migrate`")
c.expect(s["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy", "migrate waits for a healthy postgres")
c.expect(s["knoxgate"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully",
         "knoxgate waits for migrate to complete successfully")
for svc in ("migrate", "knoxgate"):
    env = s[svc].get("environment", {})
    c.expect({"KNOXGATE_POSTGRES_URL", "KNOXGATE_REDIS_URL"} <= set(env), f"{svc}: Postgres and Redis URLs")
    c.expect(len(str(env.get("KNOXGATE_REDIS_ENTRY_KEY", ""))) >= 32, f"{svc}: a redis.entry_key of 32+ bytes")
    c.expect(s[svc].get("image") == s["knoxgate"].get("image"), f"{svc}: same image as knoxgate")
for svc in ("postgres", "redis", "nginx"):
    c.expect("healthcheck" in s[svc], f"{svc}: healthcheck")
c.expect("8000:80" in s["nginx"].get("ports", []), "nginx publishes 8000:80")
c.expect(any(str(p).endswith("9090:9090") for p in s["knoxgate"].get("ports", [])), "knoxgate publishes 9090")
for name, svc in s.items():
    for vol in svc.get("volumes", []):
        src = str(vol).split(":", 1)[0]
        if src.startswith("."):
            c.expect(os.path.exists(src), f"{name}: mounted {src} does not exist")
c.done()

# --- Dockerfile / .dockerignore ---------------------------------------------------------------

c = Checks("Dockerfile + .dockerignore: files the build copies are in the context; target/, .git, bench/out are not")
ignore = [line.strip().rstrip("/") for line in open(".dockerignore") if line.strip() and not line.startswith("#")]
for pattern in ("target", ".git", "bench/out"):
    c.expect(pattern in ignore, f".dockerignore must exclude {pattern}/")
dockerfile = open("Dockerfile").read()
for m in re.finditer(r"^COPY\s+(?!--from)(.+)$", dockerfile, re.M):
    for src in m.group(1).split()[:-1]:
        if src.startswith("--"):
            continue
        c.expect(os.path.exists(src), f"COPY source {src} does not exist")
        parts = src.split("/")
        c.expect(not any(fnmatch.fnmatch("/".join(parts[:i]), p) for p in ignore for i in range(1, len(parts) + 1)),
                 f"COPY source {src} is excluded by .dockerignore")
for want in (r"^FROM rust:1\.95-bookworm AS builder", r"--profile dist --locked",
             r"^FROM gcr\.io/distroless/cc-debian12:nonroot", r"^USER \d+:\d+", r"^EXPOSE 8080 9090",
             r'^ENTRYPOINT \["/usr/local/bin/knoxgate"\]', r'^CMD \["serve"\]'):
    c.expect(re.search(want, dockerfile, re.M), f"Dockerfile lacks {want}")
c.done()
