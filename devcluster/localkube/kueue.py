"""Kueue on the local control plane: the real manager, its CRDs and its webhooks on loopback.

``hack/build-kueue.sh`` builds Kueue's manager (``sigs.k8s.io/kueue/cmd/kueue``) from the Go module
proxy and copies its manifests from the same module source; both are cached by version. ``start``
then, on a running local cluster:

1. applies the CRDs (``config/components/crd/bases``) with the conversion webhook of the CRDs that
   Kueue's own kustomization patches, pointed at the manager on loopback;
2. gives the manager its own identity (a client certificate of the cluster CA for the user
   ``kueue-manager``) bound to Kueue's ``manager-role`` and ``metrics-auth-role`` ClusterRoles;
3. issues a serving certificate of the cluster CA for 127.0.0.1 and starts the manager with
   ``internalCertManagement.enable: false`` and ``webhook.certDir`` pointing at it. There is no
   Service network here, so the webhook configurations are registered with ``clientConfig.url:
   https://127.0.0.1:<port>/<path>`` and the cluster CA as ``caBundle``;
4. waits until the manager is ready and a dry-run ClusterQueue passes its webhooks.

Only the ``batch/job`` integration is enabled, so only the webhooks of Kueue's own kinds and of
batch/v1 Jobs are registered (a registered webhook that nothing serves would, with Kueue's
``failurePolicy: Fail``, block every Pod or Deployment). Two beta features that need what this
cluster lacks are off: ``VisibilityOnDemand`` (an aggregated API server) and ``MultiKueue``
(worker clusters).

With its own certificates (``internalCertManagement`` off) Kueue's manager always reads the metrics
server's certificate from the fixed path ``/etc/kueue/metrics/certs``. Rather than writing to the
machine's /etc, the manager runs in a private mount namespace (``unshare``) with an overlay on /etc
whose upper layer holds only that directory.

``stop`` deletes the webhook configurations first (else every Job create would fail while nothing
serves them) and then stops the manager; ``Cluster.down`` stops it with the rest of the cluster.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from localkube import pki
from localkube.controlplane import Cluster, free_port

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
KUEUE_VERSION = os.environ.get("KUEUE_VERSION", "v0.17.0")
PROCESS = "kueue"  # the name under <state>/pids and <state>/logs
USER = pki.ClientIdentity("kueue", "kueue-manager")
NAMESPACE = "kueue-system"
FRAMEWORKS = ("batch/job",)
FEATURE_GATES = {"VisibilityOnDemand": False, "MultiKueue": False}
NAME_PREFIX = "kueue-"  # as Kueue's default kustomization names its objects
WEBHOOK_CONFIGS = ("kueue-mutating-webhook-configuration", "kueue-validating-webhook-configuration")


def build() -> Path:
    """Build (or find cached) Kueue's manager and manifests; returns their directory."""
    out = subprocess.run(
        ["bash", str(REPO_ROOT / "hack" / "build-kueue.sh")],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "KUEUE_VERSION": KUEUE_VERSION},
    )
    return Path(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# manifests (pure: files in, objects out)
# ------------------------------------------------------------------------------------------------


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def crds(home: Path, webhook_url: str, ca_bundle: str) -> list[dict[str, Any]]:
    """The CRDs, with a conversion webhook on loopback for those Kueue's kustomization patches."""
    crd_dir = home / "config" / "crd"
    patched: set[str] = set()
    kustomization = yaml.safe_load((crd_dir / "kustomization.yaml").read_text())
    for patch in kustomization.get("patches") or []:
        doc = _docs(crd_dir / patch["path"])[0]
        if (doc.get("spec", {}).get("conversion") or {}).get("strategy") == "Webhook":
            patched.add(doc["metadata"]["name"])
    out = []
    for path in sorted((crd_dir / "bases").glob("*.yaml")):
        crd = _docs(path)[0]
        if crd["metadata"]["name"] in patched:
            crd["spec"]["conversion"] = {
                "strategy": "Webhook",
                "webhook": {
                    "clientConfig": {"url": f"{webhook_url}/convert", "caBundle": ca_bundle},
                    "conversionReviewVersions": ["v1"],
                },
            }
        out.append(crd)
    return out


def _served(webhook: dict[str, Any]) -> bool:
    """Whether the manager serves this webhook with only FRAMEWORKS enabled."""
    groups = {g for rule in webhook.get("rules") or [] for g in rule.get("apiGroups") or []}
    resources = {r for rule in webhook.get("rules") or [] for r in rule.get("resources") or []}
    if groups == {"kueue.x-k8s.io"}:
        return True
    return "batch/job" in FRAMEWORKS and groups == {"batch"} and resources == {"jobs"}


def webhook_configurations(home: Path, webhook_url: str, ca_bundle: str) -> list[dict[str, Any]]:
    """Kueue's Mutating/ValidatingWebhookConfiguration, each webhook called at ``webhook_url``."""
    out = []
    for doc in _docs(home / "config" / "webhook" / "manifests.yaml"):
        hooks = []
        for hook in doc["webhooks"]:
            if not _served(hook):
                continue
            path = hook["clientConfig"]["service"]["path"]
            hooks.append({**hook, "clientConfig": {"url": f"{webhook_url}{path}", "caBundle": ca_bundle}})
        doc["metadata"] = {"name": NAME_PREFIX + doc["metadata"]["name"]}
        doc["webhooks"] = hooks
        out.append(doc)
    return out


def rbac(home: Path) -> list[dict[str, Any]]:
    """Kueue's manager and metrics-auth ClusterRoles, bound to the manager's user."""
    out: list[dict[str, Any]] = []
    for name in ("role.yaml", "metrics_auth_role.yaml"):
        for role in _docs(home / "config" / "rbac" / name):
            role["metadata"] = {"name": NAME_PREFIX + role["metadata"]["name"]}
            out.append(role)
            out.append(
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "ClusterRoleBinding",
                    "metadata": {"name": role["metadata"]["name"]},
                    "roleRef": {
                        "apiGroup": "rbac.authorization.k8s.io",
                        "kind": "ClusterRole",
                        "name": role["metadata"]["name"],
                    },
                    "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": USER.user}],
                }
            )
    return out


def configuration(webhook_port: int, health_port: int, metrics_port: int, cert_dir: Path) -> dict[str, Any]:
    """Kueue's Configuration (config.kueue.x-k8s.io/v1beta2) for the local cluster."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": f"127.0.0.1:{metrics_port}"},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},  # one manager; no Lease to wait for
        "internalCertManagement": {"enable": False},
        "clientConnection": {"qps": 50, "burst": 100},
        "integrations": {"frameworks": list(FRAMEWORKS)},
        "featureGates": dict(FEATURE_GATES),
    }


# ------------------------------------------------------------------------------------------------
# start and stop
# ------------------------------------------------------------------------------------------------


def state_dir(cluster: Cluster) -> Path:
    return cluster.state_dir / "kueue"


def running(cluster: Cluster) -> bool:
    """Whether this cluster's Kueue manager runs and answers /readyz."""
    info = state_dir(cluster) / "kueue.json"
    if PROCESS not in cluster.recorded_pids() or not info.exists():
        return False
    port = json.loads(info.read_text())["health_port"]
    return cluster.http_ok(f"http://127.0.0.1:{port}/readyz")


def start(cluster: Cluster, home: Path | None = None) -> None:
    """Install Kueue into the running cluster and start its manager (unless it already runs)."""
    if running(cluster):
        log.info("Kueue already runs in %s", cluster.state_dir)
        return
    home = home or build()
    d = state_dir(cluster)
    if any(c in str(d) for c in ",:"):
        raise ValueError(f"the state dir {d} must not contain ',' or ':' (overlay mount options)")
    cert_dir, metrics_certs = d / "certs", d / "etc" / "kueue" / "metrics" / "certs"
    pki.issue_client(cluster.pki_dir, USER)
    pki.issue_serving(cert_dir, cluster.pki_dir, "kueue-webhook")
    pki.issue_serving(metrics_certs, cluster.pki_dir, "kueue-metrics")
    (d / "overlay-work").mkdir(parents=True, exist_ok=True)
    kubeconfig = d / "kueue.kubeconfig"
    cluster.write_kubeconfig(kubeconfig, cluster.server, USER.file_stem)

    ports = {"webhook_port": free_port(), "health_port": free_port(), "metrics_port": free_port()}
    config_file = d / "config.yaml"
    config_file.write_text(
        yaml.safe_dump(configuration(ports["webhook_port"], ports["health_port"], ports["metrics_port"], cert_dir))
    )
    (d / "kueue.json").write_text(json.dumps({"version": KUEUE_VERSION, "home": str(home), **ports}))

    ca_bundle = base64.b64encode((cluster.pki_dir / "ca.crt").read_bytes()).decode()
    url = f"https://127.0.0.1:{ports['webhook_port']}"
    apply(cluster, [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}])
    apply(cluster, rbac(home))
    definitions = crds(home, url, ca_bundle)
    apply(cluster, definitions)
    for crd in definitions:
        name = crd["metadata"]["name"]
        cluster.wait_for(f"CRD {name} Established", lambda n=name: _established(cluster, n), 60, "kube-apiserver")  # type: ignore[misc]

    # A private mount namespace with /etc overlaid, for the fixed metrics certificate path.
    overlay = f"lowerdir=/etc,upperdir={d / 'etc'},workdir={d / 'overlay-work'}"
    unshare = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        unshare[1:1] = ["--user", "--map-root-user"]
    cluster.spawn(
        PROCESS,
        [
            *unshare,
            "sh",
            "-c",
            f'mount -t overlay overlay -o "{overlay}" /etc && exec "$0" "$@"',
            str(home / "bin" / "kueue"),
            f"--config={config_file}",
            "--zap-log-level=info",
        ],
        env={"KUBECONFIG": str(kubeconfig)},
    )
    health = f"http://127.0.0.1:{ports['health_port']}/readyz"
    cluster.wait_for("Kueue /readyz", lambda: cluster.http_ok(health), 120, PROCESS)
    # Register the webhooks only once something serves them, then prove the API server reaches them.
    apply(cluster, webhook_configurations(home, url, ca_bundle))
    cluster.wait_for("Kueue's webhooks via the API server", lambda: _webhooks_answer(cluster), 60, PROCESS)
    log.info("Kueue %s ready (webhooks at %s)", KUEUE_VERSION, url)


def stop(cluster: Cluster) -> bool:
    """Unregister Kueue's webhooks and stop its manager; the CRDs and objects stay. True if it ran."""
    if cluster.healthy():
        for name in WEBHOOK_CONFIGS:
            kind = "Mutating" if "mutating" in name else "Validating"
            path = _path({"apiVersion": ADMISSION, "kind": f"{kind}WebhookConfiguration", "metadata": {"name": name}})
            status, text = cluster.request("DELETE", path, timeout=30)
            if status not in (200, 202, 404):
                raise RuntimeError(f"deleting {name}: HTTP {status}: {text[:500]}")
    return cluster.stop_process(PROCESS)


ADMISSION = "admissionregistration.k8s.io/v1"
_COLLECTIONS = {
    ("v1", "Namespace"): "/api/v1/namespaces",
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition"): "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): "/apis/rbac.authorization.k8s.io/v1/clusterroles",
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
    (ADMISSION, "MutatingWebhookConfiguration"): f"/apis/{ADMISSION}/mutatingwebhookconfigurations",
    (ADMISSION, "ValidatingWebhookConfiguration"): f"/apis/{ADMISSION}/validatingwebhookconfigurations",
}


def _path(obj: dict[str, Any]) -> str:
    """The API path of a cluster-scoped object of one of the kinds this module applies."""
    return f"{_COLLECTIONS[(obj['apiVersion'], obj['kind'])]}/{obj['metadata']['name']}"


def apply(cluster: Cluster, objs: list[dict[str, Any]]) -> None:
    """Server-side apply each object as field manager ``localkube`` (conflicts forced)."""
    for obj in objs:
        status, text = cluster.request(
            "PATCH",
            _path(obj) + "?fieldManager=localkube&force=true",
            json.dumps(obj),
            content_type="application/apply-patch+yaml",
            timeout=60,
        )
        if status not in (200, 201):
            raise RuntimeError(f"applying {obj['kind']} {obj['metadata']['name']}: HTTP {status}: {text[:500]}")


def _established(cluster: Cluster, name: str) -> bool:
    crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "metadata": {"name": name}}
    status, text = cluster.request("GET", _path(crd))
    if status != 200:
        return False
    conds = json.loads(text).get("status", {}).get("conditions") or []
    return any(c.get("type") == "Established" and c.get("status") == "True" for c in conds)


def _webhooks_answer(cluster: Cluster) -> bool:
    """A server-side dry-run ClusterQueue create passes Kueue's mutating and validating webhooks
    (the API server calls them for a dry run too; an unreachable webhook fails the request)."""
    probe = {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "ClusterQueue",
        "metadata": {"name": "localkube-webhook-probe"},
        "spec": {},
    }
    try:
        status, text = cluster.request(
            "POST", "/apis/kueue.x-k8s.io/v1beta2/clusterqueues?dryRun=All", json.dumps(probe), timeout=10
        )
    except OSError as e:
        log.debug("webhook probe: %s", e)
        return False
    if status != 201:
        log.debug("webhook probe: HTTP %s: %s", status, text[:300])
    return status == 201
