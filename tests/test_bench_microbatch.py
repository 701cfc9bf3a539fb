"""Keeps bench/microbatch.py from rotting: a tiny run, whose length-ordered micro-batches must pad fewer positions."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_run_pads_fewer_positions_by_length():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "microbatch.py"), "--rows=16", "--micro=4",
                          "--median-len=8", "--max-len=40", "--reps=1", "--threads=1"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    pos = {k: int(v) for k, v in re.findall(r"(by length|rollout order)\s+padded positions\s+(\d+)", out)}
    assert set(pos) == {"by length", "rollout order"} and pos["by length"] < pos["rollout order"], out
    assert re.search(r"time \d+\.\d+x", out), out
