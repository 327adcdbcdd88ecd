"""Core tests run tiny models: one torch thread avoids oversubscription (other test processes and
the Celery worker share the 2 CI cores, and spinning thread pools slow tiny ops by 10x or more)."""

import torch

torch.set_num_threads(1)
