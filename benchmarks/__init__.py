"""Load generator, ceilings and the one-command benchmark of resnet-serve (see docs/benchmarks.md)."""
