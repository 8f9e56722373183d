#!/usr/bin/env bash
# The real-Slurm test stage: install + start a one-node Slurm (root), submit the example jobs.
#   bash tests/slurm/run_slurm_test.sh          (from anywhere; about 3-4 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
bash tests/slurm/setup_slurm.sh
MUON_DS_SLURM_TEST=1 exec python -m pytest -q tests/test_slurm.py -p no:cacheprovider "$@"
