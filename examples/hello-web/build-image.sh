#!/bin/sh
# Builds the example chute's image, localhost/chuted-hello-web:1, from busybox-static.
# No registry is needed: the rootfs is busybox plus one symlink per applet, imported with
# `podman import`. Idempotent: does nothing if the image already exists (unless --force).
#   usage: examples/hello-web/build-image.sh [--force] [--archive DIR]
# --archive DIR also writes DIR/image.tar and DIR/image.tar.sha256 (an image archive the
# agent can load, verified by digest).
set -eu
IMAGE=localhost/chuted-hello-web:1
FORCE=0; ARCHIVE_DIR=
while [ $# -gt 0 ]; do
  case "$1" in
    --force) FORCE=1 ;;
    --archive) ARCHIVE_DIR=$2; shift ;;
    *) echo "usage: $0 [--force] [--archive DIR]" >&2; exit 2 ;;
  esac
  shift
done
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || { echo "busybox-static is missing: apt-get install busybox-static" >&2; exit 1; }
if [ "$FORCE" = 0 ] && podman image exists "$IMAGE"; then
  echo "image $IMAGE already present"
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  mkdir -p "$work/root/bin" "$work/root/www" "$work/root/tmp" "$work/root/etc"
  cp "$BUSYBOX" "$work/root/bin/busybox"
  for applet in $("$BUSYBOX" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$work/root/bin/$applet"
  done
  echo 'root:x:0:0:root:/:/bin/sh' > "$work/root/etc/passwd"
  echo 'root:x:0:' > "$work/root/etc/group"
  echo '<h1>hello from a chute</h1>' > "$work/root/www/index.html"
  tar -C "$work/root" -cf "$work/rootfs.tar" .
  podman import --change 'ENV PATH=/bin' --change 'CMD ["httpd","-f","-p","8080","-h","/www"]' \
    "$work/rootfs.tar" "$IMAGE" >/dev/null
  echo "built $IMAGE"
fi
if [ -n "$ARCHIVE_DIR" ]; then
  mkdir -p "$ARCHIVE_DIR"
  rm -f "$ARCHIVE_DIR/image.tar"
  podman save --format docker-archive -o "$ARCHIVE_DIR/image.tar" "$IMAGE" >/dev/null
  (cd "$ARCHIVE_DIR" && sha256sum image.tar > image.tar.sha256)
  echo "wrote $ARCHIVE_DIR/image.tar ($(cut -c1-12 "$ARCHIVE_DIR/image.tar.sha256"))"
fi
