#!/usr/bin/env bash
# signerd developer entry point. Each command installs what it needs first.
#
#   ./dev.sh serve   install SoftHSM + signerd, start the daemon on its embedded default
#   ./dev.sh test    install SoftHSM + signerd + test tools, run the whole test suite
#   ./dev.sh bench   install, then run the benchmark (writes bench/results/latest.json)
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(softhsm2 opensc python3 python3-venv python3-pip)
VENV=${SIGNERD_VENV:-.venv}

install_system() {
    local missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo=sudo
        echo "installing Debian packages: ${missing[*]}" >&2
        $sudo apt-get update -qq
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

install_python() {
    local extra=$1
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
    "$VENV/bin/python" -m pip install -q -e ".$extra"
}

case "${1:-}" in
    serve)
        shift
        install_system
        install_python ""
        exec "$VENV/bin/signerd" serve "$@"
        ;;
    test)
        shift
        install_system
        install_python "[test]"
        "$VENV/bin/ruff" check signerd tests bench tools
        "$VENV/bin/mypy"
        exec "$VENV/bin/pytest" -q --cov=signerd --cov-branch --cov-report=term:skip-covered \
            --cov-fail-under=85 "$@"
        ;;
    bench)
        shift
        install_system
        install_python "[test]"
        exec "$VENV/bin/python" -m bench.run "$@"
        ;;
    *)
        echo "usage: ./dev.sh serve|test|bench [args...]" >&2
        exit 2
        ;;
esac
