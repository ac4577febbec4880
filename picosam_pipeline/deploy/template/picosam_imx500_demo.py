#!/usr/bin/env python3
"""PicoSAM on the Raspberry Pi AI Camera: segment the object inside a box, on the IMX500 sensor.

    python3 picosam_imx500_demo.py --box 480,300,320,240        # x,y,w,h in preview pixels
    python3 picosam_imx500_demo.py --model network.rpk --preview-size 1280x960

The box becomes the IMX500's inference ROI in the crop convention the student was trained with (PicoSAM3:
the box grown 10 % per side and squared, in sensor pixels). The sensor crops that region, resizes it to the
network's input size and runs the network; this script reads the logits, thresholds them at 0 and tints
the mask on the preview. The network takes the sensor's RGB as it is: its ImageNet normalisation is the
network's first layer, so nothing is normalised here. Ctrl-C quits.

Runs on Raspberry Pi OS with the AI camera set up (``sudo apt install imx500-all python3-picamera2``);
``deploy.py`` and ``crops.py`` beside this file hold the geometry and post-processing (numpy only).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from picamera2 import CompletedRequest, Picamera2
from picamera2.devices import IMX500
from picamera2.devices.imx500 import NetworkIntrinsics

from deploy import as_xywh, inference_roi, logits_from_outputs, overlay_rgba, paste_mask

HERE = Path(__file__).resolve().parent
CONTRACT = json.loads((HERE / "picosam_int8.json").read_text())  # the network's inputs and outputs (export stage)
INPUT_SIZE = int(CONTRACT["input"]["shape"][-1])


def parse_size(text: str) -> tuple[int, int]:
    width, height = (int(v) for v in text.lower().split("x"))
    return width, height


def parse_box(text: str) -> tuple[float, float, float, float]:
    x, y, w, h = (float(v) for v in text.split(","))
    return x, y, w, h


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=HERE / "network.rpk", help="network.rpk made by imx500-package")
    parser.add_argument("--box", type=parse_box, default=None,
                        help="object box x,y,w,h in preview pixels (default: the middle third of the preview)")
    parser.add_argument("--preview-size", type=parse_size, default=(1280, 960), help="preview (main stream) size WxH")
    parser.add_argument("--padding", type=float, default=0.1, help="ROI padding per side, as in training (PicoSAM3: 0.1)")
    args = parser.parse_args()
    width, height = args.preview_size
    box = args.box or (width / 3, height / 3, width / 3, height / 3)

    imx500 = IMX500(str(args.model))  # uploads the network firmware; must come before Picamera2()
    intrinsics = imx500.network_intrinsics or NetworkIntrinsics()
    intrinsics.task = "segmentation"
    intrinsics.update_with_defaults()
    input_format = imx500.config.get("input_tensor", {}).get("input_format", "RGB")
    if input_format != "RGB":
        print(f"warning: the camera feeds the network {input_format}, the network was trained on RGB")

    picam2 = Picamera2(imx500.camera_num)
    config = picam2.create_preview_configuration(main={"size": (width, height)},
                                                 controls={"FrameRate": intrinsics.inference_rate}, buffer_count=12)
    imx500.show_network_fw_progress_bar()
    picam2.start(config, show_preview=True)

    full = imx500.get_full_sensor_resolution()
    roi = inference_roi(box, picam2.capture_metadata()["ScalerCrop"], (width, height),
                        sensor_size=(full.width, full.height), padding=args.padding)
    imx500.set_inference_roi_abs(roi)
    print(f"box {box} (preview px) -> inference ROI {roi} (sensor px); Ctrl-C to quit")

    def show_mask(request: CompletedRequest) -> None:
        logits = logits_from_outputs(imx500.get_outputs(request.get_metadata()), INPUT_SIZE)
        if logits is None:  # no inference result in this frame yet
            return
        # Where the ROI lies in the preview, as the camera reports it (accounts for ScalerCrop and scaling).
        mask = paste_mask(logits > 0, as_xywh(imx500.get_roi_scaled(request)), (height, width))
        picam2.set_overlay(overlay_rgba(mask))

    picam2.pre_callback = show_mask
    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        picam2.stop()


if __name__ == "__main__":
    main()
