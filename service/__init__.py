"""resnet-serve: an HTTP model server for torchvision ResNet image classifiers."""

import os

__version__ = "0.1.0"

# OpenMP threads that spin while waiting collapse the forward when anything else takes a core
# (decode threads, a neighbour): measured 44 -> 8 img/s on 2 cores, 23 with PASSIVE, and no cost on a
# quiet machine (docs/benchmarks.md). It must be set before torch loads libgomp; a user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
