#!/usr/bin/env bash
# Assembles the container's root filesystem in DEST: the collie binary, the
# shared libraries it loads (from ldd, so the list follows the binary), the CA
# bundle for https providers, a passwd/group naming the unprivileged user, and
# the directories Collie writes to (meant to be mounted: the image's root is
# read-only). The Dockerfile's build stage runs this; deploy/tests/image.sh
# runs the same script on the host to build and start the runtime stage.
# Usage: deploy/container/rootfs.sh BINARY DEST
set -euo pipefail
bin=${1:?usage: rootfs.sh BINARY DEST}
dest=${2:?usage: rootfs.sh BINARY DEST}
uid=10001

mkdir -p "$dest/usr/local/bin" "$dest/etc/collie" "$dest/etc/ssl/certs" \
  "$dest/var/lib/collie" "$dest/tmp"
install -m 0755 "$bin" "$dest/usr/local/bin/collie"

# Every library the dynamic loader resolves, and the loader itself, at the
# paths the binary asks for (ldd prints "name => path (addr)" or "path (addr)").
ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' |
  sort -u | while read -r lib; do
    mkdir -p "$dest$(dirname "$lib")"
    cp -L "$lib" "$dest$lib"
  done
if ldd "$bin" | grep "not found" >/dev/null; then
  echo "rootfs: a library of $bin is missing:" >&2
  ldd "$bin" >&2
  exit 1
fi

cp -L /etc/ssl/certs/ca-certificates.crt "$dest/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/root:/sbin/nologin\ncollie:x:%s:%s:collie:/var/lib/collie:/sbin/nologin\n' \
  "$uid" "$uid" > "$dest/etc/passwd"
printf 'root:x:0:\ncollie:x:%s:\n' "$uid" > "$dest/etc/group"
printf 'hosts: files dns\n' > "$dest/etc/nsswitch.conf"
chown "$uid:$uid" "$dest/var/lib/collie"
chmod 0755 "$dest/var/lib/collie"
chmod 1777 "$dest/tmp"
