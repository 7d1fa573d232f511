#!/usr/bin/env bash
# Checks that vendor/russh is exactly russh $VERSION as published on crates.io plus
# vendor/russh-$VERSION-edgemux.patch, and nothing else (see vendor/README.md).
#
#   bash scripts/check-vendor.sh                download, verify, apply the patch, compare
#   bash scripts/check-vendor.sh --write-patch  rewrite the patch from vendor/russh, then check
#
# Moving to a new russh version (OLD -> NEW), mechanically:
#   1. In this script set VERSION=NEW and SHA256 to the "cksum" of NEW in the crates.io index
#      (https://index.crates.io/ru/ss/russh, one JSON line per version).
#   2. Download and extract the new crate:
#        curl -sSfL https://static.crates.io/crates/russh/russh-NEW.crate | tar -xz -C /tmp
#   3. Apply the current patch to it and fix what does not apply (every change is marked
#      `edgemux patch`; see the *.rej files), then delete the *.rej and *.orig files:
#        (cd /tmp/russh-NEW && patch -p1 < "$OLDPWD/vendor/russh-OLD-edgemux.patch")
#   4. Replace the tree: rm -rf vendor/russh && cp -a /tmp/russh-NEW vendor/russh
#   5. Regenerate the patch under its new name, and drop the old one:
#        git rm vendor/russh-OLD-edgemux.patch && bash scripts/check-vendor.sh --write-patch
#   6. Pin the new version (russh = "=NEW" in Cargo.toml), run `cargo update -p russh` at the
#      root and in fuzz/, update the version named in vendor/README.md, and run the
#      flow-control tests named there.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

VERSION=0.65.1
# Used when Cargo.lock records no checksum for russh $VERSION (it does not while russh comes from
# the path dependency in [patch.crates-io]). Taken from the crates.io index,
# https://index.crates.io/ru/ss/russh, "cksum" of "vers":"0.65.1".
SHA256=94be3d86c71b9ed220a675c405e35c7a02565a009bf8da2e9cc13a700320a5c5
URL="https://static.crates.io/crates/russh/russh-$VERSION.crate"
VENDOR=vendor/russh
PATCH="vendor/russh-$VERSION-edgemux.patch"
# Files cargo adds when it extracts a crate; they are not part of the published crate.
IGNORE=(.cargo-ok)
REGENERATE="bash scripts/check-vendor.sh --write-patch"

write_patch=false
case "${1:-}" in
  "") ;;
  --write-patch) write_patch=true ;;
  *)
    echo "usage: $0 [--write-patch]" >&2
    exit 2
    ;;
esac

fail() {
  echo "check-vendor: $*" >&2
  exit 1
}

missing=()
for tool in curl patch tar diff sha256sum; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  fail "missing ${missing[*]}: install with 'apt-get install -y curl patch'" \
    "(tar, diff and sha256sum come with Debian's base system)"
fi
[ -d "$VENDOR" ] || fail "$VENDOR not found"
if ! $write_patch && [ ! -f "$PATCH" ]; then
  fail "$PATCH not found; create it with: $REGENERATE"
fi

excludes=()
for f in "${IGNORE[@]}"; do excludes+=(-x "$f"); done

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# The checksum Cargo.lock records for russh $VERSION from crates.io, if any.
expected="$(awk -F'"' -v want="$VERSION" '
  /^\[\[package\]\]/ { name = ""; version = ""; source = "" }
  /^name = / { name = $2 }
  /^version = / { version = $2 }
  /^source = / { source = $2 }
  /^checksum = / && name == "russh" && version == want && source ~ /crates\.io-index/ { print $2 }
' Cargo.lock)"
origin="Cargo.lock"
if [ -z "$expected" ]; then
  expected="$SHA256"
  origin="the crates.io index checksum recorded in scripts/check-vendor.sh"
fi

curl -sSfL --retry 3 -o "$tmp/russh.crate" "$URL" || fail "could not download $URL"
actual="$(sha256sum "$tmp/russh.crate" | cut -d' ' -f1)"
if [ "$actual" != "$expected" ]; then
  fail "russh-$VERSION.crate from $URL has SHA-256 $actual, but $origin says $expected"
fi

mkdir "$tmp/pristine"
tar -xzf "$tmp/russh.crate" -C "$tmp/pristine" --strip-components=1

if $write_patch; then
  # diff -ruN between a/ (pristine) and b/ (vendor/russh), without the timestamps, so that the
  # patch applies with `patch -p1` inside the crate and changes only when the code does.
  cp -a "$tmp/pristine" "$tmp/a"
  cp -a "$VENDOR" "$tmp/b"
  for f in "${IGNORE[@]}"; do rm -rf "${tmp:?}/b/$f"; done
  status=0
  (cd "$tmp" && diff -ruN a b) >"$tmp/new.patch" || status=$?
  [ "$status" -le 1 ] || fail "diff failed"
  sed -E 's/^((---|\+\+\+) [^\t]*)\t.*$/\1/' "$tmp/new.patch" >"$PATCH"
  echo "check-vendor: wrote $PATCH ($(wc -l <"$PATCH") lines)"
fi

cp -a "$tmp/pristine" "$tmp/patched"
if ! (cd "$tmp/patched" && patch -p1 --quiet --batch --forward -i "$ROOT/$PATCH"); then
  fail "vendor/russh is not russh $VERSION + $PATCH: the patch does not apply to russh $VERSION" \
    "from crates.io. If vendor/russh is right, regenerate the patch with: $REGENERATE"
fi

if ! diff -rq "${excludes[@]}" "$tmp/patched" "$VENDOR" >"$tmp/differ" 2>&1; then
  {
    echo "check-vendor: vendor/russh is not russh $VERSION + $PATCH: these differ:"
    sed -e "s|$tmp/patched/\?|russh-$VERSION+patch/|g" -e 's/^/  /' "$tmp/differ"
    echo
    diff -ru "${excludes[@]}" "$tmp/patched" "$VENDOR" |
      sed -e "s|$tmp/patched/\?|russh-$VERSION+patch/|g" | head -n 80 || true
    echo
    echo "If the change to vendor/russh is intended, regenerate the patch with: $REGENERATE"
    echo "(then review it with git diff $PATCH); otherwise restore vendor/russh."
  } >&2
  exit 1
fi

echo "check-vendor: ok, vendor/russh is russh $VERSION + $PATCH" \
  "($(grep -c '^+++ ' "$PATCH") files patched; crate SHA-256 matches $origin)"
