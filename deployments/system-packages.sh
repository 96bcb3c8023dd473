#!/usr/bin/env bash
# The Debian packages `make test` needs besides Python's; installs only the missing ones (apt-get, as root).
#   chromium    tests/serve/test_clients.py drives the web chat page in headless Chromium
#   postgresql  tests/chatlog/test_chatlog.py starts a throwaway PostgreSQL server (initdb, postgres)
#   prometheus  tests/deployments/test_monitoring_stack.py checks the alert rules and dashboard queries with promtool
set -euo pipefail

missing=()
[ -x /usr/bin/chromium ] || [ -x /usr/bin/chromium-browser ] || missing+=(chromium)
command -v initdb >/dev/null || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
command -v promtool >/dev/null || missing+=(prometheus)
[ ${#missing[@]} -eq 0 ] && exit 0

fail() {
  echo "$1; install them, then run make test again:" >&2
  echo "  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
  exit 1
}
command -v apt-get >/dev/null || fail "the test suite needs the Debian packages ${missing[*]} (no apt-get here)"
[ "$(id -u)" -eq 0 ] || fail "the test suite needs the Debian packages ${missing[*]}, and only root can install them"
echo "installing the Debian packages the test suite needs: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
{ apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; } || fail "apt-get could not install ${missing[*]}"
