#!/usr/bin/env bash
# Kubeconfigs for ferry's components with the identities the Helm chart gives them: applies the
# chart's ServiceAccounts, (Cluster)Roles and bindings to a cluster, requests a token for each
# ServiceAccount (TokenRequest API, 1 h) and writes one kubeconfig per identity. Agents with
# --agent-host get a token bound to a placeholder Pod on that node, as a DaemonSet pod has.
#
#   hack/rbac-tokens.sh --namespace NS --out DIR [--release ferry] [--agent-host host-a ...]
#                       [--admission-policy] [--peering] [--set-json rbac.secretNamespaces='["ns"]']
#
# Uses $KUBECONFIG (default: the local control plane of hack/cluster.sh) as the admin identity.
# Prints NAME=KUBECONFIG lines: operator, agent, metadata, agent@HOST...
# Cluster-scoped objects (ClusterRoles, bindings, policy) stay until deleted:
#   helm template RELEASE charts/ferry -n NS --kube-version 1.37.2 | kubectl delete -f - --ignore-not-found
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$("${ROOT}/hack/build-binaries.sh")"
if [ -z "${KUBECONFIG:-}" ]; then
  eval "$("${ROOT}/hack/cluster.sh" env)"
fi
if [ -x "${ROOT}/.venv/bin/python" ]; then PYTHON="${ROOT}/.venv/bin/python"; else PYTHON="$(command -v python3)"; fi
HELM="${BIN}/helm" KUBECTL="${BIN}/kubectl" exec "${PYTHON}" "${ROOT}/tests/integration/rbac.py" \
  --kubeconfig "${KUBECONFIG}" --kubectl "${BIN}/kubectl" "$@"
