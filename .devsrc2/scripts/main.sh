#!/usr/bin/env bash
# The main job: set up, build, and run the example.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
./build/simple-graph
