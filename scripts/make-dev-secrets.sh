#!/usr/bin/env bash
# Writes development secrets for the secure compose setup (docker-compose.secure.yml) into
# deploy/secrets/ (git-ignored): a CA, a loader certificate for the names `loader` and
# `localhost`, a client certificate, and a random bearer token. Keeps files that exist, so
# loaders already running keep matching credentials; delete the directory to start over.
# For production, put certificates from your own CA and a token from your secret store there.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=deploy/secrets
mkdir -p "$dir"
cd "$dir"
if [ ! -f ca.pem ]; then
    openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=conveyor dev CA" \
        -keyout ca.key -out ca.pem 2>/dev/null
fi
issue() {
    local name=$1 cn=$2 san=$3
    [ -f "$name.pem" ] && return 0
    openssl req -newkey rsa:2048 -nodes -subj "/CN=$cn" -keyout "$name.key" -out "$name.csr" 2>/dev/null
    printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\n' "$san" > "$name.ext"
    openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 365 \
        -extfile "$name.ext" -out "$name.pem" 2>/dev/null
    rm -f "$name.csr" "$name.ext"
}
issue loader loader "DNS:loader,DNS:localhost,IP:127.0.0.1"
issue client trainer "DNS:trainer"
if [ ! -f token ]; then
    od -An -N32 -tx1 /dev/urandom | tr -d ' \n' > token
fi
# The loader and trainer images run as root; tighten for other setups.
chmod 644 ./*.pem token
chmod 600 ca.key
chmod 644 loader.key client.key
echo "secrets in $PWD: ca.pem, loader.pem/.key, client.pem/.key, token"
