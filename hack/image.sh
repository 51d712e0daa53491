#!/usr/bin/env bash
# Build ferry's image from operator/Dockerfile, the same file a user gives `docker build`,
# without Docker or a registry: buildah (chroot isolation, vfs storage) on a Debian base made
# here with debootstrap, standing in for the Dockerfile's python:3.11-slim (bookworm's
# python3 is 3.11). Writes a docker-archive that `hack/nodes.sh load` imports into the nodes.
#
#   hack/image.sh                 build (warm: only the changed layers), print the archive path
#   FERRY_IMAGE=localhost/ferry:dev (default) the reference the image gets
#   FERRY_IMAGE_QEMU=1            build the qemu variant (--build-arg WITH_QEMU=true)
#
# Caches under ${FERRY_CACHE:-~/.cache/ferry}/images: the base root file system (keyed by the
# Debian suite and its package list), buildah's storage with the Dockerfile's layers
# (dependencies are one layer, rebuilt only when pyproject.toml changes) and the archive.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "${HERE}/.." && pwd)"
# shellcheck source=hack/versions.env
source "${HERE}/versions.env"
CACHE="${FERRY_CACHE:-${HOME}/.cache/ferry}"
IMAGES="${CACHE}/images"
IMAGE="${FERRY_IMAGE:-localhost/ferry:dev}"
QEMU="${FERRY_IMAGE_QEMU:-0}"
MIRROR="${FERRY_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# What python:3.11-slim gives the Dockerfile: python (3.11) with venv and pip's certificates.
BASE_PACKAGES="python3,python3-venv,python-is-python3,ca-certificates"

log() { echo "image: $*" >&2; }
die() { echo "image: $*" >&2; exit 1; }

for b in buildah debootstrap; do
  command -v "${b}" >/dev/null || die "${b} not found (Debian: apt-get install buildah debootstrap)"
done
[ "$(id -u)" -eq 0 ] || die "run as root (debootstrap and buildah's chroot isolation need it)"

mkdir -p "${IMAGES}"
BUILDAH=(buildah --storage-driver vfs --root "${IMAGES}/storage" --runroot "${IMAGES}/runroot")

# The machine's own CA certificates (e.g. a TLS-intercepting proxy's) go into the base, as they
# would be in a company's base image: the Dockerfile's pip then trusts what this machine trusts.
EXTRA_CAS=(/usr/local/share/ca-certificates/*.crt)
[ -e "${EXTRA_CAS[0]}" ] || EXTRA_CAS=()
base_key="$( (printf '%s %s %s\n' "${DEBIAN_SUITE}" "${BASE_PACKAGES}" "${MIRROR}"; cat "${EXTRA_CAS[@]}" /dev/null) | sha256sum | cut -c1-12)"
BASE_REF="localhost/ferry-base:${DEBIAN_SUITE}-${base_key}"

unmount_under() {  # unmount_under DIR: every mount below DIR, deepest first
  local m
  while read -r m; do umount -l "${m}" 2>/dev/null || true; done \
    < <(awk -v d="$1/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r)
}

build_base() {
  if "${BUILDAH[@]}" inspect --type image "${BASE_REF}" >/dev/null 2>&1; then
    return 0
  fi
  local t0=${SECONDS} work="${IMAGES}/base-${base_key}"
  log "making the ${DEBIAN_SUITE} base with debootstrap (${BASE_PACKAGES}); cold: about 3 min"
  unmount_under "${work}"; rm -rf "${work}"; mkdir -p "${work}"
  trap 'unmount_under "${work}"' EXIT
  debootstrap --variant=minbase --include="${BASE_PACKAGES}" "${DEBIAN_SUITE}" "${work}/rootfs" "${MIRROR}" \
    > "${work}/debootstrap.log" 2>&1 || die "debootstrap failed; see ${work}/debootstrap.log"
  # debootstrap may leave the machine's /proc mounted in the new root.
  unmount_under "${work}"
  if [ "${#EXTRA_CAS[@]}" -gt 0 ]; then
    cp "${EXTRA_CAS[@]}" "${work}/rootfs/usr/local/share/ca-certificates/"
    chroot "${work}/rootfs" update-ca-certificates >/dev/null 2>&1 || die "update-ca-certificates failed in the base"
  fi
  rm -rf "${work}/rootfs/var/cache/apt/archives/"*.deb "${work}/rootfs/var/lib/apt/lists/"*
  unmount_under "${work}"
  tar -C "${work}/rootfs" --one-file-system --numeric-owner -cf "${work}/rootfs.tar" .
  rm -rf "${work}/rootfs"
  printf 'FROM scratch\nADD rootfs.tar /\nCMD ["/bin/bash"]\n' > "${work}/Containerfile"
  "${BUILDAH[@]}" bud --isolation chroot -f "${work}/Containerfile" -t "${BASE_REF}" "${work}" >/dev/null 2>&1 \
    || die "could not import the base root file system"
  rm -rf "${work}"
  trap - EXIT
  log "base ${BASE_REF} in $((SECONDS - t0))s"
}

build_image() {
  local t0=${SECONDS} args=()
  [ "${QEMU}" = 1 ] && args+=(--build-arg WITH_QEMU=true)
  log "building ${IMAGE} from operator/Dockerfile (FROM ${BASE_REF})"
  "${BUILDAH[@]}" bud --isolation chroot --layers \
    --build-arg "PYTHON_IMAGE=${BASE_REF}" "${args[@]}" \
    -f "${ROOT}/operator/Dockerfile" -t "${IMAGE}" "${ROOT}" > "${IMAGES}/build.log" 2>&1 \
    || die "buildah bud failed; last lines of ${IMAGES}/build.log:
$(tail -n 30 "${IMAGES}/build.log")"
  log "built ${IMAGE} in $((SECONDS - t0))s"
}

write_archive() {  # a docker-archive named like the image, rewritten only when the image changed
  local id name archive
  id="$("${BUILDAH[@]}" inspect --type image --format '{{.FromImageID}}' "${IMAGE}")"
  name="$(echo "${IMAGE}" | tr '/:' '__')"
  archive="${IMAGES}/${name}.tar"
  if [ ! -f "${archive}" ] || [ "$(cat "${archive}.id" 2>/dev/null)" != "${id}" ]; then
    rm -f "${archive}"
    "${BUILDAH[@]}" push "${IMAGE}" "docker-archive:${archive}:${IMAGE}" >/dev/null 2>&1 \
      || die "could not write ${archive}"
    echo "${id}" > "${archive}.id"
  fi
  echo "${archive}"
}

build_base
build_image
write_archive
