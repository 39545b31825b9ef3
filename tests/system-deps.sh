#!/bin/sh
# Install the system packages the test suite needs (Debian/Ubuntu, as root).
#
# - Does nothing when every needed command is already there.
# - As root: apt-get update + install, without starting any service (sshd and tor
#   are started by the tests themselves, as ordinary processes).
# - Not root: says what to install; fails only when sshd itself is missing.
set -eu

PACKAGES="openssh-server openssh-client primesieve parallel tor iproute2 procps sudo chromium chromium-driver"

have() {
    # A command on PATH or in an sbin folder (not on PATH for ordinary users).
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]
}

missing=""
[ -x /usr/sbin/sshd ] || missing="$missing sshd"
for cmd in ssh-keygen primesieve parallel tor ip ps sudo chromium chromedriver; do
    have "$cmd" || missing="$missing $cmd"
done

if [ -z "$missing" ]; then
    echo "system-deps: all present (sshd ssh-keygen primesieve parallel tor ip ps sudo chromium chromedriver)"
    exit 0
fi
echo "system-deps: missing:$missing"

sshd_missing() { [ ! -x /usr/sbin/sshd ]; }

if [ "$(id -u 2>/dev/null || echo 1)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: cannot install here; as root run:"
    echo "  apt-get update && apt-get install -y --no-install-recommends $PACKAGES"
    if sshd_missing; then
        echo "system-deps: /usr/sbin/sshd is required by the tests" >&2
        exit 1
    fi
    echo "system-deps: tests that need the missing commands will be skipped"
    exit 0
fi

# Keep package scripts from starting services (ssh, tor): invoke-rc.d asks
# policy-rc.d, and 101 means "action forbidden". Only remove the file we created.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
    trap 'rm -f "$policy"; exit 130' INT TERM
fi

export DEBIAN_FRONTEND=noninteractive
tries=0
until apt-get update -q; do
    tries=$((tries + 1))
    [ "$tries" -lt 3 ] || { echo "system-deps: apt-get update failed" >&2; exit 1; }
    sleep 5
done
# shellcheck disable=SC2086  # word splitting of the package list is intended
apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    $PACKAGES </dev/null

if sshd_missing; then
    echo "system-deps: /usr/sbin/sshd still missing after install" >&2
    exit 1
fi
echo "system-deps: installed $PACKAGES"
