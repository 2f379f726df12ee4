#!/usr/bin/env bash
# signerd developer entry point. Each command installs what it needs first.
#
#   ./dev.sh serve   install SoftHSM + signerd, start the daemon on its embedded default
#   ./dev.sh test    install SoftHSM + signerd + test tools, run the whole test suite
#   ./dev.sh bench   install, then run the benchmark (writes bench/results/latest.json)
#   ./dev.sh packages serve|test   print the Debian packages that command installs, one a line
set -euo pipefail
cd "$(dirname "$0")"

# softhsm2: the development token.
APT_PACKAGES=(softhsm2 opensc python3 python3-venv python3-pip)
# The TPM 2.0 token of the test suite (tests/_tpm.py): the simulator, its tools, the
# tpm2-pkcs11 module and tpm2_ptool, and the resource manager tpm2-abrmd with its TCTI and
# the D-Bus daemon it talks over.
# systemd-analyze and logrotate check the shipped unit and logrotate snippet (deploy/).
# postgresql: the watermark store shared by replicas (tests/_postgres.py starts a server).
APT_TEST_PACKAGES=(swtpm swtpm-tools tpm2-tools libtpm2-pkcs11-1 libtpm2-pkcs11-tools
                   tpm2-abrmd libtss2-tcti-tabrmd0 dbus-daemon dbus-bin systemd logrotate
                   nftables  # tests/test_listeners.py: nft -c -f deploy/nftables/signerd.nft
                   postgresql)  # tests/_postgres.py: the watermark store's PostgreSQL server
# The benchmark's Go peer, stock notary-signer (/usr/bin/notary-signer): tests/test_bench.py
# runs the benchmark, so the test command installs it too.
APT_TEST_PACKAGES+=(notary)
APT_LOCK_WAIT=900  # seconds apt-get waits for another apt or dpkg to finish
VENV=${SIGNERD_VENV:-.venv}

install_system() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo=sudo
        echo "installing Debian packages: ${missing[*]}" >&2
        # Wait for the apt lock instead of failing when another apt-get holds it.
        $sudo apt-get -o DPkg::Lock::Timeout=$APT_LOCK_WAIT update -qq
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=$APT_LOCK_WAIT \
            install -y -qq "${missing[@]}" >/dev/null
    fi
}

install_python() {
    local extra=$1
    # An editable install: only a changed pyproject.toml (dependencies, entry
    # points) needs pip again, so a restart does not need the package index.
    local stamp="$VENV/.installed${extra}"
    local want
    want=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        return
    fi
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
    "$VENV/bin/python" -m pip install -q -e ".$extra"
    echo "$want" > "$stamp"
}

case "${1:-}" in
    serve)
        shift
        install_system "${APT_PACKAGES[@]}"
        install_python ""
        exec "$VENV/bin/signerd" serve "$@"
        ;;
    test)
        shift
        install_system "${APT_PACKAGES[@]}" "${APT_TEST_PACKAGES[@]}"
        install_python "[test]"
        "$VENV/bin/ruff" check signerd tests bench tools
        "$VENV/bin/mypy"
        exec "$VENV/bin/pytest" -q --cov=signerd --cov-branch --cov-report=term:skip-covered \
            --cov-fail-under=85 "$@"
        ;;
    bench)
        shift
        install_system "${APT_PACKAGES[@]}" "${APT_TEST_PACKAGES[@]}"
        install_python "[test]"
        exec "$VENV/bin/python" -m bench.run "$@"
        ;;
    packages)  # tests/test_install.py checks the suite's programs against this list
        case "${2:-}" in
            serve) printf '%s\n' "${APT_PACKAGES[@]}" ;;
            test) printf '%s\n' "${APT_PACKAGES[@]}" "${APT_TEST_PACKAGES[@]}" ;;
            *) echo "usage: ./dev.sh packages serve|test" >&2; exit 2 ;;
        esac
        ;;
    *)
        echo "usage: ./dev.sh serve|test|bench|packages [args...]" >&2
        exit 2
        ;;
esac
