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
# Yubico's PKCS#11 module and its HTTP connector backend, for the YubiHSM 2 of the test
# suite (tests/_yubihsm, a software device behind the real module). Debian ships them in
# bookworm-backports only; install_backports pins that suite to these packages alone.
APT_BACKPORTS_PACKAGES=(yubihsm-pkcs11 libyubihsm2 libyubihsm-http2)
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

# The first mirror URI that serves the machine's own release, from its apt sources: deb822
# (.sources: URIs/Suites fields) or one-line (deb [options] URI suite components). Printed
# as "URI<TAB>keyring" (keyring: the stanza's Signed-By, or empty).
apt_mirror() {
    local codename=$1
    local files=()
    [ -f /etc/apt/sources.list ] && files+=(/etc/apt/sources.list)
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && files+=("$f")
    done
    ((${#files[@]})) || return 1
    awk -v want="$codename" '
        function has_suite(list,   n, i, a) {
            n = split(list, a, /[ \t]+/)
            for (i = 1; i <= n; i++) if (a[i] == want) return 1
            return 0
        }
        function flush() {
            if (deb && uri != "" && has_suite(suites)) { print uri "\t" key; found = 1; exit }
            deb = 0; uri = ""; suites = ""; key = ""
        }
        FNR == 1 { flush() }
        FILENAME ~ /\.sources$/ {
            if ($0 ~ /^[ \t]*$/) { flush(); next }
            if ($0 ~ /^[ \t]*#/) next
            if ($1 == "Types:") { deb = ($0 ~ /[ \t]deb([ \t]|$)/) }
            else if ($1 == "URIs:") { uri = $2 }
            else if ($1 == "Suites:") { suites = substr($0, index($0, ":") + 1) }
            else if ($1 == "Signed-By:") { key = $2 }
            next
        }
        $1 == "deb" {
            i = 2
            if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
            if ($(i + 1) == want) { print $i "\t"; found = 1; exit }
        }
        END { if (!found) flush() }
    ' "${files[@]}"
}

install_backports() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    local codename
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    local line
    line=$(apt_mirror "$codename") || true
    if [ -z "$codename" ] || [ -z "$line" ]; then
        echo "cannot find this machine's Debian mirror in its apt sources; install ${missing[*]} from ${codename:-its release}-backports by hand" >&2
        return 1
    fi
    local uri=${line%%$'\t'*} keyring=${line#*$'\t'}
    local suite="$codename-backports"
    echo "enabling $suite for ${missing[*]} only (mirror $uri)" >&2
    {
        echo "Types: deb"
        echo "URIs: $uri"
        echo "Suites: $suite"
        echo "Components: main"
        [ -z "$keyring" ] || echo "Signed-By: $keyring"
    } | $sudo tee /etc/apt/sources.list.d/signerd-backports.sources >/dev/null
    # Nothing else is installed or upgraded from backports: every package there stays at
    # priority 100 (below the release's 500, so never chosen over it), and only ours are
    # raised to 500, which a newer version then wins (apt_preferences(5)).
    {
        echo "Package: *"
        echo "Pin: release n=$suite"
        echo "Pin-Priority: 100"
        echo
        echo "Package: $*"
        echo "Pin: release n=$suite"
        echo "Pin-Priority: 500"
    } | $sudo tee /etc/apt/preferences.d/signerd-backports >/dev/null
    $sudo apt-get -o DPkg::Lock::Timeout=$APT_LOCK_WAIT update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=$APT_LOCK_WAIT \
        install -y -qq "${missing[@]}" >/dev/null
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
        install_backports "${APT_BACKPORTS_PACKAGES[@]}"
        install_python "[test]"
        "$VENV/bin/ruff" check signerd tests bench tools
        "$VENV/bin/mypy"
        exec "$VENV/bin/pytest" -q --cov=signerd --cov-branch --cov-report=term:skip-covered \
            --cov-fail-under=85 "$@"
        ;;
    bench)
        shift
        install_system "${APT_PACKAGES[@]}" "${APT_TEST_PACKAGES[@]}"
        install_backports "${APT_BACKPORTS_PACKAGES[@]}"
        install_python "[test]"
        exec "$VENV/bin/python" -m bench.run "$@"
        ;;
    packages)  # tests/test_install.py checks the suite's programs against this list
        case "${2:-}" in
            serve) printf '%s\n' "${APT_PACKAGES[@]}" ;;
            test) printf '%s\n' "${APT_PACKAGES[@]}" "${APT_TEST_PACKAGES[@]}" \
                         "${APT_BACKPORTS_PACKAGES[@]}" ;;
            *) echo "usage: ./dev.sh packages serve|test" >&2; exit 2 ;;
        esac
        ;;
    *)
        echo "usage: ./dev.sh serve|test|bench|packages [args...]" >&2
        exit 2
        ;;
esac
