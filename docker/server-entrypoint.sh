#!/bin/sh
# Entrypoint of the docker-compose demo server (docker/server.Dockerfile).
#
# Publishes backhauld's SSH public key for the demo nodes, then becomes
# backhauld (arguments are passed through). backhauld makes its Ed25519 key at
# <data-dir>/ssh/id_ed25519 on first start; a background helper waits for that
# file, derives the public line and writes it atomically (temp file + rename)
# to $BACKHAUL_PUBKEY_FILE, where fixtures/sshd/node-entrypoint.sh waits for it
# and installs it as the "backup" user's authorized key.
set -eu

DATA_DIR=${BACKHAUL_DATA_DIR:-/data}
KEY=$DATA_DIR/ssh/id_ed25519
PUBKEY_FILE=${BACKHAUL_PUBKEY_FILE:-/keys/backhaul.pub}

publish_key() {
    waited=0
    until [ -s "$KEY" ]; do
        if [ "$waited" -ge 600 ]; then
            echo "server-entrypoint: no key at $KEY after 300 s; nodes will not accept it" >&2
            return 1
        fi
        sleep 0.5
        waited=$((waited + 1))
    done
    # paramiko ships with backhaul[server]; the server writes the key with a
    # rename, so an existing file is complete.
    line=$(python - "$KEY" <<'PY'
import os
import sys

import paramiko

key = paramiko.Ed25519Key.from_private_key_file(sys.argv[1])
# The comment backhauld gives the same key (`backhaul pubkey` prints this line).
print(key.get_name(), key.get_base64(), f"backhaul@{os.uname().nodename}")
PY
)
    tmp="$PUBKEY_FILE.tmp.$$"
    printf '%s\n' "$line" > "$tmp"
    chmod 0644 "$tmp"
    mv -f "$tmp" "$PUBKEY_FILE"
    echo "server-entrypoint: public key written to $PUBKEY_FILE: $line" >&2
}

# A key left on the shared volume by an earlier server (e.g. one whose data
# volume was removed since) must not reach a node that starts now.
mkdir -p "$(dirname "$PUBKEY_FILE")"
rm -f "$PUBKEY_FILE"

# Double fork: the helper is re-parented to the container's init (compose
# sets `init: true`), which reaps it, while backhauld below runs in this
# process and receives SIGTERM from `docker compose stop` directly.
( publish_key & )

exec backhauld "$@"
