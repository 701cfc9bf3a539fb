#!/usr/bin/env bash
# nano-r1 pipeline. The toy R1-Zero reproduction lands stage by stage; for now this runs what exists:
# a self-check of the model (a tiny DeepSeek-V3-style MoE: forward, cached decode, HF save/load round trip).
set -euo pipefail
cd "$(dirname "$0")"
python model.py
