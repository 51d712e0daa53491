"""Run ferry's components under the identities the Helm chart gives them.

The chart (charts/ferry) gives each component a ServiceAccount and a least-privilege
(Cluster)Role. This module renders the chart with ``helm template``, applies only its RBAC
objects (and, if asked, its admission policy and peering object) to a cluster, obtains a token
for each ServiceAccount through the TokenRequest API (``kubectl create token``) and writes one
kubeconfig per identity: the admin kubeconfig's server and CA, the ServiceAccount's token.

Agents get their host's identity the way a DaemonSet pod does: a placeholder Pod with
``spec.nodeName`` set to the host name and the agent's ServiceAccount (no kubelet runs it; a
placeholder Node object of that name keeps the pod garbage collector off it), and a token
bound to that Pod. The API server puts the node name into such a token
(``authentication.kubernetes.io/node-name``), which the chart's ValidatingAdmissionPolicy
checks. Deleting the Pod invalidates the token.

Used by tests/integration/test_chart_rbac.py, importable by other integration tests
(``from rbac import ChartIdentities``: pytest puts tests/integration on sys.path), and as a
command (hack/rbac-tokens.sh):

    python tests/integration/rbac.py --kubeconfig KUBECONFIG --namespace NS --out DIR \
        [--release ferry] [--agent-host host-a ...] [--admission-policy] [--peering]

prints one ``NAME=PATH`` line per kubeconfig written.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import pathlib
import re
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "ferry"
# helm built from source defaults to an old Kubernetes version; the chart needs >= 1.30.
KUBE_VERSION = "1.37.2"

RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
POLICY_KINDS = ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering", *POLICY_KINDS}
COMPONENTS = ("operator", "agent", "metadata")

# Anything with the conftest ``kubectl`` fixture's call signature.
KubectlFn = Callable[..., subprocess.CompletedProcess]


def default_helm() -> str:
    """helm from $PATH, else the one hack/build-binaries.sh built."""
    for candidate in (os.environ.get("HELM"), str(pathlib.Path.home() / ".cache/ferry/bin/helm")):
        if candidate and pathlib.Path(candidate).is_file():
            return candidate
    return "helm"


def render_chart(namespace: str, release: str = "ferry", values: dict[str, Any] | None = None,
                 helm: str | None = None) -> list[dict[str, Any]]:
    """``helm template`` the chart into ``namespace``; ``values`` as a values file. -> documents."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(values or {}, f)
        values_file = f.name
    try:
        proc = subprocess.run(
            [helm or default_helm(), "template", release, str(CHART), "--namespace", namespace,
             "--kube-version", KUBE_VERSION, "--values", values_file],
            capture_output=True, text=True, timeout=60,
        )
    finally:
        os.unlink(values_file)
    if proc.returncode != 0:
        raise RuntimeError(f"helm template failed: {proc.stderr.strip()}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def select(docs: Iterable[dict[str, Any]], kinds: Sequence[str]) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") in kinds]


def to_yaml(docs: Iterable[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(list(docs), sort_keys=False)


def read_admin_cluster(admin_kubeconfig: str | os.PathLike) -> tuple[str, str]:
    """-> (server URL, CA bundle as base64) of the admin kubeconfig's current context."""
    cfg = yaml.safe_load(pathlib.Path(admin_kubeconfig).read_text())
    ctx_name = cfg.get("current-context") or cfg["contexts"][0]["name"]
    ctx = next(c["context"] for c in cfg["contexts"] if c["name"] == ctx_name)
    cluster = next(c["cluster"] for c in cfg["clusters"] if c["name"] == ctx["cluster"])
    if "certificate-authority-data" in cluster:
        ca = cluster["certificate-authority-data"]
    else:
        ca_path = pathlib.Path(cluster["certificate-authority"])
        if not ca_path.is_absolute():
            ca_path = pathlib.Path(admin_kubeconfig).parent / ca_path
        ca = base64.b64encode(ca_path.read_bytes()).decode()
    return cluster["server"], ca


def write_token_kubeconfig(admin_kubeconfig: str | os.PathLike, token: str, path: str | os.PathLike,
                           user: str) -> pathlib.Path:
    """A kubeconfig with the admin kubeconfig's server and CA, authenticating with ``token``."""
    server, ca = read_admin_cluster(admin_kubeconfig)
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "ferry", "cluster": {"server": server, "certificate-authority-data": ca}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": {"cluster": "ferry", "user": user}}],
        "current-context": user,
    }
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out.chmod(0o600)
    return out


def request_token(kubectl: KubectlFn, namespace: str, service_account: str, duration: str = "1h",
                  bound_pod: str | None = None) -> str:
    """A ServiceAccount token from the TokenRequest API, optionally bound to a Pod."""
    args = ["create", "token", service_account, "-n", namespace, "--duration", duration]
    if bound_pod:
        args += ["--bound-object-kind", "Pod", "--bound-object-name", bound_pod]
    return kubectl(*args).stdout.strip()


def token_claims(token: str) -> dict[str, Any]:
    """The (unverified) payload of a JWT: what the API server put into it."""
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def placeholder_node(kubectl: KubectlFn, node_name: str) -> bool:
    """A Node object named ``node_name`` if none exists (no kubelet behind it): without it the
    pod garbage collector deletes pods bound to that node within a minute, and their tokens
    with them. -> whether it was created here."""
    if kubectl("get", "node", node_name, "-o", "name", check=False).returncode == 0:
        return False
    kubectl("create", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": node_name, "labels": {"ferry.dev/placeholder": "true"}},
        # kept free of pods by a taint, not a cordon: ferry reads a host node's cordon as the
        # Host's maintenance (ferry.hosts.cordon), and these nodes are named like the Hosts
        "spec": {"taints": [{"key": "ferry.dev/placeholder", "effect": "NoSchedule"}]}}))
    return True


def placeholder_pod(kubectl: KubectlFn, namespace: str, service_account: str, node_name: str,
                    name: str | None = None) -> str:
    """A Pod bound to ``node_name`` running as ``service_account``, never started (no kubelet
    here): what a DaemonSet pod on that node is to the API server. -> its name. Create the
    Node first (``placeholder_node``) or the pod garbage collector removes the pod."""
    name = name or f"{service_account}-{re.sub(r'[^a-z0-9-]', '-', node_name.lower())}"[:63].rstrip("-")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"ferry.dev/identity-for": service_account}},
        "spec": {
            "nodeName": node_name,
            "serviceAccountName": service_account,
            "automountServiceAccountToken": False,
            "containers": [{"name": "placeholder", "image": "registry.k8s.io/pause:3.10"}],
        },
    }
    kubectl("apply", "-f", "-", input=json.dumps(pod))
    return name


@dataclasses.dataclass(frozen=True)
class Identity:
    """One component's credentials: who the API server will say the requests come from."""

    component: str                 # operator | agent | metadata
    service_account: str
    namespace: str
    kubeconfig: pathlib.Path
    token: str
    node_name: str | None = None   # agents with a pod-bound token

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"

    def request(self, method: str, path: str, body: Any = None,
                content_type: str = "application/merge-patch+json") -> tuple[int, dict[str, Any]]:
        """One HTTP request to the API server with this identity's token, exactly as given (no
        GET-before-PATCH as kubectl does). -> (HTTP status, decoded JSON body)."""
        cfg = yaml.safe_load(self.kubeconfig.read_text())
        cluster = cfg["clusters"][0]["cluster"]
        ctx = ssl.create_default_context(cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(cluster["server"].rstrip("/") + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "Content-Type": content_type, "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=30) as rsp:
                return rsp.status, json.loads(rsp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw)
            except ValueError:
                return exc.code, {"message": raw.decode(errors="replace")}


class ChartIdentities:
    """The chart's RBAC applied to a cluster, and kubeconfigs for its identities.

    ``setup()`` applies the ServiceAccounts, (Cluster)Roles and bindings (plus the admission
    policy and the peering object when asked); ``teardown()`` deletes what it created,
    cluster-scoped objects included (deleting the namespace does not remove those).
    Cluster-scoped names derive from ``release``: give each concurrent user its own release.
    """

    def __init__(self, kubectl: KubectlFn, admin_kubeconfig: str, namespace: str, out_dir: str | os.PathLike,
                 release: str = "ferry", values: dict[str, Any] | None = None,
                 admission_policy: bool = False, peering: bool = False, helm: str | None = None):
        self.kubectl = kubectl
        self.admin_kubeconfig = admin_kubeconfig
        self.namespace = namespace
        self.out_dir = pathlib.Path(out_dir)
        self.release = release
        self.values = values or {}
        self.admission_policy = admission_policy
        self.peering = peering
        self.helm = helm
        self.docs = render_chart(namespace, release, self.values, helm)
        self.applied: list[dict[str, Any]] = []
        self.pods: list[str] = []
        self.nodes: list[str] = []

    # -- names ----------------------------------------------------------------------------
    def service_account(self, component: str) -> str:
        for d in select(self.docs, ("ServiceAccount",)):
            if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component:
                return d["metadata"]["name"]
        raise KeyError(f"the chart renders no ServiceAccount for {component!r}")

    def manifests(self) -> list[dict[str, Any]]:
        kinds: tuple[str, ...] = RBAC_KINDS
        if self.admission_policy:
            kinds += POLICY_KINDS
        if self.peering:
            kinds += ("ClusterKopfPeering",)
        return select(self.docs, kinds)

    def peering_name(self) -> str | None:
        peers = select(self.docs, ("ClusterKopfPeering",))
        return peers[0]["metadata"]["name"] if peers else None

    # -- lifecycle -------------------------------------------------------------------------
    def setup(self) -> ChartIdentities:
        docs = self.manifests()
        if self.peering:
            self.kubectl("apply", "--server-side", "-f", str(CHART / "crds" / "kopf-peerings.yaml"))
            self.kubectl("wait", "--for", "condition=established", "--timeout", "60s",
                         "-f", str(CHART / "crds" / "kopf-peerings.yaml"))
        self.kubectl("apply", "-f", "-", input=to_yaml(docs))
        self.applied = docs
        if self.admission_policy:
            self.wait_policy_ready()
        return self

    def teardown(self) -> None:
        for pod in self.pods:
            self.kubectl("delete", "pod", pod, "-n", self.namespace, "--wait=false", "--ignore-not-found",
                         check=False)
        if self.nodes:
            self.kubectl("delete", "node", *self.nodes, "--ignore-not-found", "--wait=false", check=False)
            self.nodes = []
        cluster_docs = [d for d in self.applied if d["kind"] in CLUSTER_SCOPED]
        if cluster_docs:
            self.kubectl("delete", "--ignore-not-found", "--wait=false", "-f", "-", input=to_yaml(cluster_docs),
                         check=False)
        # Namespaced objects go with their namespaces (RoleBindings in rbac.secretNamespaces too).
        self.applied = []

    def __enter__(self) -> ChartIdentities:
        return self.setup()

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def wait_policy_ready(self, timeout: float = 30.0) -> None:
        """Wait until the API server enforces the admission policy (its informers pick up the
        policy and binding a moment after they are created): a dry-run status write by an agent
        token that names no node, on a canary LiveMigration, must be denied by the policy."""
        # (the policies that judge this canary's write: the launcher-pod policy judges pods only)
        names = [d["metadata"]["name"] for d in select(self.applied, ("ValidatingAdmissionPolicy",))
                 if any("livemigrations/status" in r.get("resources", [])
                        for r in d["spec"]["matchConstraints"]["resourceRules"])]
        if not names:
            return
        canary = "ferry-policy-canary"
        self.kubectl("apply", "-n", self.namespace, "-f", "-", input=json.dumps({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "LiveMigration",
            "metadata": {"name": canary, "namespace": self.namespace}, "spec": {"droplet": canary}}))
        sa = self.service_account("agent")
        token = request_token(self.kubectl, self.namespace, sa, "10m")
        path = self.out_dir / "policy-canary.kubeconfig"
        write_token_kubeconfig(self.admin_kubeconfig, token, path, user="policy-canary")
        probe = Identity("agent", sa, self.namespace, path, token)
        url = (f"/apis/ferry.dev/v1alpha1/namespaces/{self.namespace}/livemigrations/{canary}/status"
               "?dryRun=All")
        deadline = time.monotonic() + timeout
        try:
            while True:
                code, rsp = probe.request("PATCH", url, {"status": {"transfer": {"state": "Copying"}}})
                if code == 403 and all(f"ValidatingAdmissionPolicy '{n}'" in rsp.get("message", "") for n in names):
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"admission policy {names} not enforced after {timeout}s "
                                       f"(last answer {code}: {rsp.get('message')})")
                time.sleep(0.2)  # paces the poll (not support.wait_until: this module also runs outside pytest)
        finally:
            path.unlink(missing_ok=True)
            self.kubectl("delete", "livemigration", canary, "-n", self.namespace, "--ignore-not-found",
                         "--wait=false", check=False)

    # -- identities ------------------------------------------------------------------------
    def identity(self, component: str, node_name: str | None = None, duration: str = "1h") -> Identity:
        """A token and kubeconfig for ``component``; agents pass ``node_name`` to get a token
        bound to a placeholder Pod on that node (what the admission policy requires)."""
        sa = self.service_account(component)
        pod = None
        if node_name is not None:
            if placeholder_node(self.kubectl, node_name):
                self.nodes.append(node_name)
            pod = placeholder_pod(self.kubectl, self.namespace, sa, node_name)
            self.pods.append(pod)
        token = request_token(self.kubectl, self.namespace, sa, duration, bound_pod=pod)
        label = component if node_name is None else f"{component}@{node_name}"
        path = self.out_dir / f"{label.replace('@', '-at-')}.kubeconfig"
        write_token_kubeconfig(self.admin_kubeconfig, token, path, user=label)
        return Identity(component, sa, self.namespace, path, token, node_name)

    def all(self, agent_hosts: Iterable[str] = ()) -> dict[str, Identity]:
        """operator, metadata, agent (unbound) and agent@HOST for each host."""
        out = {c: self.identity(c) for c in COMPONENTS}
        for host in agent_hosts:
            out[f"agent@{host}"] = self.identity("agent", node_name=host)
        return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"), required=not os.environ.get("KUBECONFIG"))
    p.add_argument("--namespace", required=True, help="namespace of the ServiceAccounts (created if missing)")
    p.add_argument("--out", required=True, help="directory for the kubeconfigs")
    p.add_argument("--release", default="ferry")
    p.add_argument("--agent-host", action="append", default=[], help="host (node) name; repeatable")
    p.add_argument("--admission-policy", action="store_true", help="also apply the agent admission policy")
    p.add_argument("--peering", action="store_true", help="also apply kopf's peering CRDs and the peering object")
    p.add_argument("--set-json", action="append", default=[], metavar="KEY=JSON",
                   help="chart value, e.g. rbac.secretNamespaces='[\"a\"]'")
    p.add_argument("--kubectl", default=os.environ.get("KUBECTL", str(pathlib.Path.home() / ".cache/ferry/bin/kubectl")))
    args = p.parse_args(argv)

    values: dict[str, Any] = {}
    for item in args.set_json:
        key, _, raw = item.partition("=")
        node = values
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = json.loads(raw)

    def kubectl(*a: str, input: str | None = None, check: bool = True, kubeconfig: str | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run([args.kubectl, "--kubeconfig", kubeconfig or args.kubeconfig, *a], input=input,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise SystemExit(f"kubectl {' '.join(a)} failed: {proc.stderr.strip()}")
        return proc

    if kubectl("get", "namespace", args.namespace, check=False).returncode != 0:
        kubectl("create", "namespace", args.namespace)
    chart = ChartIdentities(kubectl, args.kubeconfig, args.namespace, args.out, release=args.release,
                            values=values, admission_policy=args.admission_policy, peering=args.peering)
    chart.setup()
    for name, ident in chart.all(args.agent_host).items():
        print(f"{name}={ident.kubeconfig}")
    if chart.peering_name() and args.peering:
        print(f"peering={chart.peering_name()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
