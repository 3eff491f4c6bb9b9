#!/bin/sh
# A Debian bookworm + Python 3.11 base image made on this machine, for building the images where no image
# registry is reachable (an air-gapped builder, a CI runner behind a proxy). It stands in for the public
# python:3.11-slim-bookworm: same Debian release, same Python minor version, ca-certificates, a shell.
#
#   deploy/docker/local-base-image.sh [TAG]                    # default TAG: flylora-local/python:3.11-bookworm
#   docker build --build-arg PYTHON_IMAGE=flylora-local/python:3.11-bookworm --target gateway .
#
# Needs root, debootstrap (Debian package) and a reachable Debian mirror ($DEBIAN_MIRROR, default
# http://deb.debian.org/debian). Takes about a minute; the image is ~150 MB.
set -eu

TAG=${1:-flylora-local/python:3.11-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DOCKER=${DOCKER:-docker}

command -v debootstrap >/dev/null || { echo "debootstrap not found (apt-get install debootstrap)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "debootstrap needs root" >&2; exit 1; }

root=$(mktemp -d /tmp/flylora-base.XXXXXX)
trap 'rm -rf "$root"' EXIT INT TERM

# minbase: essential packages and apt only; Python, venv, the CA store and useradd on top.
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,passwd bookworm "$root" "$MIRROR" \
    > "$root.log" 2>&1 || { tail -20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
    "$root"/usr/share/man/* "$root"/usr/share/locale/*
# The python:3.11 images call the interpreter `python` too.
ln -sf python3 "$root/usr/bin/python"

# `docker import` keeps no environment: set what a Debian image normally has.
tar --numeric-owner -C "$root" -c . | "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    - "$TAG" >/dev/null
echo "$TAG"
