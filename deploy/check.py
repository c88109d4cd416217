#!/usr/bin/env python3
"""Checks the deployment files without a cluster or a container engine (scripts/test runs it).

  python3 deploy/check.py [--promtool PATH] [--helm PATH]

What is checked:
- Grafana dashboard: valid JSON, the expected panels, and every metric its queries name is one
  that push-server or msg-processor exports (read from their metrics.rs).
- Prometheus rules: `promtool check rules` and `promtool test rules` (given --promtool); the
  metric names in the rules exist.
- Helm chart: Chart.yaml and values.yaml parse; every `.Values.*` path the templates use exists
  in values.yaml; the pod's termination grace is computed from the drain settings; with --helm
  (not packaged by Debian 12, so usually absent here): `helm lint` and `helm template`.
- systemd units: `systemd-analyze verify` (where installed); TimeoutStopSec covers the drain
  window plus the reconnect grace; LimitNOFILE, Restart and KillSignal are set.
- Container files: multi-stage, a non-root USER, one per binary.
What cannot be checked here: that Kubernetes accepts the objects (no cluster), that the images
build (no container engine).
"""
import json
import re
import subprocess
import sys
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
        for args in (["lint", str(chart)], ["template", "t", str(chart)]):
            r = subprocess.run([helm, *args], capture_output=True, text=True)
            check(r.returncode == 0, f"helm {' '.join(args)}:\n{r.stdout}{r.stderr}")
        bad = subprocess.run([helm, "template", "t", str(chart), "--set", "msgProcessor.replicas=13"],
                             capture_output=True, text=True)
        check(bad.returncode != 0 and "exceeds" in bad.stderr, "helm: replicas above partitions must fail")


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
    check_chart(opt("--helm"))
    check_systemd()
    verified = systemd_verify()
    images = check_dockerfiles()
    if failures:
        print("deploy/check.py: FAILED", *failures, sep="\n  ", file=sys.stderr)
        return 1
    print(f"deploy/check.py: ok ({panels} dashboard panels, {rules} alert rules"
          f"{' checked and unit-tested by promtool' if opt('--promtool') else ' (no promtool)'}, "
          f"chart values{' and helm lint/template' if opt('--helm') else ' (no helm: not rendered)'}, "
          f"systemd units{' (systemd-analyze verify)' if verified else ''}, {images} container files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
