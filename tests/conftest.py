import torch

# Tiny models: one thread is as fast, and does not fight other work for the cores.
torch.set_num_threads(1)
