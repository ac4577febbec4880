"""picosam-pipeline: run the SAM2/SAM3 teacher once, store its logits, distil PicoSAM students for the IMX500."""

from picosam_pipeline import _torchvision_compat

__version__ = "0.1.0"

# Must happen before anything imports torchvision (sam2's predictor, MCT), in every process.
_torchvision_compat.install()
