#!/usr/bin/env bash
# Validates the manifests against the Kubernetes OpenAPI schemas (kubernetes-validate, offline).
set -euo pipefail
cd "$(dirname "$0")/../.."
.venv/bin/python -m pip install --quiet --disable-pip-version-check kubernetes-validate==1.37.0
.venv/bin/kubernetes-validate --strict -k 1.34.0 deploy/k8s/loader.yaml deploy/k8s/trainer-job.yaml
