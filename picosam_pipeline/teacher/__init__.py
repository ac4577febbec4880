"""Phase 2, teacher: the SAM2/SAM3 adapters (``models``), the per-shard runner and its executors (dask or in
process), the Zarr logit store with its codec and crop-frame geometry, ``verify``, and the GT-mask stand-in
teacher used by tests and benchmarks. Imports only ``data``."""
