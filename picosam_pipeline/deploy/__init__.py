"""Phase 5, deploy: MCT INT8 quantisation, the ONNX files and their checks, the IMX500 converter step, the
quantize, export and package stages' work (``quantized_student.py``, ``onnx_contract.py``, ``deploy_folder.py``),
and the Raspberry Pi side (``raspberry_pi.py`` and ``template/``, copied into the deploy folder). May import every
phase before it."""
