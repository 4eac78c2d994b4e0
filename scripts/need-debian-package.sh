#!/usr/bin/env bash
# Make sure a Debian package a test needs is installed (used by `make browser` / `make postgres`).
#
#   need-debian-package.sh PACKAGE WHAT OVERRIDE SKIP CHECK...
#
# CHECK (a command) succeeds when the package's programs are there: then nothing happens.
# Else, as root with apt-get, PACKAGE is installed and CHECK must succeed afterwards; else it
# stops, naming the install command, the OVERRIDE variable (another location) and SKIP (the
# make variable that skips those tests). WHAT says which tests need it.
set -uo pipefail
package=$1 what=$2 override=$3 skip=$4
shift 4
"$@" >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's $package for $what (apt-get install $package)"
    if apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$package" >/dev/null && "$@" >/dev/null 2>&1; then
        exit 0
    fi
    echo "error: could not install Debian's package $package (apt-get install $package)" >&2
    exit 1
fi
echo "error: $what needs Debian's $package and it is not installed. On Debian/Ubuntu:" >&2
echo "    sudo apt-get install --no-install-recommends $package" >&2
echo "or name another location: make test $override=...; or skip those tests: make test $skip=skip" >&2
exit 1
