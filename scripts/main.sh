#!/usr/bin/env bash
# The README's main command: from a fresh clone, set up and run the main job.
set -euo pipefail
repo_root=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo_root"
# shellcheck disable=SC1091
. scripts/setup_env.sh
python examples/quickstart.py
