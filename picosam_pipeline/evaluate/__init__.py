"""Phase 4, evaluate: the papers' crop-space metrics and scoring of prediction files, the evaluation table,
LVIS evaluation, the qualitative grid, prediction on images and the onnxruntime session it shares with the
deploy phase. Imports ``data``, ``teacher`` and ``train``, never ``deploy``."""
