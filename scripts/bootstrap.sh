#!/usr/bin/env bash
# Create the virtual environment and install leasehold with its test tools.
# On Debian as root, installs the C headers mysqlclient builds against when they are missing.
set -euo pipefail
venv=${1:-.venv}
python=${PYTHON:-python3}

have_mysql_headers() { pkg-config --exists mysqlclient 2>/dev/null || pkg-config --exists libmariadb 2>/dev/null; }

apt_install() {
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "bootstrap: apt-get install $*" >&2
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    else
        echo "bootstrap: please install Debian packages: $*" >&2
        return 1
    fi
}

if ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then
    apt_install python3-venv
fi
if ! have_mysql_headers || ! command -v cc >/dev/null; then
    apt_install default-libmysqlclient-dev pkg-config build-essential || true
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
if have_mysql_headers; then
    "$venv/bin/python" -m pip install -q -e '.[dev,mysql,postgres]'
else
    # The embedded default needs no compiler; MySQL tests then skip locally (and fail under CI).
    echo "bootstrap: WARNING: no libmysqlclient headers; installing without the mysql extra" >&2
    "$venv/bin/python" -m pip install -q -e '.[dev,postgres]'
fi
