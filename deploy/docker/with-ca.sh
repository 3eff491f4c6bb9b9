#!/bin/sh
# Run a build command trusting an optional extra CA bundle: a corporate TLS proxy's root, for example.
#
#   RUN --mount=type=secret,id=ca-bundle --mount=type=bind,source=deploy/docker/with-ca.sh,target=/usr/local/bin/with-ca \
#       with-ca pip install ...
#   docker build --secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt ...
#
# The secret is mounted by BuildKit for one RUN only and never stored in a layer; this script appends it to
# the image's own CA store in a temporary file, points pip, Python's ssl, requests and apt at that file,
# and deletes it when the command ends. Without the secret it runs the command unchanged.
set -eu
secret=/run/secrets/ca-bundle
if [ ! -s "$secret" ]; then
    exec "$@"
fi
bundle=$(mktemp /tmp/ca-bundle.XXXXXX)
aptconf=$(mktemp /tmp/apt-ca.XXXXXX)
trap 'rm -f "$bundle" "$aptconf"' EXIT INT TERM
if [ -s /etc/ssl/certs/ca-certificates.crt ]; then
    cat /etc/ssl/certs/ca-certificates.crt > "$bundle"
fi
cat "$secret" >> "$bundle"
printf 'Acquire::https::CAInfo "%s";\n' "$bundle" > "$aptconf"
PIP_CERT=$bundle SSL_CERT_FILE=$bundle REQUESTS_CA_BUNDLE=$bundle CURL_CA_BUNDLE=$bundle APT_CONFIG=$aptconf "$@"
