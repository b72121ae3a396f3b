#!/usr/bin/env bash
# `make test` runs the dashboard's browser test in Debian's chromium (Playwright drives
# it; nothing is downloaded from a browser CDN). Where chromium is missing and this
# user may install Debian packages, it is installed here; otherwise the browser test is
# skipped and says why. FLYWHEEL_NO_BROWSER_INSTALL=1 leaves the machine as it is.
set -uo pipefail
if command -v chromium >/dev/null 2>&1 || [ -n "${FLYWHEEL_CHROMIUM:-}" ]; then
  exit 0
fi
if [ -n "${FLYWHEEL_NO_BROWSER_INSTALL:-}" ]; then
  echo "chromium not found: the dashboard's browser test will be skipped"
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's chromium for the dashboard's browser test…"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 && \
      apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1
  fi
fi
if ! command -v chromium >/dev/null 2>&1; then
  echo "chromium not found and not installable here: the dashboard's browser test will be skipped"
fi
exit 0
