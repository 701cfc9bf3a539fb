import os
import sys

# Tests import the flat top-level modules (model, data, ...) directly.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Triton's interpreter must be chosen before triton is first imported (PITFALLS M7): kernels run on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

# 2 cores: one torch thread per test process keeps timings stable and avoids oversubscription.
torch.set_num_threads(int(os.environ.get("NANO_R1_TEST_THREADS", "2")))
