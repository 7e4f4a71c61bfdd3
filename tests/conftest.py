"""Test-session settings: one intra-op thread (tiny float64 problems run far faster without
thread hand-offs, and pytest-xdist workers then share the cores instead of oversubscribing them)."""

import torch

torch.set_num_threads(1)
