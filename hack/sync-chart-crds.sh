#!/usr/bin/env bash
# Copy the CRDs (crds/, the single source) into the Helm chart (charts/ferry/crds/), which
# must ship the very same files. The chart's crds/ also holds kopf-peerings.yaml (kopf's peering
# CRDs, not ferry's), which this script leaves alone.
#
#   hack/sync-chart-crds.sh           copy; remove chart copies of CRDs that crds/ no longer has
#   hack/sync-chart-crds.sh --check   change nothing; exit 1 and name the files that differ
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="${ROOT}/crds"
DST="${ROOT}/charts/ferry/crds"
KEEP="kopf-peerings.yaml"   # chart-only file

mode="${1:-sync}"
case "${mode}" in
  sync|--check) ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

mkdir -p "${DST}"
status=0
for src in "${SRC}"/*.yaml; do
  name="$(basename "${src}")"
  if ! cmp -s "${src}" "${DST}/${name}"; then
    if [ "${mode}" = --check ]; then
      echo "differs: charts/ferry/crds/${name} (run hack/sync-chart-crds.sh)" >&2
      status=1
    else
      cp "${src}" "${DST}/${name}"
      echo "copied crds/${name}"
    fi
  fi
done
for dst in "${DST}"/*.yaml; do
  name="$(basename "${dst}")"
  [ "${name}" = "${KEEP}" ] && continue
  if [ ! -e "${SRC}/${name}" ]; then
    if [ "${mode}" = --check ]; then
      echo "stale: charts/ferry/crds/${name} has no counterpart in crds/" >&2
      status=1
    else
      rm -f "${dst}"
      echo "removed stale charts/ferry/crds/${name}"
    fi
  fi
done
exit "${status}"
