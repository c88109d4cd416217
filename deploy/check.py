#!/usr/bin/env python3
"""Checks the deployment files without a cluster or a container engine (scripts/test runs it).

  python3 deploy/check.py [--promtool PATH] [--helm PATH] [--update-golden]

What is checked:
- Grafana dashboard: valid JSON, the expected panels, and every metric its queries name is one
  that push-server or msg-processor exports (read from their metrics.rs).
- Prometheus rules: `promtool check rules` and `promtool test rules` (given --promtool); the
  metric names in the rules exist.
- Helm chart: Chart.yaml and values.yaml parse; every `.Values.*` path the templates use exists
  in values.yaml; the pod's termination grace is computed from the drain settings. The chart is
  rendered for each value set under helm/golden/ (NAME.values.yaml over values.yaml) by
  helm/render (its `go test` first), a Go program (standard library only: `go` from Debian's golang-go) that runs the
  templates through Go's text/template, Helm's own engine, with a reimplementation of the Helm
  and Sprig functions the chart uses. The output must equal helm/golden/NAME.yaml
  (`--update-golden` rewrites those files), every object must pass the Kubernetes JSON schema
  (kubernetes-validate from PyPI, offline, strict), and each object's key fields are asserted
  against the values. Bad values must fail with the chart's message. With --helm (not packaged
  by Debian 12, so usually absent here): `helm lint`, and `helm template` must give the same
  objects as the Go renderer for every value set.
- systemd units: `systemd-analyze verify` (where installed); TimeoutStopSec covers the drain
  window plus the reconnect grace; LimitNOFILE, Restart and KillSignal are set.
- Container files: multi-stage, a non-root USER, one per binary.
What cannot be checked here: that a cluster admits the objects beyond their schema (no
cluster), that the images build (no container engine).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent
ROOT = DEPLOY.parent
failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
    return cond


def exported_metrics():
    names = set()
    for f in ["push-server/src/metrics.rs", "msg-processor/src/metrics.rs"]:
        names |= set(re.findall(r'pub const \w+: &str = "(\w+)"', (ROOT / f).read_text()))
    return names


def metric_names(expr):
    """Metric names in a PromQL expression (identifiers of our two prefixes)."""
    found = set(re.findall(r"\b((?:push|msgproc)_[a-z_]+)\b", expr))
    # Histogram series: name_bucket / _sum / _count belong to the histogram `name`.
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in found}


def check_dashboard(known):
    d = json.loads((DEPLOY / "grafana/push-dashboard.json").read_text())
    titles = [p["title"] for p in d["panels"]]
    expected = [
        "Connections by transport and node, against capacity",
        "Connects by result",
        "Disconnects by reason",
        "Delivery rate",
        "Delivery latency (p50, p99)",
        "Dropped messages",
        "Delivery receipts",
        "History errors",
        "Processor lag",
    ]
    for t in expected:
        check(t in titles, f"dashboard: no panel {t!r}")
    check(len(set(p["id"] for p in d["panels"])) == len(d["panels"]), "dashboard: panel ids repeat")
    for p in d["panels"]:
        check(p.get("targets"), f"dashboard: panel {p['title']!r} has no query")
        for t in p.get("targets", []):
            for n in metric_names(t["expr"]):
                check(n in known, f"dashboard: panel {p['title']!r} queries unknown metric {n}")
    return len(d["panels"])


def check_rules(known, promtool):
    rules = yaml.safe_load((DEPLOY / "prometheus/push-alerts.yaml").read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"]]
    for r in alerts:
        for n in metric_names(r["expr"]):
            check(n in known, f"alert {r['alert']}: unknown metric {n}")
    names = {r["alert"] for r in alerts}
    for a in ["PushNodeNearCapacity", "PushMessagesDropped", "PushHistoryErrors", "PushProcessorLag"]:
        check(a in names, f"alert rules: no {a}")
    if promtool:
        for args in (["check", "rules", "push-alerts.yaml"], ["test", "rules", "push-alerts.test.yaml"]):
            r = subprocess.run([promtool, *args], cwd=DEPLOY / "prometheus", capture_output=True, text=True)
            check(r.returncode == 0, f"promtool {' '.join(args)}:\n{r.stdout}{r.stderr}")
    return len(alerts)


def value_paths(v, prefix=""):
    out = set()
    if isinstance(v, dict):
        for k, x in v.items():
            p = f"{prefix}.{k}"
            out.add(p)
            out |= value_paths(x, p)
    return out


def check_chart(helm):
    chart = DEPLOY / "helm/push"
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    check(meta.get("apiVersion") == "v2" and meta.get("name") == "push", "Chart.yaml: apiVersion v2, name push")
    values = yaml.safe_load((chart / "values.yaml").read_text())
    known = value_paths(values)
    templates = "\n".join(p.read_text() for p in (chart / "templates").iterdir())
    # `$ps` and `$mp` are the chart's shorthands for .Values.pushServer / .Values.msgProcessor.
    used = set(re.findall(r"\.Values((?:\.\w+)+)", templates))
    used |= {".pushServer" + m for m in re.findall(r"\$ps((?:\.\w+)+)", templates)}
    used |= {".msgProcessor" + m for m in re.findall(r"\$mp((?:\.\w+)+)", templates)}
    for u in sorted(used):
        check(u in known, f"helm: templates use .Values{u}, which values.yaml does not define")
    check("terminationGracePeriodSeconds: {{ $grace }}" in templates
          and "add $ps.drainWindowSeconds $ps.reconnectGraceSeconds" in templates,
          "helm: termination grace must follow the drain window and grace")
    for kind in ["Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"]:
        check(f"kind: {kind}" in templates, f"helm: no {kind}")
    check("secretKeyRef" in templates and "auth-secret" not in templates.replace("authSecretKey", ""),
          "helm: secrets only through secretKeyRef")
    check(values["msgProcessor"]["replicas"] <= values["msgProcessor"]["partitions"],
          "helm: default processor replicas above partitions")
    if helm:
        r = subprocess.run([helm, "lint", str(chart)], capture_output=True, text=True)
        check(r.returncode == 0, f"helm lint:\n{r.stdout}{r.stderr}")
    return meta, values


# --- rendered chart: golden files, schemas, key fields -------------------------------------------

GOLDEN = DEPLOY / "helm/golden"
# The Kubernetes version whose schemas the objects must pass: the oldest minor release still
# supported upstream when the chart was written (autoscaling/v2 and policy/v1 are GA there).
K8S_VERSION = "1.30"
# Value sets that must not render, with a piece of the chart's message each must fail with.
BAD_VALUES = [
    ({"msgProcessor": {"replicas": 13}}, "msgProcessor.replicas (13) exceeds msgProcessor.partitions (12)"),
    ({"registry": {"url": ""}}, "registry.url (or registry.urlSecret.name) is required"),
]


def merge(base, over):
    """Helm's value merge: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_renderer(tmp):
    """Builds helm/render with Debian's Go: standard library only, nothing fetched."""
    go = shutil.which("go")
    if not check(go, "helm: no `go` on PATH to render the chart (apt-get install golang-go; scripts/test does)"):
        return None
    exe = Path(tmp) / "render"
    env = {**os.environ, "GOPROXY": "off", "GOFLAGS": "-mod=readonly", "CGO_ENABLED": "0"}
    # The renderer's own tests first (its Helm functions, YAML output, failures).
    for args in (["test", "."], ["build", "-o", str(exe), "."]):
        r = subprocess.run([go, *args], cwd=DEPLOY / "helm/render", env=env, capture_output=True, text=True)
        if not check(r.returncode == 0, f"helm/render: go {args[0]} failed:\n{r.stdout}{r.stderr}"):
            return None
    return exe


def render(renderer, meta, values):
    """(exit status, stdout, stderr) of rendering the chart with `values` as helm template would."""
    chart = {("APIVersion" if k == "apiVersion" else k[0].upper() + k[1:]): v for k, v in meta.items()}
    ctx = {"Values": values, "Chart": chart,
           "Release": {"Name": "push", "Namespace": "default", "Service": "Helm", "IsInstall": True, "Revision": 1}}
    r = subprocess.run([str(renderer), str(DEPLOY / "helm/push")], input=json.dumps(ctx),
                       capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr


def objects(text):
    return [o for o in yaml.safe_load_all(text) if o]


def by_kind(objs):
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


def env_of(deployment):
    return {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}


def check_objects(name, v, objs):
    """Each object's key fields, read back from the rendered YAML against the values."""
    ps, mp, sec = v["pushServer"], v["msgProcessor"], v["secrets"]
    objs = by_kind(objs)
    where = f"helm[{name}]"
    server = objs.get(("Deployment", "push-push-server"))
    proc = objs.get(("Deployment", "push-msg-processor"))
    if not check(server and proc, f"{where}: no push-server or msg-processor Deployment"):
        return
    pod = server["spec"]["template"]["spec"]
    drain, grace = ps["drainWindowSeconds"], ps["reconnectGraceSeconds"]
    check(pod["terminationGracePeriodSeconds"] == drain + grace + ps["terminationMarginSeconds"],
          f"{where}: termination grace is not drain window + reconnect grace + margin")
    c = pod["containers"][0]
    check(c["lifecycle"]["preStop"]["exec"]["command"][0] == "/bin/sleep", f"{where}: push-server has no preStop")
    env = env_of(server)
    check(env["PUSH_DRAIN_WINDOW"]["value"] == f"{drain}s" and env["PUSH_RECONNECT_GRACE"]["value"] == f"{grace}s",
          f"{where}: the drain settings passed to push-server differ from the values")
    check(env["PUSH_MAX_CONNECTIONS"]["value"] == str(ps["maxConnections"]), f"{where}: PUSH_MAX_CONNECTIONS")
    # Secrets: only references to Kubernetes Secrets, never a value in the pod spec.
    for dep, names in ((server, ["PUSH_AUTH_SECRET", "PUSH_ADMIN_TOKEN"]), (proc, ["MSGPROC_ADMIN_TOKEN"])):
        e = env_of(dep)
        for n in names:
            ref = e[n].get("valueFrom", {}).get("secretKeyRef", {})
            check("value" not in e[n] and ref.get("name") == sec["existingSecret"],
                  f"{where}: {n} must come from Secret {sec['existingSecret']}")
    reg = v["registry"]
    for dep, n in ((server, "PUSH_REGISTRY"), (proc, "MSGPROC_REGISTRY")):
        e = env_of(dep)[n]
        if reg["urlSecret"]["name"]:
            check(e.get("valueFrom", {}).get("secretKeyRef") == {"name": reg["urlSecret"]["name"], "key": reg["urlSecret"]["key"]}
                  and "value" not in e, f"{where}: {n} must come from Secret {reg['urlSecret']['name']}")
        else:
            check(e.get("value") == reg["url"], f"{where}: {n} is not registry.url")
    pdb = objs.get(("PodDisruptionBudget", "push-push-server"))
    check(pdb and pdb["spec"]["maxUnavailable"] == ps["pdb"]["maxUnavailable"], f"{where}: PodDisruptionBudget")
    hpa = objs.get(("HorizontalPodAutoscaler", "push-push-server"))
    if ps["hpa"]["enabled"]:
        m = hpa and hpa["spec"]["metrics"][0]
        check(m and m["pods"]["metric"]["name"] == "push_connections_utilization"
              and m["pods"]["target"]["averageValue"] == ps["hpa"]["targetUtilization"]
              and hpa["spec"]["scaleTargetRef"]["name"] == "push-push-server",
              f"{where}: HPA must scale push-server on push_connections_utilization (open / capacity)")
        check("replicas" not in server["spec"], f"{where}: with the HPA on, the Deployment must not set replicas")
    else:
        check(hpa is None and server["spec"]["replicas"] == ps["replicas"], f"{where}: HPA off: fixed replicas")
    check(proc["spec"]["replicas"] == mp["replicas"] <= mp["partitions"], f"{where}: processor replicas")


def check_schemas(name, objs):
    try:
        import kubernetes_validate
    except ImportError:
        check(False, "helm: kubernetes-validate is missing (python3 -m pip install kubernetes-validate; scripts/test does)")
        return
    for o in objs:
        try:
            kubernetes_validate.validate(o, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            check(False, f"helm[{name}]: {o['kind']} {o['metadata']['name']} fails the Kubernetes {K8S_VERSION} "
                         f"schema at {'/'.join(map(str, e.path))}: {e.message}")


def helm_template(helm, name, over):
    """Objects that a real `helm template` renders from the same values."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(over, f)
        f.flush()
        r = subprocess.run([helm, "template", "push", str(DEPLOY / "helm/push"), "-f", f.name],
                           capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr


def check_rendered(meta, values, helm, update):
    """Renders every value set under helm/golden/; returns how many objects were checked."""
    count = 0
    with tempfile.TemporaryDirectory() as tmp:
        renderer = build_renderer(tmp)
        if renderer is None:
            return 0
        sets = sorted(GOLDEN.glob("*.values.yaml"))
        check(any(p.name == "default.values.yaml" for p in sets), "helm: no golden/default.values.yaml")
        for p in sets:
            name = p.name.removesuffix(".values.yaml")
            over = yaml.safe_load(p.read_text()) or {}
            v = merge(values, over)
            code, out, err = render(renderer, meta, v)
            if not check(code == 0, f"helm[{name}]: render failed: {err}"):
                continue
            golden = GOLDEN / f"{name}.yaml"
            if update:
                golden.write_text(out)
            elif check(golden.exists(), f"helm[{name}]: no {golden.name} (run with --update-golden)"):
                check(golden.read_text() == out, f"helm[{name}]: rendered objects differ from golden/{golden.name} "
                                                 "(review, then run deploy/check.py --update-golden)")
            objs = objects(out)
            count += len(objs)
            check_schemas(name, objs)
            check_objects(name, v, objs)
            if helm:
                hcode, hout, herr = helm_template(helm, name, over)
                check(hcode == 0 and by_kind(objects(hout)) == by_kind(objs),
                      f"helm[{name}]: `helm template` renders other objects than helm/render:\n{herr}")
        for over, message in BAD_VALUES:
            code, _, err = render(renderer, meta, merge(values, over))
            check(code != 0 and message in err, f"helm: values {over} must fail with {message!r}, got: {err!r}")
            if helm:
                hcode, _, herr = helm_template(helm, "bad", over)
                check(hcode != 0 and message in herr, f"helm template: values {over} must fail with {message!r}")
    return count


def seconds(s):
    m = re.fullmatch(r"(\d+)(s|min|m)?", s)
    return int(m.group(1)) * (60 if m.group(2) in ("m", "min") else 1)


def systemd_verify():
    """`systemd-analyze verify` of each unit, with ExecStart pointed at /bin/true (the binaries
    are not installed here). Any remark about the unit file (an unknown key, a bad value) fails."""
    import shutil
    import tempfile

    tool = shutil.which("systemd-analyze")
    if not tool:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        for unit in sorted((DEPLOY / "systemd").glob("*.service")):
            text = re.sub(r"^ExecStart=.*$", "ExecStart=/bin/true", unit.read_text(), flags=re.M)
            text = re.sub(r"^EnvironmentFile=(?!-)", "EnvironmentFile=-", text, flags=re.M)
            copy = Path(tmp) / unit.name
            copy.write_text(text)
            r = subprocess.run([tool, "verify", str(copy)], capture_output=True, text=True)
            remarks = [l for l in (r.stdout + r.stderr).splitlines() if unit.name in l]
            check(r.returncode == 0 and not remarks, f"systemd-analyze verify {unit.name}:\n{r.stdout}{r.stderr}")
    return True


def check_systemd():
    unit = (DEPLOY / "systemd/push-server.service").read_text()
    kv = dict(re.findall(r"^(\w+)=(.*)$", unit, re.M))
    env = dict(re.findall(r"^Environment=(\w+)=(.*)$", unit, re.M))
    stop = seconds(kv["TimeoutStopSec"])
    drain = seconds(env["PUSH_DRAIN_WINDOW"]) + seconds(env["PUSH_RECONNECT_GRACE"])
    check(stop > drain, f"systemd: TimeoutStopSec {stop}s must exceed drain window + grace {drain}s")
    check(kv.get("KillSignal") == "SIGTERM", "systemd: KillSignal=SIGTERM")
    check(kv.get("Restart") in ("on-failure", "always"), "systemd: Restart policy")
    check(int(kv.get("LimitNOFILE", "0")) >= 100_000, "systemd: LimitNOFILE")


def check_dockerfiles():
    files = sorted((DEPLOY / "docker").glob("*.Dockerfile"))
    bins = {f.name.removesuffix(".Dockerfile") for f in files}
    for b in ["push-server", "msg-processor", "push-registry", "push-send", "loadtest"]:
        check(b in bins, f"docker: no container file for {b}")
    for f in files:
        text = f.read_text()
        check(len(re.findall(r"^FROM ", text, re.M)) >= 2, f"{f.name}: not multi-stage")
        user = re.findall(r"^USER (\S+)", text, re.M)
        check(user and not user[-1].startswith(("root", "0")), f"{f.name}: must run as a non-root USER")
    return len(files)


def main():
    args = sys.argv[1:]
    opt = lambda name: args[args.index(name) + 1] if name in args else None
    known = exported_metrics()
    panels = check_dashboard(known)
    rules = check_rules(known, opt("--promtool"))
    meta, values = check_chart(opt("--helm"))
    rendered = check_rendered(meta, values, opt("--helm"), "--update-golden" in args)
    check_systemd()
    verified = systemd_verify()
    images = check_dockerfiles()
    if failures:
        print("deploy/check.py: FAILED", *failures, sep="\n  ", file=sys.stderr)
        return 1
    print(f"deploy/check.py: ok ({panels} dashboard panels, {rules} alert rules"
          f"{' checked and unit-tested by promtool' if opt('--promtool') else ' (no promtool)'}, "
          f"chart: {rendered} rendered objects equal to golden/ and schema-valid"
          f"{', helm lint and helm template agree' if opt('--helm') else ' (no helm: lint skipped)'}, "
          f"systemd units{' (systemd-analyze verify)' if verified else ''}, {images} container files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
