#!/bin/sh
# Install signerd from this checkout as a system service.
#
#   deploy/install.sh [--prefix DIR] [--unit-dir DIR] [--config-dir DIR]
#                     [--state-dir DIR] [--no-user] [--softhsm]
#
# 1. A virtual environment at PREFIX (default /opt/signerd) with signerd
#    installed from this checkout: Debian 12 refuses pip into the system
#    Python (PEP 668), and signerd is on no package index. Needs python3-venv.
# 2. The systemd unit, deploy/systemd/signerd.service with ExecStart set to
#    PREFIX/bin/signerd, into UNIT_DIR (default /etc/systemd/system).
# 3. CONFIG_DIR/signerd.toml and policy.toml (default /etc/signerd) from
#    deploy/*.toml.example, each only if it does not exist yet.
# 4. Unless --no-user: the system user and group signerd (as root only).
# 5. With --softhsm: a SoftHSM token "signerd-online" for the signerd user,
#    its token directory STATE_DIR/tokens (default /var/lib/signerd/tokens),
#    CONFIG_DIR/softhsm2.conf, and random PINs in CONFIG_DIR/online.pin and
#    online.so-pin (mode 0600, owned by signerd; never in argv). Needs softhsm2.
#
# Then: TLS files in CONFIG_DIR/tls (see signerd.toml), rules in policy.toml,
#   runuser -u signerd -- PREFIX/bin/signerd check-config --config CONFIG_DIR/signerd.toml
#   systemctl daemon-reload && systemctl enable --now signerd
# Running it again upgrades signerd in the venv and rewrites the unit; the
# config, policy, PINs and token are kept.
set -eu

PREFIX=/opt/signerd
UNIT_DIR=/etc/systemd/system
CONFIG_DIR=/etc/signerd
STATE_DIR=/var/lib/signerd
MAKE_USER=yes
SOFTHSM=no
PYTHON=${PYTHON:-python3}

usage() {
    sed -n '3,4p' "$0" | sed 's/^# *//' >&2
    exit 2
}
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) PREFIX=$2; shift 2 ;;
        --unit-dir) UNIT_DIR=$2; shift 2 ;;
        --config-dir) CONFIG_DIR=$2; shift 2 ;;
        --state-dir) STATE_DIR=$2; shift 2 ;;
        --no-user) MAKE_USER=no; shift ;;
        --softhsm) SOFTHSM=yes; shift ;;
        -h|--help) usage ;;
        *) echo "install.sh: unknown option $1" >&2; usage ;;
    esac
done
case "$PREFIX" in /*) ;; *) echo "install.sh: --prefix must be an absolute path" >&2; exit 2 ;; esac

CHECKOUT=$(cd "$(dirname "$0")/.." && pwd)
say() { echo "install.sh: $*"; }

# 1. the venv
if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    echo "install.sh: $PYTHON cannot make a venv; install python3-venv (apt-get install python3-venv)" >&2
    exit 1
fi
[ -x "$PREFIX/bin/python" ] || "$PYTHON" -m venv "$PREFIX"
"$PREFIX/bin/python" -m pip install --quiet --disable-pip-version-check "$CHECKOUT"
say "signerd $("$PREFIX/bin/signerd" --version | cut -d' ' -f2) in $PREFIX"

# 2. the unit, ExecStart at this prefix's signerd and this config
mkdir -p "$UNIT_DIR"
sed -e "s#^ExecStart=/opt/signerd/bin/signerd serve --config /etc/signerd/signerd.toml\$#ExecStart=$PREFIX/bin/signerd serve --config $CONFIG_DIR/signerd.toml#" \
    -e "s#/opt/signerd/bin/signerd check-config --config /etc/signerd/signerd.toml#$PREFIX/bin/signerd check-config --config $CONFIG_DIR/signerd.toml#" \
    "$CHECKOUT/deploy/systemd/signerd.service" > "$UNIT_DIR/signerd.service.tmp"
grep -q "^ExecStart=$PREFIX/bin/signerd serve " "$UNIT_DIR/signerd.service.tmp" || {
    echo "install.sh: the unit's ExecStart is not the one this script rewrites" >&2; exit 1; }
chmod 0644 "$UNIT_DIR/signerd.service.tmp"
mv "$UNIT_DIR/signerd.service.tmp" "$UNIT_DIR/signerd.service"
say "unit $UNIT_DIR/signerd.service"

# 4. the user (before the files it owns)
OWNER=
if [ "$MAKE_USER" = yes ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install.sh: making the signerd user takes root; or pass --no-user" >&2
        exit 1
    fi
    id signerd >/dev/null 2>&1 || useradd --system --user-group --home-dir /var/lib/signerd \
        --shell /usr/sbin/nologin signerd
    OWNER=signerd
fi
own() { [ -z "$OWNER" ] || chown "$OWNER:$OWNER" "$@"; }

# 3. config and policy, from the templates; paths moved to these directories
umask 077
mkdir -p "$CONFIG_DIR"
chmod 0750 "$CONFIG_DIR"
own "$CONFIG_DIR"
for name in signerd policy; do
    if [ ! -e "$CONFIG_DIR/$name.toml" ]; then
        sed -e "s#/etc/signerd#$CONFIG_DIR#g" -e "s#/var/lib/signerd#$STATE_DIR#g" \
            -e "s#/opt/signerd#$PREFIX#g" \
            "$CHECKOUT/deploy/$name.toml.example" > "$CONFIG_DIR/$name.toml"
        chmod 0640 "$CONFIG_DIR/$name.toml"
        own "$CONFIG_DIR/$name.toml"
        say "config $CONFIG_DIR/$name.toml (edit it)"
    fi
done

# 5. a SoftHSM token for the signerd user
if [ "$SOFTHSM" = yes ]; then
    module=$("$PREFIX/bin/python" -c 'from signerd import embedded; print(embedded.softhsm_module())') || exit 1
    mkdir -p "$STATE_DIR/tokens"
    own "$STATE_DIR" "$STATE_DIR/tokens"
    sed "s#@TOKENDIR@#$STATE_DIR/tokens#" "$CHECKOUT/signerd/data/softhsm2.conf.in" \
        > "$CONFIG_DIR/softhsm2.conf"
    chmod 0644 "$CONFIG_DIR/softhsm2.conf"
    sed -i "s#^module = \"/usr/lib/softhsm/libsofthsm2.so\"#module = \"$module\"#" \
        "$CONFIG_DIR/signerd.toml"
    if [ -e "$CONFIG_DIR/online.pin" ]; then
        say "SoftHSM token kept (PIN $CONFIG_DIR/online.pin exists)"
    else
        for pin in online.pin online.so-pin; do  # random, written by the shell: never in argv
            head -c 24 /dev/urandom | base64 | tr -d '\n/+=' > "$CONFIG_DIR/$pin"
            chmod 0600 "$CONFIG_DIR/$pin"
            own "$CONFIG_DIR/$pin"
        done
        as_owner=""
        [ -z "$OWNER" ] || as_owner="runuser -u $OWNER --"
        # PKCS#11 C_InitToken/C_InitPIN with the PINs read from the files
        # (softhsm2-util would take them in argv); the token's files are the owner's.
        $as_owner "$PREFIX/bin/python" - "$module" "$CONFIG_DIR" <<'EOF'
import sys
from pathlib import Path

from signerd import embedded

module, config = sys.argv[1], Path(sys.argv[2])
pin = (config / "online.pin").read_bytes().strip()
so_pin = (config / "online.so-pin").read_bytes().strip()
embedded.init_softhsm_token(module, config / "softhsm2.conf", "signerd-online", pin, so_pin)
EOF
        say "SoftHSM token signerd-online in $STATE_DIR/tokens, PIN in $CONFIG_DIR/online.pin"
    fi
fi
say "next: TLS files in $CONFIG_DIR/tls, rules in $CONFIG_DIR/policy.toml, then" \
    "'$PREFIX/bin/signerd check-config --config $CONFIG_DIR/signerd.toml'"
