import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/problems.py importable here and in spawned ranks
torch.set_num_threads(min(2, os.cpu_count() or 1))
