#!/usr/bin/env bash
# Builds the image `conveyor:local` with no base image and no registry: release binaries built
# here, plus exactly the shared libraries `ldd` says they load, on an empty root filesystem.
# Then `CONVEYOR_DOCKERFILE=docker/Dockerfile.local docker-compose up` uses it.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked -p loader-server -p trainer-client
rootfs=target/docker-rootfs
rm -rf "$rootfs"
mkdir -p "$rootfs/usr/local/bin" "$rootfs/tmp" "$rootfs/data"
cp target/release/loader-server target/release/trainer-client "$rootfs/usr/local/bin/"
strip "$rootfs"/usr/local/bin/*
for binary in target/release/loader-server target/release/trainer-client; do
    ldd "$binary" | awk '/=> \// {print $3} /^[[:space:]]*\// {print $1}' | while read -r lib; do
        mkdir -p "$rootfs$(dirname "$lib")"
        cp -L "$lib" "$rootfs$lib"
    done
done
# The system's CA certificates, so that loaders can read https:// and s3:// datasets on AWS.
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    mkdir -p "$rootfs/etc/ssl/certs"
    cp -L /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/"
fi
docker build -q -f docker/Dockerfile.local -t conveyor:local .
echo "built conveyor:local ($(du -sh "$rootfs" | cut -f1) root filesystem)"
