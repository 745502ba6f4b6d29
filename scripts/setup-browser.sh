#!/usr/bin/env bash
# Debian's Chromium for the real-browser tests (Playwright drives /usr/bin/chromium; it never
# downloads a browser of its own).
set -euo pipefail
if [ -x /usr/bin/chromium ]; then exit 0; fi
if [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
else
  echo "setup-browser: /usr/bin/chromium is missing; install Debian's 'chromium' package (sudo apt-get install chromium)" >&2
  exit 1
fi
