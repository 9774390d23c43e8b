#!/usr/bin/env python3
"""Checks of the deployment files that need no cluster and no container engine.

Run by deploy/validate.sh (which installs the tools and passes their paths); runnable alone:

    python3 deploy/check.py --kubectl kubectl --bin-dir target/debug

Each check prints `ok: ...` or `FAIL: ...`; the last line counts them. Exit status 1 when one
failed.
"""

import argparse
import glob
import os
import re
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARIES = ("gateway", "room-service", "auth-service", "roomcast")
# Read by every binary outside its command line parser (common/src/telemetry.rs, the tracing
# filter); each must still appear in the sources, so this list cannot outlive a rename.
NON_CLAP_ENV = {
    "RUST_LOG": "common/src/telemetry.rs",
    "LOG_FORMAT": "common/src/telemetry.rs",
    "OTEL_EXPORTER_OTLP_ENDPOINT": "common/src/telemetry.rs",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "common/src/telemetry.rs",
    "OTEL_SERVICE_NAME": "common/src/telemetry.rs",
}
# The Secret every overlay's pods read. Production expects it to exist in the cluster (it is
# never rendered from the repository); dev generates it.
EXTERNAL_SECRET = "roomcast-secrets"
SECRET_ENV = ("JWT_SECRET", "INTERNAL_TOKEN", "API_KEY")
# Oldest Kubernetes minor the manifests are meant for, and the newest the validator knows.
K8S_VERSIONS = ("1.29.0", None)


class Checks:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, ok, what, detail=""):
        if ok:
            self.passed += 1
            print(f"ok: {what}")
        else:
            self.failed += 1
            print(f"FAIL: {what}" + (f": {detail}" if detail else ""))
        return ok


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


# ---------------------------------------------------------------------------------------------
# What the binaries know


class Settings:
    """The env names each binary (and subcommand) accepts, from its --help."""

    def __init__(self, bin_dir):
        self.bin_dir = bin_dir
        self.cache = {}

    def help_text(self, command):
        key = tuple(command)
        if key not in self.cache:
            exe = os.path.join(self.bin_dir, command[0])
            out = subprocess.run(
                [exe, *command[1:], "--help"], capture_output=True, text=True, check=True
            ).stdout
            self.cache[key] = out
        return self.cache[key]

    def env_names(self, command):
        names = set(re.findall(r"\[env: ([A-Z0-9_]+)", self.help_text(command)))
        return names | set(NON_CLAP_ENV)

    def default_port(self, command, env_name):
        """The port of an address setting's default, e.g. 9101 for METRICS_ADDR."""
        text = self.help_text(command)
        m = re.search(
            r"\[env: " + env_name + r"=?\]\s*\[default: [^\]]*:(\d+)\]", text
        )
        return int(m.group(1)) if m else None


def metric_names():
    """Every metric the Rust sources register."""
    names = set()
    for path in glob.glob(os.path.join(ROOT, "*", "src", "**", "*.rs"), recursive=True):
        with open(path, encoding="utf-8") as f:
            names |= set(
                re.findall(r'(?:counter|gauge|histogram)!\(\s*"([a-z0-9_]+)"', f.read())
            )
    return names


def binary_command(container_or_service):
    """The Roomcast command line a container runs, or None for other images."""
    command = container_or_service.get("command") or []
    if isinstance(command, str):
        command = command.split()
    if not command or command[0] not in BINARIES:
        return None
    # Subcommands (`roomcast standalone`) have their own settings; options are not subcommands.
    return [command[0]] + [c for c in command[1:2] if not c.startswith("-")]


def addr_port(value):
    m = re.search(r":(\d+)$", str(value))
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------
# Kubernetes


def render(kubectl, overlay):
    out = subprocess.run(
        [kubectl, "kustomize", overlay], capture_output=True, text=True
    )
    return out.returncode, out.stdout, out.stderr


def labels_match(selector, labels):
    match = selector.get("matchLabels", selector) if isinstance(selector, dict) else {}
    if "matchExpressions" in (selector or {}):
        raise ValueError("matchExpressions are not checked here")
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def pods_of(objects):
    """(deployment, pod template) pairs."""
    return [
        (o, o["spec"]["template"])
        for o in objects
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet")
    ]


def check_overlay(c, kubectl, settings, metrics, overlay):
    name = os.path.relpath(overlay, ROOT)
    code, out, err = render(kubectl, overlay)
    if not c.check(code == 0, f"{name}: kubectl kustomize renders", err.strip()):
        return
    objects = [d for d in yaml.safe_load_all(out) if d]
    c.check(bool(objects), f"{name}: renders {len(objects)} objects")

    # Schema: every built-in kind against the OpenAPI schemas, strictly (unknown fields fail).
    import kubernetes_validate

    crd_kinds = {"ServiceMonitor", "PrometheusRule"}
    for version in K8S_VERSIONS:
        v = version or kubernetes_validate.latest_version()
        errors = []
        for o in objects:
            if o["kind"] in crd_kinds:
                continue
            try:
                kubernetes_validate.validate(o, v, strict=True)
            except kubernetes_validate.ValidationError as e:
                errors.append(f"{o['kind']}/{o['metadata']['name']}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError:
                errors.append(f"{o['kind']}/{o['metadata']['name']}: no schema")
        c.check(
            not errors,
            f"{name}: every object validates against the Kubernetes {v} schemas (strict)",
            "; ".join(errors),
        )
    unknown = [o["kind"] for o in objects if o["kind"] in crd_kinds]
    if unknown:
        print(f"note: {name}: {', '.join(sorted(set(unknown)))} (CRDs) checked by the rules below, not by a schema")

    by_kind = {}
    for o in objects:
        by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o
    pods = pods_of(objects)

    # Secrets: none with values in production; every reference resolves.
    secrets = by_kind.get("Secret", {})
    configmaps = by_kind.get("ConfigMap", {})
    if "production" in os.path.basename(overlay):
        c.check(not secrets, f"{name}: renders no Secret (credentials come from the cluster)")
    problems = []
    for deploy, tmpl in pods:
        for ctr in tmpl["spec"]["containers"]:
            for e in ctr.get("env", []):
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    if ref["name"] in secrets:
                        data = {**secrets[ref["name"]].get("data", {}), **secrets[ref["name"]].get("stringData", {})}
                        if ref["key"] not in data and not ref.get("optional"):
                            problems.append(f"{ctr['name']}: key {ref['key']} not in Secret {ref['name']}")
                    elif ref["name"] != EXTERNAL_SECRET:
                        problems.append(f"{ctr['name']}: Secret {ref['name']} neither rendered nor the documented external one")
                ref = (e.get("valueFrom") or {}).get("configMapKeyRef")
                if ref and ref["name"] not in configmaps:
                    problems.append(f"{ctr['name']}: ConfigMap {ref['name']} missing")
            for src in ctr.get("envFrom", []):
                if "configMapRef" in src and src["configMapRef"]["name"] not in configmaps:
                    problems.append(f"{ctr['name']}: ConfigMap {src['configMapRef']['name']} missing")
    c.check(not problems, f"{name}: every Secret and ConfigMap reference resolves", "; ".join(problems))

    # Env: every variable given to a Roomcast binary is a setting that binary knows.
    problems = []
    checked = 0
    for deploy, tmpl in pods:
        for ctr in tmpl["spec"]["containers"]:
            command = binary_command(ctr)
            if not command:
                continue
            checked += 1
            known = settings.env_names(command)
            given = {e["name"] for e in ctr.get("env", [])}
            for src in ctr.get("envFrom", []):
                if "configMapRef" in src:
                    given |= set(configmaps.get(src["configMapRef"]["name"], {}).get("data", {}))
                if "secretRef" in src:
                    s = secrets.get(src["secretRef"]["name"])
                    if s is None:
                        problems.append(f"{ctr['name']}: envFrom of an unrendered Secret cannot be checked")
                    else:
                        given |= set(s.get("data", {}))
            for env in sorted(given - known):
                problems.append(f"{' '.join(command)} does not know {env}")
            if "INTERNAL_TOKEN" not in given:
                problems.append(f"{' '.join(command)} gets no INTERNAL_TOKEN and would refuse to start")
            if command == ["auth-service"] and not given & {"JWT_SECRET", "JWT_PUBLIC_KEY_FILE", "JWKS_URL"}:
                problems.append("auth-service gets no key (JWT_SECRET, JWT_PUBLIC_KEY_FILE or JWKS_URL)")
            # Ports: what the container declares is where the binary listens.
            env_values = {e["name"]: e.get("value") for e in ctr.get("env", [])}
            listen = set()
            for setting in ("GATEWAY_ADDR", "ROOM_SERVICE_ADDR", "AUTH_SERVICE_ADDR", "METRICS_ADDR"):
                if setting in known - set(NON_CLAP_ENV):
                    port = addr_port(env_values[setting]) if env_values.get(setting) else settings.default_port(command, setting)
                    if port:
                        listen.add(port)
            for p in ctr.get("ports", []):
                if p["containerPort"] not in listen:
                    problems.append(f"{ctr['name']}: containerPort {p['containerPort']} is not where it listens ({sorted(listen)})")
    c.check(
        checked >= 3 and not problems,
        f"{name}: the env of {checked} Roomcast containers is known to their binaries' --help, ports match",
        "; ".join(problems),
    )

    # Pod hardening, resources, probes, drain.
    problems = []
    for deploy, tmpl in pods:
        spec = tmpl["spec"]
        dn = deploy["metadata"]["name"]
        psc = spec.get("securityContext", {})
        if not psc.get("runAsNonRoot"):
            problems.append(f"{dn}: runAsNonRoot")
        if (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append(f"{dn}: seccompProfile RuntimeDefault")
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{dn}: automountServiceAccountToken false")
        if not spec.get("topologySpreadConstraints") and deploy["spec"].get("replicas", 2) != 1:
            problems.append(f"{dn}: topologySpreadConstraints")
        for ctr in spec["containers"]:
            sc = ctr.get("securityContext", {})
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{dn}/{ctr['name']}: allowPrivilegeEscalation false")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{dn}/{ctr['name']}: readOnlyRootFilesystem")
            if "ALL" not in (sc.get("capabilities") or {}).get("drop", []):
                problems.append(f"{dn}/{ctr['name']}: capabilities drop ALL")
            res = ctr.get("resources", {})
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in res.get(kind, {}):
                        problems.append(f"{dn}/{ctr['name']}: resources.{kind}.{r}")
            if not ctr.get("readinessProbe") or not ctr.get("livenessProbe"):
                problems.append(f"{dn}/{ctr['name']}: readiness and liveness probes")
            image = ctr.get("image", "")
            if ":" not in image.split("/")[-1] and "@" not in image or image.endswith(":latest"):
                problems.append(f"{dn}/{ctr['name']}: image {image!r} needs a tag other than latest")
            if binary_command(ctr):
                pre = (((ctr.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get("command", [])
                if len(pre) != 2 or pre[0] != "sleep":
                    problems.append(f"{dn}: preStop sleep")
                    continue
                drain_ms = next(
                    (int(e["value"]) for e in ctr.get("env", []) if e["name"] == "DRAIN_WINDOW_MS"),
                    2000 if binary_command(ctr) == ["gateway"] else 0,
                )
                grace = spec.get("terminationGracePeriodSeconds", 30)
                if grace <= int(pre[1]) + drain_ms / 1000:
                    problems.append(f"{dn}: terminationGracePeriodSeconds {grace} <= preStop {pre[1]} s + drain {drain_ms} ms")
    c.check(not problems, f"{name}: non-root, read-only, no escalation, caps dropped, requests+limits, probes, preStop and grace > drain", "; ".join(problems))

    # Selectors and names between objects.
    problems = []
    def selected(selector):
        return [(d, t) for d, t in pods if labels_match(selector, t["metadata"].get("labels", {}))]
    for kind in ("Service", "PodDisruptionBudget", "NetworkPolicy"):
        for o in by_kind.get(kind, {}).values():
            sel = o["spec"].get("selector") if kind != "NetworkPolicy" else o["spec"].get("podSelector")
            if kind == "NetworkPolicy" and sel == {}:
                continue
            hits = selected(sel or {})
            if not hits:
                problems.append(f"{kind}/{o['metadata']['name']} selects no pod")
                continue
            container_ports = {p.get("name") for _, t in hits for ctr in t["spec"]["containers"] for p in ctr.get("ports", [])}
            container_ports |= {p["containerPort"] for _, t in hits for ctr in t["spec"]["containers"] for p in ctr.get("ports", [])}
            if kind == "Service":
                for p in o["spec"]["ports"]:
                    if p.get("targetPort", p["port"]) not in container_ports:
                        problems.append(f"Service/{o['metadata']['name']}: targetPort {p.get('targetPort')} not on its pods")
            if kind == "NetworkPolicy":
                for rule in o["spec"].get("ingress", []):
                    for p in rule.get("ports", []):
                        if p["port"] not in container_ports:
                            problems.append(f"NetworkPolicy/{o['metadata']['name']}: port {p['port']} not on its pods")
    for o in by_kind.get("HorizontalPodAutoscaler", {}).values():
        target = by_kind.get("Deployment", {}).get(o["spec"]["scaleTargetRef"]["name"])
        if target is None:
            problems.append(f"HPA/{o['metadata']['name']}: no such Deployment")
        elif "replicas" in target["spec"]:
            problems.append(f"Deployment/{target['metadata']['name']}: sets replicas although an HPA owns the count")
        for m in o["spec"].get("metrics", []):
            if m["type"] == "Pods" and m["pods"]["metric"]["name"] not in metrics:
                problems.append(f"HPA/{o['metadata']['name']}: metric {m['pods']['metric']['name']} is not exported")
    for o in by_kind.get("Ingress", {}).values():
        for rule in o["spec"].get("rules", []):
            for p in rule["http"]["paths"]:
                svc = by_kind.get("Service", {}).get(p["backend"]["service"]["name"])
                port = p["backend"]["service"]["port"]
                if svc is None or not any(sp.get("name") == port.get("name") or sp["port"] == port.get("number") for sp in svc["spec"]["ports"]):
                    problems.append(f"Ingress/{o['metadata']['name']}: backend {p['backend']['service']} not a Service port")
    for o in by_kind.get("ServiceMonitor", {}).values():
        svcs = [s for s in by_kind.get("Service", {}).values() if labels_match(o["spec"]["selector"], s["metadata"].get("labels", {}))]
        if not svcs:
            problems.append(f"ServiceMonitor/{o['metadata']['name']} selects no Service")
        for ep in o["spec"]["endpoints"]:
            if not any(sp.get("name") == ep["port"] for s in svcs for sp in s["spec"]["ports"]):
                problems.append(f"ServiceMonitor/{o['metadata']['name']}: no selected Service has port {ep['port']}")
    for o in by_kind.get("PrometheusRule", {}).values():
        for group in o["spec"]["groups"]:
            for rule in group["rules"]:
                for metric in re.findall(r"\broomcast_[a-z0-9_]+", rule["expr"]):
                    if metric not in metrics:
                        problems.append(f"PrometheusRule {rule.get('alert')}: {metric} is not exported")
    c.check(not problems, f"{name}: selectors, ports, HPA target and metric names resolve", "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# docker compose and the Dockerfile


def check_compose(c, settings):
    raw = read("docker-compose.yml")
    doc = yaml.safe_load(raw)
    services = doc["services"]
    example = read(".env.example")

    # Interpolation: secrets without a default, every variable explained in .env.example.
    problems = []
    for m in re.finditer(r"\$\{([A-Za-z_][A-Za-z0-9_]*)([^}]*)\}", raw):
        var, rest = m.group(1), m.group(2)
        if var in SECRET_ENV and not rest.startswith(":?"):
            problems.append(f"${{{var}}} must be required (:?), not {rest or 'optional'}")
        if not re.search(rf"^#?\s*{var}=", example, re.M):
            problems.append(f"{var} is not in .env.example")
    for var in SECRET_ENV:
        if re.search(rf"^{var}=\S", example, re.M):
            problems.append(f".env.example gives {var} a value")
    c.check(not problems, "compose: secrets are required (${VAR:?}), every variable is in .env.example, which holds no secret", "; ".join(problems))

    # Scaling and start order.
    problems = []
    gw = services.get("gateway")
    if gw is None or "ports" in gw or "container_name" in gw:
        problems.append("service `gateway` must exist without ports and container_name")
    builders = [n for n, s in services.items() if "build" in s]
    roomcast = [n for n, s in services.items() if binary_command(s)]
    if len(builders) != 1:
        problems.append(f"exactly one service builds the image, not {builders}")
    elif any(services[n].get("image") != services[builders[0]].get("image") for n in roomcast):
        problems.append("every Roomcast service runs the built image")
    for n, s in services.items():
        deps = s.get("depends_on", {})
        if isinstance(deps, list):
            problems.append(f"{n}: depends_on without conditions")
            continue
        for dep, cond in deps.items():
            if dep not in services:
                problems.append(f"{n}: depends on unknown {dep}")
            elif cond.get("condition") == "service_healthy" and "healthcheck" not in services[dep]:
                problems.append(f"{n}: waits for {dep} to be healthy, which has no healthcheck")
        for v in s.get("volumes", []):
            src = v.split(":")[0] if isinstance(v, str) else v.get("source", "")
            if src.startswith("./") and not os.path.exists(os.path.join(ROOT, src)):
                problems.append(f"{n}: mounts missing {src}")
    c.check(not problems, "compose: gateway scales (no fixed port/name), one image build, health-gated depends_on, mounted files exist", "; ".join(problems))

    # Env and health check ports against the binaries.
    problems = []
    for n in roomcast:
        s = services[n]
        command = binary_command(s)
        known = settings.env_names(command)
        env = s.get("environment", {})
        if isinstance(env, list):
            env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
        for var in sorted(set(env) - known):
            problems.append(f"{n}: {' '.join(command)} does not know {var}")
        if "INTERNAL_TOKEN" not in env:
            problems.append(f"{n}: no INTERNAL_TOKEN")
        test = (s.get("healthcheck") or {}).get("test", [])
        if len(test) >= 3 and test[1] == "roomcast-healthcheck":
            setting = {"gateway": "GATEWAY_ADDR"}.get(command[0], "METRICS_ADDR")
            port = addr_port(env[setting]) if env.get(setting) else settings.default_port(command, setting)
            if str(port) != test[2]:
                problems.append(f"{n}: health check probes port {test[2]}, the binary listens on {port}")
        else:
            problems.append(f"{n}: no roomcast-healthcheck")
    c.check(len(roomcast) >= 3 and not problems, f"compose: the env of {len(roomcast)} Roomcast services is known to their binaries, health checks probe their ports", "; ".join(problems))

    # HAProxy finds the compose services by name, on the ports they listen on.
    cfg = read("deploy/compose/haproxy.cfg")
    problems = []
    templates = re.findall(r"server-template\s+\S+\s+\d+\s+([a-z0-9-]+):(\d+)", cfg)
    for host, port in templates:
        if host not in services:
            problems.append(f"haproxy.cfg names {host}, not a compose service")
            continue
        command = binary_command(services[host])
        setting = {"gateway": "GATEWAY_ADDR", "room-service": "ROOM_SERVICE_ADDR"}.get(command[0] if command else "", "")
        if command and str(settings.default_port(command, setting)) != port:
            problems.append(f"haproxy.cfg sends to {host}:{port}, which listens elsewhere")
    if "gateway" not in {h for h, _ in templates}:
        problems.append("haproxy.cfg does not balance over the gateways")
    c.check(not problems, "compose: HAProxy's server templates name compose services on their listen ports", "; ".join(problems))


def check_dockerfile(c, settings):
    text = read("Dockerfile")
    env = {}
    for m in re.finditer(r"^ENV\s+(.+)$", text, re.M):
        for pair in m.group(1).split():
            if "=" in pair:
                k, v = pair.split("=", 1)
                env[k] = v
    cmd = re.findall(r"^CMD\s+(\[.*\])$", text, re.M)
    command = yaml.safe_load(cmd[-1]) if cmd else []
    known = settings.env_names([command[0]] + command[1:2]) if command else set()
    unknown = sorted(set(env) - known)
    c.check(bool(command) and not unknown, f"Dockerfile: ENV {sorted(env)} are settings of its CMD {' '.join(command)}", f"unknown: {unknown}")
    c.check(
        all(str(addr_port(v)) in text.split("EXPOSE", 1)[-1].split("\n", 1)[0] for v in env.values() if addr_port(v))
        and re.search(r"^USER\s+\d+", text, re.M) is not None
        and "HEALTHCHECK" in text,
        "Dockerfile: listen ports are EXPOSEd, numeric non-root USER, HEALTHCHECK",
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kubectl", default="kubectl")
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "target", "debug"))
    args = ap.parse_args()

    c = Checks()
    settings = Settings(args.bin_dir)
    missing = [
        name for name, path in NON_CLAP_ENV.items() if f'"{name}"' not in read(path) and name != "RUST_LOG"
    ]
    c.check(not missing and "EnvFilter::try_from_default_env" in read(NON_CLAP_ENV["RUST_LOG"]),
            "settings read outside --help (RUST_LOG, LOG_FORMAT, OTEL_*) are still read by the code", str(missing))
    metrics = metric_names()
    c.check(len(metrics) > 5, f"found {len(metrics)} metric names in the sources")

    overlays = sorted(glob.glob(os.path.join(ROOT, "deploy", "kubernetes", "overlays", "*")))
    c.check(bool(overlays), f"{len(overlays)} overlays under deploy/kubernetes/overlays")
    for overlay in overlays:
        check_overlay(c, args.kubectl, settings, metrics, overlay)
    check_compose(c, settings)
    check_dockerfile(c, settings)

    print(f"deploy checks: {c.passed} passed, {c.failed} failed")
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
