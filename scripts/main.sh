#!/usr/bin/env bash
# The README's main command: from a fresh clone, set up and run the main job.
set -euo pipefail
repo_root=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo_root"
# shellcheck disable=SC1091
. scripts/setup_env.sh
# The tiny embedded default: synthetic data, a BPE tokenizer, a tiny GPT-2
# teacher trained by SFT, and students distilled from it with CSD and with a
# forward-KL baseline; prints the results table.  Nothing is downloaded.
csd-distill --preset tiny "$@"
