"""A small camera-input network MCT quantises in seconds: the students' operators (depthwise and pointwise convs with
BatchNorm, a stride-2 conv, nearest upsampling, an added skip, a logit head) in miniature, behind the normalisation
conv (tests/deploy/test_quantize.py, test_export.py, tests/test_kill_stages.py)."""

from __future__ import annotations

import torch
from torch import nn

from picosam_pipeline.deploy.quantize import CameraInputModel, camera_input_model

SIZE = 16


class TinyStudent(nn.Module):
    """(B, 3, S, S) normalised -> (B, 1, S, S) logits, with the students' operators in miniature."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 3, 3, padding=1, groups=3, bias=False),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.Conv2d(3, 8, 1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
        )
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.head = nn.Conv2d(8, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.stem(x)
        return self.head(self.up(torch.relu(self.down(f))) + f)


def tiny_camera_model(seed: int = 0) -> CameraInputModel:
    """A :class:`TinyStudent` with non-trivial BatchNorm statistics (so MCT's BN folding matters), wrapped."""
    torch.manual_seed(seed)
    student = TinyStudent().eval()
    with torch.no_grad():
        for m in student.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return camera_input_model(student)
