"""Phase 3, train: WebDataset shards (pack format) and their loader, the students, the distillation losses,
the flat training loop, checkpoints and the crop IoU it validates with. Imports ``data`` and ``teacher``."""
