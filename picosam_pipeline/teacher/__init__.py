"""Phase 2, teacher: the teacher interface (``base``), its SAM2/SAM3
implementations, their weights (``weights``) and factory (``build``), the per-shard runner and its executors (dask or in
process), the Zarr logit store with its codec and crop-frame geometry, ``verify``, and the GT-mask stand-in
teacher used by tests and benchmarks. Imports only ``data``."""
