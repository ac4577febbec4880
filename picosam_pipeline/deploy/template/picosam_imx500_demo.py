#!/usr/bin/env python3
"""PicoSAM on the Raspberry Pi AI Camera: segment the object a prompt names, on the IMX500 sensor.

    python3 picosam_imx500_demo.py --box 480,300,320,240      # PicoSAM3 network: x,y,w,h in preview pixels
    python3 picosam_imx500_demo.py --point 640,480            # PicoSAM2 network: x,y in preview pixels
    python3 picosam_imx500_demo.py --model network.rpk --preview-size 1280x960 --fps 15
    python3 picosam_imx500_demo.py --print-intrinsics         # the network intrinsics as JSON, then exit

The prompt becomes the IMX500's inference ROI in the crop convention the student was trained with, which the
export stage recorded in ``picosam_int8.json`` (``crop``): PicoSAM3 (``roi``) takes a box, grown by 10 % per side
and squared in sensor pixels; PicoSAM2 (``point``) takes a point and crops the 96-sensor-pixel window around it.
The prompt of the other kind is refused. The sensor crops that region, resizes it to the network's input size and
runs the network; this script reads the logits, thresholds them at 0 and tints the mask on the preview. The
network takes the sensor's RGB as it is: its ImageNet normalisation is the network's first layer, so nothing is
normalised here. Ctrl-C quits.

Runs on Raspberry Pi OS with the AI camera set up (``sudo apt install imx500-all python3-picamera2``); it uses
only picamera2's public API. ``deploy.py`` and ``crops.py`` beside this file hold the geometry and
post-processing (numpy only), tested off the Pi.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from deploy import CONVENTIONS, as_xywh, logits_from_outputs, overlay_rgba, paste_mask, prompt_roi, sensor_size
from picamera2 import CompletedRequest, Picamera2
from picamera2.devices import IMX500
from picamera2.devices.imx500 import NetworkIntrinsics

HERE = Path(__file__).resolve().parent
CONTRACT = json.loads((HERE / "picosam_int8.json").read_text())  # the network's inputs, outputs and crop (export)
INPUT_SIZE = int(CONTRACT["input"]["shape"][-1])
CROP = CONTRACT["crop"]  # {"convention": "roi" | "point", "roi_padding" | "window", ...}
PROMPT_KIND, PAPER = CONVENTIONS[CROP["convention"]]


def parse_size(text: str) -> tuple[int, int]:
    width, height = (int(v) for v in text.lower().split("x"))
    return width, height


def parse_numbers(count: int):
    def parse(text: str) -> tuple[float, ...]:
        values = tuple(float(v) for v in text.split(","))
        if len(values) != count:
            raise argparse.ArgumentTypeError(f"expected {count} comma-separated numbers, got {text!r}")
        return values

    return parse


def get_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=HERE / "network.rpk", help="network.rpk made by imx500-package")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument(
        "--box",
        type=parse_numbers(4),
        default=None,
        help="object box x,y,w,h in preview pixels, for a PicoSAM3 (roi) network (default: the middle third)",
    )
    prompt.add_argument(
        "--point",
        type=parse_numbers(2),
        default=None,
        help="point x,y on the object in preview pixels, for a PicoSAM2 (point) network (default: the centre)",
    )
    parser.add_argument("--preview-size", type=parse_size, default=(1280, 960), help="preview (main stream) size WxH")
    parser.add_argument("--fps", type=int, help="frames per second (the network's inference rate)")
    parser.add_argument(
        "--print-intrinsics", action="store_true", help="print the network intrinsics as JSON, then exit"
    )
    return parser.parse_args()


def main() -> None:
    args = get_args()
    width, height = args.preview_size
    if args.box is None and args.point is None:  # the default prompt of the network's own kind
        args.box = (width / 3, height / 3, width / 3, height / 3) if PROMPT_KIND == "box" else None
        args.point = (width / 2, height / 2) if PROMPT_KIND == "point" else None
    if (args.box is not None and PROMPT_KIND != "box") or (args.point is not None and PROMPT_KIND != "point"):
        sys.exit(
            f"this network was trained on {PAPER} {CROP['convention']} crops: give --{PROMPT_KIND}, not "
            f"--{'box' if args.box is not None else 'point'}"
        )

    imx500 = IMX500(str(args.model))  # uploads the network firmware; must come before Picamera2()
    intrinsics = imx500.network_intrinsics or NetworkIntrinsics()
    intrinsics.task = "segmentation"
    if args.fps is not None:
        intrinsics.inference_rate = args.fps
    intrinsics.update_with_defaults()
    if args.print_intrinsics:
        print(intrinsics)
        return
    input_format = imx500.config.get("input_tensor", {}).get("input_format", "RGB")
    if input_format != "RGB":
        print(f"warning: the camera feeds the network {input_format}, the network was trained on RGB")

    picam2 = Picamera2(imx500.camera_num)
    config = picam2.create_preview_configuration(
        main={"size": (width, height)}, controls={"FrameRate": intrinsics.inference_rate}, buffer_count=12
    )
    imx500.show_network_fw_progress_bar()
    picam2.start(config, show_preview=True)

    roi = prompt_roi(
        CROP,
        picam2.capture_metadata()["ScalerCrop"],
        (width, height),
        sensor_size=sensor_size(picam2),
        box=args.box,
        point=args.point,
    )
    imx500.set_inference_roi_abs(roi)
    print(
        f"{PAPER} {CROP['convention']} crop: {PROMPT_KIND} {args.box or args.point} (preview px) -> inference ROI "
        f"{roi} (x, y, w, h, sensor px); Ctrl-C to quit"
    )

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
