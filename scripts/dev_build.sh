#!/usr/bin/env bash
# Rebuild bitfuse._C in the editable install of .venv, one build at a time.
# Several people (or helper agents) editing one working tree must not run two CMake/Ninja builds in
# the same build directory at once: flock serialises them. A build that fails in a file you did not
# touch usually means someone else is mid-edit; wait and run it again.
set -euo pipefail
cd "$(dirname "$0")/.."
exec flock /tmp/bitfuse-build.lock .venv/bin/pip install -q --no-build-isolation -e . "$@"
