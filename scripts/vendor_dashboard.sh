#!/usr/bin/env bash
# Refreshes the dashboard's one third-party file set (uPlot, MIT) from the npm registry.
# The files are committed, so running the dashboard needs no npm and no build step; this
# script only documents and repeats how they were fetched. The tarball's checksum is
# pinned: a different file under the same version fails here instead of being served.
set -euo pipefail
VERSION=1.6.32
SHA256=4b8a8191e425658e3ea8c8c1314b0fc679c861ee3a1af2b20c7b16ba50b5133d
DEST="$(cd "$(dirname "$0")/.." && pwd)/app/dashboard/static/vendor"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
npm pack --silent "uplot@$VERSION" >/dev/null
echo "$SHA256  uplot-$VERSION.tgz" | sha256sum --check --quiet
tar xzf "uplot-$VERSION.tgz"
mkdir -p "$DEST"
cp package/dist/uPlot.iife.min.js "$DEST/uplot.iife.min.js"
cp package/dist/uPlot.min.css "$DEST/uplot.min.css"
cp package/LICENSE "$DEST/uplot.LICENSE"
echo "uPlot $VERSION -> $DEST"
