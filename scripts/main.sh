#!/usr/bin/env bash
# The README's main command: from a fresh clone, set up and run the main job.
set -euo pipefail
repo_root=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo_root"
# The demo runs on this machine only: build just its CPU kernel variant.
export CSD_CPU_ISAS=${CSD_CPU_ISAS:-native}
# ... and it needs none of the test suite's packages.
export CSD_SETUP_TEST_DEPS=${CSD_SETUP_TEST_DEPS:-0}
# shellcheck disable=SC1091
. scripts/setup_env.sh
# The tiny embedded default: synthetic data, a BPE tokenizer, a GPT-2 teacher
# trained by SFT and a pretrained student (both cached), cached teacher logits,
# and FKL / SS-CSD / TS-CSD / SRKL students from the same start over 3 seeds;
# prints the results table.  Nothing is downloaded.
csd-distill --preset tiny "$@"
