#!/usr/bin/env python3
"""Validates the docker-compose stack without Docker.

The build machines have no Docker engine and no `docker compose`, so this script
checks what `docker compose config` would, and the project's own rules on top:

1. docker-compose.yml parses as YAML and validates against the Compose
   Specification's JSON schema (vendored in deploy/compose-spec/), after the
   same `${VAR:-default}` interpolation Compose does. Scalars that a YAML 1.1
   reader would take differently from Compose's YAML 1.2 (a port `22:22` is
   1342 in base 60 to YAML 1.1, `no` a boolean) must be quoted; a key given
   twice in one mapping is an error, as in Compose.
2. Services: every `depends_on` names a service, with no cycle; `service_healthy`
   only on services that have a healthcheck, `service_completed_successfully` only
   on one-shot services (restart "no"); every long-running service has a
   healthcheck; a service outside any profile depends on none inside one; named
   volumes are declared, bind-mounted files and build contexts exist; every
   interpolated variable has a default.
3. refold: every REFOLD_* variable (compose file and Dockerfile) is a setting of
   README's configuration table (refold refuses unknown ones at start); the
   backend URLs name services of the file; refold waits for `migrate` and for its
   backends; its healthcheck probes the port it listens on.
4. Monitoring: deploy/prometheus/prometheus.yml has a scrape job for refold's
   /metrics; the Grafana datasource points at the prometheus service; the
   dashboard JSON parses and uses the provisioned datasource. promtool checks
   prometheus.yml and parses every dashboard query as PromQL. (That the queries
   name only metrics refold serves is a test of tests/operations.rs, against a
   real scrape.)

Usage: scripts/check-compose.py [--compose FILE]. Exits 1 with every problem
listed; prints one line when all is well. Needs PyYAML and jsonschema, installed
from PyPI only when missing, and promtool: from PATH, else taken once per machine
from Debian's `prometheus` package (apt-get download, nothing installed) into
~/.cache/refold/.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "deploy/compose-spec/compose-spec.json"
PROMETHEUS = ROOT / "deploy/prometheus/prometheus.yml"
GRAFANA_PROVISIONING = ROOT / "deploy/grafana/provisioning"
DASHBOARDS = ROOT / "deploy/grafana/dashboards"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "refold"

# Services the README describes, and the only profile it has.
CORE_SERVICES = ["kafka", "elasticsearch", "redis", "migrate", "refold"]
PROFILES = {"monitoring": ["prometheus", "grafana"]}
# REFOLD_* variables refold accepts besides the settings (README, Configuration).
EXTRA_VARIABLES = {"REFOLD_CONFIG"}

def say(msg: str) -> None:
    print(f"check-compose: {msg}", file=sys.stderr)


def need(module: str, package: str):
    """Imports `module`, installing `package` with pip first only if it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pass
    say(f"installing {package} from PyPI (missing)")
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", package], check=True)
    except (subprocess.CalledProcessError, OSError) as e:
        say(f"FAILED: {module} is missing and `pip install {package}` failed ({e})")
        sys.exit(1)
    importlib.invalidate_caches()
    return importlib.import_module(module)


yaml = need("yaml", "PyYAML")
jsonschema = need("jsonschema", "jsonschema")


# ---- YAML as Compose reads it ---------------------------------------------------


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1; Compose reads YAML 1.2 (core schema). This loader
    resolves plain scalars the 1.2 way: only true/false are booleans, no base-60
    numbers."""


def _no_duplicates(loader, node, deep=False):
    # Compose refuses a key given twice in one mapping; PyYAML keeps the last.
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
            continue
        key = key_node.value
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


Yaml12Loader.construct_mapping = _no_duplicates
Yaml12Loader.yaml_implicit_resolvers = {
    first: [r for r in resolvers if r[0] not in (
        "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
    list("-+0123456789"))
Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def differences(a, b, path="") -> list[str]:
    """Paths where two loads of the same file differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in a.keys() | b.keys():
            out += differences(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    if a != b or type(a) is not type(b):
        return [f"{path}: YAML 1.1 reads {a!r}, Compose (YAML 1.2) reads {b!r}: quote it"]
    return []


VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(node, errors: list[str], path: str = ""):
    """Compose's interpolation, with each variable's default (the check must not
    depend on the caller's environment). `$$` is a literal `$`."""
    if isinstance(node, dict):
        return {k: interpolate(v, errors, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, errors, f"{path}[{i}]") for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node

    def sub(m: re.Match) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, default = m.group(3), m.group(4) or ""
        if op in (":-", "-"):
            return default
        errors.append(f"{path}: ${{{name}}} has no default: write ${{{name}:-default}} so the "
                      "stack starts without a .env file")
        return "x"

    return VAR.sub(sub, node)


# ---- helpers ----------------------------------------------------------------------


def readme_settings() -> set[str]:
    """REFOLD_* variables of README's configuration table."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## Configuration\n(.*?)^## ", text, re.M | re.S)
    if not m:
        return set()
    return set(re.findall(r"^\| `[a-z_]+` \| `(REFOLD_[A-Z0-9_]+)` \|", m.group(1), re.M))


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def depends_of(service: dict) -> dict[str, str]:
    dep = service.get("depends_on") or {}
    if isinstance(dep, list):
        return {d: "service_started" for d in dep}
    return {k: (v or {}).get("condition", "service_started") for k, v in dep.items()}


def url_host(url: str) -> str | None:
    m = re.match(r"^[a-z][a-z0-9+.-]*://(?:[^@/]*@)?([^:/?#]+)", url)
    return m.group(1) if m else None


def port_of(addr: str) -> str | None:
    m = re.search(r":(\d+)$", addr)
    return m.group(1) if m else None


def is_refold(service: dict) -> bool:
    return service.get("image", "").startswith("refold") or "build" in service


def dockerfile_env(text: str) -> tuple[dict[str, str], list[str], list[str], str | None]:
    """ENV variables, EXPOSEd ports, COPY sources (not --from) and the last USER."""
    lines = re.sub(r"\\\n", " ", text).splitlines()
    env, expose, copies, user = {}, [], [], None
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "ENV":
            pairs = re.findall(r'([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|\S*)', rest)
            if pairs:
                env.update((k, v.strip('"')) for k, v in pairs)
            else:
                k, _, v = rest.strip().partition(" ")
                env[k] = v.strip()
        elif word == "EXPOSE":
            expose += [p.split("/")[0] for p in rest.split()]
        elif word == "COPY":
            args = [a for a in rest.split() if not a.startswith("--")]
            if not any(a.startswith("--from") for a in rest.split()):
                copies += args[:-1]
        elif word == "USER":
            user = rest.strip()
    return env, expose, copies, user


# ---- the checks ---------------------------------------------------------------------


def check(compose_path: Path) -> tuple[list[str], str]:
    errors: list[str] = []
    err = errors.append
    try:
        raw_text = compose_path.read_text()
    except OSError as e:
        return [f"{compose_path}: {e}"], ""
    try:
        doc11 = yaml.safe_load(raw_text)
        doc = yaml.load(raw_text, Loader=Yaml12Loader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        return [f"{compose_path.name}: not YAML: {e}"], ""
    if not isinstance(doc, dict):
        return [f"{compose_path.name}: not a mapping at the top"], ""
    errors += differences(doc11, doc)
    doc = interpolate(doc, errors)

    # 1. The Compose Specification.
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        where = ".".join(map(str, e.absolute_path)) or "(top)"
        err(f"schema: {where}: {e.message}")

    services = doc.get("services")
    if not isinstance(services, dict) or not services:
        err("no services")
        return errors, ""
    volumes = doc.get("volumes") or {}

    # 2. Services.
    for name in CORE_SERVICES:
        if name not in services:
            err(f"service {name}: missing (README describes it)")
    for profile, names in PROFILES.items():
        for name in names:
            if name not in services:
                err(f"service {name}: missing (profile {profile})")
            elif profile not in (services[name].get("profiles") or []):
                err(f"service {name}: must be in profile {profile!r}")
    used_volumes = set()
    for name, s in services.items():
        if not isinstance(s, dict):
            continue
        where = f"service {name}"
        profiles = s.get("profiles") or []
        for p in profiles:
            if p not in PROFILES:
                err(f"{where}: unknown profile {p!r} (known: {', '.join(PROFILES)})")
        if name in CORE_SERVICES and profiles:
            err(f"{where}: part of the default stack, must not be in a profile")
        if "image" not in s and "build" not in s:
            err(f"{where}: neither image nor build")
        one_shot = str(s.get("restart", "no")) == "no"
        hc = s.get("healthcheck")
        if hc is None or hc.get("disable"):
            if not one_shot:
                err(f"{where}: no healthcheck (every long-running service needs one)")
        else:
            test = hc.get("test")
            if not (isinstance(test, list) and test and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1):
                err(f"{where}: healthcheck test must be [\"CMD\", ...] or [\"CMD-SHELL\", \"...\"], "
                    f"got {test!r}")
        for dep, cond in depends_of(s).items():
            if dep not in services:
                err(f"{where}: depends_on {dep!r}, which is no service")
                continue
            if dep == name:
                err(f"{where}: depends on itself")
            target = services[dep]
            if cond == "service_healthy" and not target.get("healthcheck"):
                err(f"{where}: waits for {dep} to be healthy, but {dep} has no healthcheck")
            if cond == "service_completed_successfully" and str(target.get("restart", "no")) != "no":
                err(f"{where}: waits for {dep} to complete, but {dep} restarts "
                    f"({target.get('restart')}) and never completes")
            dep_profiles = set(target.get("profiles") or [])
            if dep_profiles and not (set(profiles) & dep_profiles):
                err(f"{where}: depends on {dep}, which runs only with profile "
                    f"{'/'.join(sorted(dep_profiles))}")
        for v in s.get("volumes") or []:
            source = v.split(":", 1)[0] if isinstance(v, str) else v.get("source")
            kind = "bind" if isinstance(v, str) and source.startswith((".", "/", "~")) else (
                v.get("type", "volume") if isinstance(v, dict) else "volume")
            if not source:
                continue
            if kind == "bind":
                if not source.startswith("/") and not (compose_path.parent / source).exists():
                    err(f"{where}: bind mount {source} does not exist")
            elif kind == "volume":
                used_volumes.add(source)
                if source not in volumes:
                    err(f"{where}: volume {source!r} is not declared under top-level volumes")
        build = s.get("build")
        if build is not None:
            ctx = build if isinstance(build, str) else build.get("context", ".")
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            if not (compose_path.parent / ctx / dockerfile).is_file():
                err(f"{where}: build context {ctx} has no {dockerfile}")
    for v in volumes:
        if v not in used_volumes:
            err(f"volume {v}: declared but no service mounts it")

    # Dependency cycles.
    state: dict[str, int] = {}

    def visit(n: str, trail: list[str]) -> None:
        if state.get(n) == 2 or n not in services:
            return
        if state.get(n) == 1:
            err(f"depends_on cycle: {' -> '.join(trail + [n])}")
            return
        state[n] = 1
        for d in depends_of(services[n]):
            visit(d, trail + [n])
        state[n] = 2

    for n in services:
        visit(n, [])

    # 3. refold: its settings, backends and start order.
    known = readme_settings()
    if len(known) < 10:
        err(f"README.md: found {len(known)} REFOLD_* variables in the Configuration table; "
            "has its format changed?")
    known |= EXTRA_VARIABLES
    for name, s in services.items():
        for var in env_of(s):
            if var.startswith("REFOLD_") and var not in known:
                err(f"service {name}: {var} is no refold setting (README, Configuration); "
                    "refold would refuse to start")
    dockerfile = ROOT / "Dockerfile"
    docker_env: dict[str, str] = {}
    if dockerfile.is_file():
        docker_env, expose, copies, user = dockerfile_env(dockerfile.read_text())
        for var in docker_env:
            if var.startswith("REFOLD_") and var not in known:
                err(f"Dockerfile: ENV {var} is no refold setting (README, Configuration)")
        listen_port = port_of(docker_env.get("REFOLD_LISTEN", ""))
        if listen_port and listen_port not in expose:
            err(f"Dockerfile: listens on {listen_port} (REFOLD_LISTEN) but EXPOSEs {expose}")
        ignored = set()
        ignore_file = ROOT / ".dockerignore"
        if ignore_file.is_file():
            ignored = {l.strip().rstrip("/") for l in ignore_file.read_text().splitlines()
                       if l.strip() and not l.startswith("#")}
        for src in copies:
            top = src.split("/")[0]
            if not (ROOT / src).exists():
                err(f"Dockerfile: COPY {src}: no such file in the repository")
            elif top in ignored or src.rstrip("/") in ignored:
                err(f"Dockerfile: COPY {src}, but .dockerignore leaves it out of the build context")
        if user in (None, "root", "0"):
            err("Dockerfile: the runtime stage must run as a non-root USER")
    refolds = [n for n, s in services.items() if isinstance(s, dict) and is_refold(s)]
    for name in refolds:
        s = services[name]
        env = {**docker_env, **env_of(s)}
        where = f"service {name}"
        if env.get("REFOLD_LOG") != "kafka":
            err(f"{where}: REFOLD_LOG must be kafka in this stack (got {env.get('REFOLD_LOG')!r})")
        for var in ("REFOLD_KAFKA_BROKERS", "REFOLD_REDIS_URL", "REFOLD_ELASTICSEARCH_URL"):
            if not env.get(var):
                err(f"{where}: {var} is not set (without it refold "
                    + ("cannot reach the log)" if var == "REFOLD_KAFKA_BROKERS"
                       else "runs those projections on its embedded stand-in)"))
        backends = {}
        for b in (env.get("REFOLD_KAFKA_BROKERS") or "").split(","):
            if b:
                backends[b.rsplit(":", 1)[0]] = "REFOLD_KAFKA_BROKERS"
        for var in ("REFOLD_REDIS_URL", "REFOLD_ELASTICSEARCH_URL"):
            if env.get(var):
                host = url_host(env[var])
                if host is None:
                    err(f"{where}: {var}={env[var]!r} is not a URL")
                else:
                    backends[host] = var
        hostnames = {s2.get("hostname", n2): n2 for n2, s2 in services.items()} | {n2: n2 for n2 in services}
        for host, var in backends.items():
            if host not in hostnames:
                err(f"{where}: {var} names host {host!r}, which is no service of this file")
            elif name == "refold" and depends_of(s).get(hostnames[host]) != "service_healthy":
                err(f"{where}: must wait for {hostnames[host]} (its {var}) with condition service_healthy")
    if "refold" in services:
        s = services["refold"]
        env = {**docker_env, **env_of(s)}
        if depends_of(s).get("migrate") != "service_completed_successfully":
            err("service refold: must wait for migrate with condition service_completed_successfully")
        port = port_of(env.get("REFOLD_LISTEN", ""))
        test = " ".join(map(str, (s.get("healthcheck") or {}).get("test") or []))
        if port and not re.search(rf"(/dev/tcp/(127\.0\.0\.1|localhost)/|localhost:|127\.0\.0\.1:){port}\b", test):
            err(f"service refold: its healthcheck does not probe port {port} (REFOLD_LISTEN)")
        if "/readyz" not in test:
            err("service refold: its healthcheck must ask GET /readyz")
    if "migrate" in services:
        m = services["migrate"]
        if m.get("command") not in (["migrate"], "migrate"):
            err(f"service migrate: command must be [\"migrate\"], got {m.get('command')!r}")
        if str(m.get("restart", "no")) != "no":
            err("service migrate: one shot, restart must be \"no\"")

    # 4. Monitoring.
    refold_port = port_of({**docker_env, **env_of(services.get("refold", {}))}.get("REFOLD_LISTEN", "")) or "8080"
    check_prometheus(services, refold_port, err)
    uids = check_grafana_provisioning(services, err)
    dashboards = check_dashboards(uids, err)
    check_promql(err)

    summary = (f"{compose_path.name} valid: {len(services)} services "
               f"({', '.join(services)}), {len(volumes)} volumes; "
               f"prometheus.yml (promtool), grafana provisioning and {dashboards} dashboard(s) valid")
    return errors, summary


def load_yaml(path: Path, err) -> object:
    try:
        return yaml.load(path.read_text(), Loader=Yaml12Loader)  # noqa: S506
    except (OSError, yaml.YAMLError) as e:
        err(f"{path.relative_to(ROOT)}: {e}")
        return None


def mounts(service: dict) -> dict[str, str]:
    """Bind mounts of a service: container path -> host path."""
    out = {}
    for v in service.get("volumes") or []:
        if isinstance(v, str) and v.startswith((".", "/")):
            parts = v.split(":")
            out[parts[1]] = parts[0]
    return out


def check_prometheus(services: dict, refold_port: str, err) -> None:
    rel = PROMETHEUS.relative_to(ROOT)
    prom = services.get("prometheus") or {}
    if not any(h.lstrip("./") == str(rel) for h in mounts(prom).values()):
        err(f"service prometheus: does not mount {rel}")
    cfg = load_yaml(PROMETHEUS, err)
    if cfg is None:
        return
    jobs = cfg.get("scrape_configs") if isinstance(cfg, dict) else None
    if not isinstance(jobs, list) or not jobs:
        err(f"{rel}: no scrape_configs")
        return
    names = [j.get("job_name") for j in jobs if isinstance(j, dict)]
    if len(names) != len(set(names)) or None in names:
        err(f"{rel}: every scrape job needs a unique job_name (got {names})")
    want = f"refold:{refold_port}"
    found = False
    for j in jobs:
        targets = [t for sc in j.get("static_configs") or [] for t in sc.get("targets") or []]
        if want in targets:
            found = True
            if j.get("metrics_path", "/metrics") != "/metrics":
                err(f"{rel}: job {j.get('job_name')} scrapes {j['metrics_path']}, refold serves /metrics")
    if not found:
        err(f"{rel}: no scrape job has the target {want} (refold's /metrics)")


def check_grafana_provisioning(services: dict, err) -> set[str]:
    uids: set[str] = set()
    graf = services.get("grafana") or {}
    m = mounts(graf)
    for sub in ("datasources", "dashboards"):
        want = GRAFANA_PROVISIONING.relative_to(ROOT) / sub
        if m.get(f"/etc/grafana/provisioning/{sub}", "").lstrip("./").rstrip("/") != str(want):
            err(f"service grafana: must mount {want} at /etc/grafana/provisioning/{sub}")
    ds_files = sorted((GRAFANA_PROVISIONING / "datasources").glob("*.y*ml"))
    if not ds_files:
        err("deploy/grafana/provisioning/datasources: no datasource file")
    for f in ds_files:
        cfg = load_yaml(f, err)
        if not isinstance(cfg, dict) or cfg.get("apiVersion") != 1:
            err(f"{f.relative_to(ROOT)}: needs apiVersion: 1")
            continue
        for ds in cfg.get("datasources") or []:
            if ds.get("type") == "prometheus":
                uids.add(ds.get("uid"))
                host = url_host(ds.get("url", ""))
                if host not in services:
                    err(f"{f.relative_to(ROOT)}: datasource {ds.get('name')} points at {host!r}, "
                        "which is no service")
    if not uids:
        err("grafana provisioning: no prometheus datasource with a uid")
    dash_files = sorted((GRAFANA_PROVISIONING / "dashboards").glob("*.y*ml"))
    if not dash_files:
        err("deploy/grafana/provisioning/dashboards: no dashboard provider file")
    for f in dash_files:
        cfg = load_yaml(f, err)
        if not isinstance(cfg, dict) or cfg.get("apiVersion") != 1:
            err(f"{f.relative_to(ROOT)}: needs apiVersion: 1")
            continue
        for p in cfg.get("providers") or []:
            path = (p.get("options") or {}).get("path")
            host = m.get(path, "")
            if host.lstrip("./") != str(DASHBOARDS.relative_to(ROOT)):
                err(f"{f.relative_to(ROOT)}: provider {p.get('name')} reads {path}, where the "
                    f"grafana service does not mount {DASHBOARDS.relative_to(ROOT)}")
    return uids


def check_dashboards(uids: set[str], err) -> int:
    files = sorted(DASHBOARDS.glob("*.json"))
    if not files:
        err(f"{DASHBOARDS.relative_to(ROOT)}: no dashboard")
    for f in files:
        rel = f.relative_to(ROOT)
        try:
            dash = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            err(f"{rel}: not JSON: {e}")
            continue
        if not dash.get("uid") or not dash.get("title"):
            err(f"{rel}: needs a uid and a title")
        panels = list(dash.get("panels") or [])
        for p in list(panels):
            panels += p.get("panels") or []  # collapsed rows
        if not panels:
            err(f"{rel}: no panels")
        ids = [p.get("id") for p in panels]
        if len(ids) != len(set(ids)):
            err(f"{rel}: panel ids are not unique")
        variables = {v.get("name") for v in (dash.get("templating") or {}).get("list") or []}
        for p in panels:
            if p.get("type") == "row":
                continue
            title = p.get("title", "?")
            targets = p.get("targets") or []
            if not targets:
                err(f"{rel}: panel {title!r} has no query")
            for t in [p] + targets:
                ds = t.get("datasource")
                if isinstance(ds, dict) and ds.get("uid") not in uids and not str(ds.get("uid", "")).startswith("$"):
                    err(f"{rel}: panel {title!r} uses datasource uid {ds.get('uid')!r}; "
                        f"provisioned: {sorted(uids)}")
            for t in targets:
                expr = t.get("expr", "")
                if not expr.strip():
                    err(f"{rel}: panel {title!r} has an empty query")
                if expr.count("(") != expr.count(")"):
                    err(f"{rel}: panel {title!r}: unbalanced parentheses in {expr!r}")
                for var in re.findall(r"\$([A-Za-z_]\w*)", expr):
                    if not var.startswith("__") and var not in variables:
                        err(f"{rel}: panel {title!r} uses ${var}, which is no dashboard variable")
    return len(files)


def promtool() -> str:
    """promtool from PATH, or from Debian's prometheus package, unpacked once into
    the cache (nothing is installed)."""
    found = shutil.which("promtool")
    if found:
        return found
    cached = CACHE / "promtool"
    if cached.is_file():
        return str(cached)
    say("fetching promtool from Debian's prometheus package (once per machine)")
    with tempfile.TemporaryDirectory() as d:
        def download() -> subprocess.CompletedProcess:
            return subprocess.run(["apt-get", "download", "prometheus"], cwd=d,
                                  capture_output=True, text=True)
        try:
            r = download()
            if r.returncode != 0:  # no package lists yet, or stale ones
                subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
                r = download()
            debs = glob.glob(os.path.join(d, "prometheus_*.deb"))
            if r.returncode != 0 or not debs:
                raise OSError(f"apt-get download prometheus: {r.stderr.strip()}")
            subprocess.run(["dpkg-deb", "-x", debs[0], os.path.join(d, "x")], check=True,
                           capture_output=True)
            CACHE.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.join(d, "x/usr/bin/promtool"), cached)
        except (OSError, subprocess.CalledProcessError) as e:
            say(f"FAILED: no promtool on PATH and none could be taken from Debian's "
                f"prometheus package ({e})")
            sys.exit(1)
    return str(cached)


def check_promql(err) -> None:
    """prometheus.yml as Prometheus reads it, and every dashboard query parsed as
    PromQL (as recording rules, with Grafana's variables given example values)."""
    tool = promtool()
    r = subprocess.run([tool, "check", "config", "--syntax-only", str(PROMETHEUS)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        err(f"{PROMETHEUS.relative_to(ROOT)}: promtool check config: "
            f"{(r.stdout + r.stderr).strip()}")
    rules, names = [], {}
    for f in sorted(DASHBOARDS.glob("*.json")):
        try:
            dash = json.loads(f.read_text())
        except (OSError, ValueError):
            continue  # reported by check_dashboards
        panels = list(dash.get("panels") or [])
        for p in list(panels):
            panels += p.get("panels") or []
        for p in panels:
            for t in p.get("targets") or []:
                expr = t.get("expr", "")
                expr = re.sub(r"\$__(rate_)?interval\b", "1m", expr)
                expr = re.sub(r"\$__range\b", "1h", expr)
                expr = re.sub(r"\$\{?[A-Za-z_]\w*\}?", ".*", expr)
                name = f"dashboard_query_{len(rules)}"
                names[name] = f"{f.relative_to(ROOT)}: panel {p.get('title')!r} query {t.get('refId')}"
                rules.append({"record": name, "expr": expr})
    if not rules:
        return
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as tmp:
        json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, tmp)  # JSON is YAML
        tmp.flush()
        r = subprocess.run([tool, "check", "rules", tmp.name], capture_output=True, text=True)
    if r.returncode != 0:
        out = r.stdout + r.stderr
        for name, where in names.items():
            out = re.sub(rf"\b{name}\b", where, out)
        bad = [l.strip() for l in out.splitlines() if "FAILED" not in l and l.strip()
               and not l.startswith("Checking")]
        err("dashboard queries that are not PromQL (promtool check rules):\n      "
            + "\n      ".join(bad))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compose", type=Path, default=ROOT / "docker-compose.yml",
                    help="compose file to check (default: docker-compose.yml)")
    args = ap.parse_args()
    errors, summary = check(args.compose.resolve())
    if errors:
        say(f"FAILED: {len(errors)} problem(s) in the docker-compose stack:")
        for e in errors:
            print(f"  - {e}", file=sys.stderr)
        return 1
    print(f"check-compose: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
