#!/usr/bin/env bash
# Prepare a fresh Debian/Ubuntu machine for `make demo` / `make test`:
# the OS packages backhaul's tests and demo use (installed when run as root,
# named otherwise), then a virtualenv in .venv with backhaul and its extras.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
[ -x /usr/sbin/sshd ] || command -v sshd >/dev/null 2>&1 || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
command -v ssh-keygen >/dev/null 2>&1 || need+=(openssh-client)
command -v tar >/dev/null 2>&1 || need+=(tar)
command -v gzip >/dev/null 2>&1 || need+=(gzip)
command -v pigz >/dev/null 2>&1 || need+=(pigz)
# bsdtar: an independent reader of the archives backhaul writes (tests).
command -v bsdtar >/dev/null 2>&1 || need+=(libarchive-tools)
# rsync: the baseline of the benchmark's delta section (bench/delta.py).
command -v rsync >/dev/null 2>&1 || need+=(rsync)
command -v python3 >/dev/null 2>&1 || need+=(python3)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
# Real servers the monitoring tests run: Prometheus (with promtool) and a
# headless Chromium for the status page.
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
# A throwaway PostgreSQL cluster for the catalog contract suite (initdb and
# postgres live in /usr/lib/postgresql/N/bin on Debian, outside PATH).
command -v initdb >/dev/null 2>&1 || compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null \
    || need+=(postgresql)

if [ ${#need[@]} -gt 0 ]; then
    mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bootstrap: installing ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        if [[ " ${need[*]} " == *" postgresql "* ]] && [ ! -e /etc/postgresql-common/createcluster.conf ]; then
            # The tests make their own throwaway clusters: no system-wide one.
            mkdir -p /etc/postgresql-common
            echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf
        fi
        apt-get update -qq
        UCF_FORCE_CONFFOLD=1 apt-get install -y -qq --no-install-recommends \
            -o Dpkg::Options::=--force-confold "${need[@]}" >/dev/null
    else
        echo "bootstrap: missing OS packages: ${need[*]}" >&2
        echo "bootstrap: install them with: sudo apt-get install ${need[*]}" >&2
        exit 1
    fi
fi

python3 - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"bootstrap: backhaul needs Python >= 3.11, this is {sys.version.split()[0]}")
PY

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=.venv/.backhaul-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test]'
    touch "$stamp"
fi
