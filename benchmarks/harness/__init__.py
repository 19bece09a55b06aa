"""What the benchmark scripts and the live-server tests share: a server process on a loopback port
(`server`), its Prometheus metrics (`metrics`), raw HTTP requests and clients (`http`), the load
itself (`load`), the shared machine (`machine`), the server-against-ceilings sweep (`sweep`) and the
tables (`report`). The scripts in `benchmarks/` are command lines on top of it."""
