"""Phase 4, evaluate: the papers' crop-space metrics and scoring of prediction files, the evaluation table,
the evaluation of a student on the val shards (the evaluate stages' work, ``shard_evaluation.py``), LVIS
evaluation, the qualitative grid, prediction on images and the onnxruntime session it shares with the deploy
phase. Imports ``data``, ``teacher`` and ``train``, never ``deploy``."""
