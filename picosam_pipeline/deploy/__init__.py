"""Phase 5, deploy: MCT INT8 quantisation, the ONNX files and their checks, the IMX500 converter step, and
the Raspberry Pi side (``raspberry_pi.py`` and ``template/``, copied into the deploy folder). May import
every phase before it."""
