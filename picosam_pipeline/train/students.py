"""PicoSAM2 and PicoSAM3 students: depthwise-separable U-Nets for the Sony IMX500.

Both map a normalised 96x96 RGB crop to one channel of mask logits at the same resolution::

    x = normalize(rgb)              # rgb: float32 (B, 3, 96, 96) in [0, 1]  ->  ImageNet-normalised
    logits = build_student("picosam3")(x)   # float32 (B, 1, 96, 96), raw logits; mask = logits > 0

The input side must be a multiple of 16 (four stride-2 stages, then four nearest x2 upsamplings whose
outputs are added to same-sized skips). The graph holds no sigmoid on the output: the IMX500 host
thresholds logits at 0, and training losses apply the (temperature-scaled) sigmoid themselves.

Module names follow the published models (``encoder_stage1``, ``down1``, ``bottleneck``, ``up1``,
``skip_conn4``, ``output_head`` / ``eca`` + ``refine``) so their state dicts load with ``strict=True``:
PicoSAM2 has 1,262,818 parameters and 122 state-dict keys, PicoSAM3 1,371,418 and 141.

Only operations the IMX500 target accepts are used (plain / depthwise / dilated depthwise / 1x1 convs,
BatchNorm (folded by MCT), ReLU, nearest x2 upsampling, add, global average pooling, sigmoid, mul) and
``forward`` has no data-dependent control flow, so ``torch.fx.symbolic_trace`` (what MCT uses) works.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from picosam_pipeline.errors import PipelineError

ENCODER_WIDTHS = (48, 96, 160, 256)  # channels of encoder stages 1..4 (resolutions 96, 48, 24, 12)
BOTTLENECK_WIDTH = 320  # at 6x6 for a 96x96 input
DECODER_WIDTHS = (192, 128, 80, 40)  # channels after up1..up4 (resolutions 12, 24, 48, 96)


# --------------------------------------------------------------------------------------------------
# input normalisation


@dataclass(frozen=True)
class Normalization:
    """Per-channel RGB mean / std that the students were trained with (ImageNet statistics)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


NORMALIZATION = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def normalize(x: Tensor) -> Tensor:
    """Map float RGB in [0, 1], shape (B, 3, H, W), to the students' input: ``(x - mean) / std`` per channel.

    The normalisation is deliberately outside the model graph, as in the published models (their
    checkpoints expect normalised input). It cannot be folded exactly into the first conv: that conv
    zero-pads, and zero in normalised space is not zero in [0, 1] space, so borders would differ.
    """
    if not x.is_floating_point():
        raise TypeError(f"normalize expects float RGB in [0, 1], got {x.dtype}; convert uint8 with x.float() / 255")
    mean = torch.tensor(NORMALIZATION.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(NORMALIZATION.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# --------------------------------------------------------------------------------------------------
# building blocks


def separable_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """Depthwise 3x3 -> BN -> ReLU -> pointwise 1x1 -> BN -> ReLU; keeps the spatial size.

    A plain ``nn.Sequential`` so the state-dict keys are ``<name>.0.weight`` ... ``<name>.4.running_var``,
    as in the published checkpoints. Convs have no bias because BN follows each of them.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False),
        nn.BatchNorm2d(in_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def up_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Nearest-neighbour x2 upsampling, then a separable conv (the IMX500 has no bilinear resize)."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), separable_conv(in_channels, out_channels))


class ChannelAttention(nn.Module):
    """PicoSAM3's ``eca`` block: ``x * sigmoid(W @ avgpool(x))`` with a full CxC 1x1 conv, no bias.

    Despite the published attribute name this is not ECA-Net's 1-D conv over channels; it is an
    SE-style gate without the channel reduction. (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv1x1 = nn.Conv2d(channels, channels, 1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        return x * self.sigmoid(self.conv1x1(self.avg_pool(x)))  # (B, C, 1, 1) gate broadcast over H, W


# --------------------------------------------------------------------------------------------------
# the students


class SeparableUNet(nn.Module):
    """Encoder-decoder shared by both students; subclasses add the bottleneck's tail and the head.

    ``features(x)``: (B, in_channels, S, S) normalised image -> (B, 40, S, S) last decoder map.
    Skips are added (1x1 conv with bias to match channels), never concatenated.
    """

    def __init__(self, *, in_channels: int = 3) -> None:
        super().__init__()
        c1, c2, c3, c4 = ENCODER_WIDTHS
        d1, d2, d3, d4 = DECODER_WIDTHS
        # Downsampling is a full 3x3 stride-2 conv with no BN/ReLU; these four convs hold ~73 % of the
        # parameters (they are what makes the model 1.26 M rather than ~0.34 M).
        self.encoder_stage1 = separable_conv(in_channels, c1)
        self.down1 = nn.Conv2d(c1, c1, 3, stride=2, padding=1, bias=False)
        self.encoder_stage2 = separable_conv(c1, c2)
        self.down2 = nn.Conv2d(c2, c2, 3, stride=2, padding=1, bias=False)
        self.encoder_stage3 = separable_conv(c2, c3)
        self.down3 = nn.Conv2d(c3, c3, 3, stride=2, padding=1, bias=False)
        self.encoder_stage4 = separable_conv(c3, c4)
        self.down4 = nn.Conv2d(c4, c4, 3, stride=2, padding=1, bias=False)

        self.bottleneck = self.build_bottleneck(c4, BOTTLENECK_WIDTH)

        self.up1 = up_block(BOTTLENECK_WIDTH, d1)
        self.skip_conn4 = nn.Conv2d(c4, d1, 1)
        self.up2 = up_block(d1, d2)
        self.skip_conn3 = nn.Conv2d(c3, d2, 1)
        self.up3 = up_block(d2, d3)
        self.skip_conn2 = nn.Conv2d(c2, d3, 1)
        self.up4 = up_block(d3, d4)
        self.skip_conn1 = nn.Conv2d(c1, d4, 1)

    def build_bottleneck(self, in_channels: int, out_channels: int) -> nn.Module:
        return separable_conv(in_channels, out_channels)

    def features(self, x: Tensor) -> Tensor:
        f1 = self.encoder_stage1(x)  # (B, 48, S, S)
        f2 = self.encoder_stage2(self.down1(f1))  # (B, 96, S/2, S/2)
        f3 = self.encoder_stage3(self.down2(f2))  # (B, 160, S/4, S/4)
        f4 = self.encoder_stage4(self.down3(f3))  # (B, 256, S/8, S/8)
        b = self.bottleneck(self.down4(f4))  # (B, 320, S/16, S/16)
        u1 = self.up1(b) + self.skip_conn4(f4)
        u2 = self.up2(u1) + self.skip_conn3(f3)
        u3 = self.up3(u2) + self.skip_conn2(f2)
        return self.up4(u3) + self.skip_conn1(f1)  # (B, 40, S, S)


class PicoSAM2(SeparableUNet):
    """PicoSAM2 (arXiv 2506.18807): the U-Net with a 1x1 conv head. 1,262,818 parameters.

    (B, 3, S, S) ImageNet-normalised float32, S a multiple of 16 (96 in the paper) -> (B, 1, S, S) logits.
    """

    def __init__(self, *, in_channels: int = 3) -> None:
        super().__init__(in_channels=in_channels)
        self.output_head = nn.Conv2d(DECODER_WIDTHS[-1], 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.output_head(self.features(x))


class PicoSAM3(SeparableUNet):
    """PicoSAM3 (arXiv 2603.11917): PicoSAM2 plus a dilated bottleneck, channel attention and a refine head.

    - bottleneck: the separable conv, then a dilated (d=2) depthwise 3x3 + BN + ReLU and a 1x1 + BN + ReLU,
      which widens the receptive field at 6x6 to cover the whole crop;
    - ``eca``: :class:`ChannelAttention` on the last decoder map;
    - ``refine``: depthwise 3x3 + BN + ReLU, then a 1x1 conv with bias to one logit channel.

    1,371,418 parameters. Same input/output contract as :class:`PicoSAM2`.
    """

    def __init__(self, *, in_channels: int = 3) -> None:
        super().__init__(in_channels=in_channels)
        width = DECODER_WIDTHS[-1]
        self.eca = ChannelAttention(width)
        self.refine = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 1, 1),
        )

    def build_bottleneck(self, in_channels: int, out_channels: int) -> nn.Module:
        c = out_channels
        return nn.Sequential(
            separable_conv(in_channels, c),
            nn.Conv2d(c, c, 3, padding=2, dilation=2, groups=c, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
            nn.Conv2d(c, c, 1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.refine(self.eca(self.features(x)))


STUDENTS: dict[str, type[SeparableUNet]] = {"picosam2": PicoSAM2, "picosam3": PicoSAM3}

# Sizes the papers' plots print (FP32 MB, INT8 MB): P2 `plot_*_vs_size.py`, Z `picosam2/plot_*_vs_size.py`.
PUBLISHED_SIZES_MB = {"picosam2": (4.87, 1.22), "picosam3": (5.26, 1.31)}


def build_student(name: str, **kwargs: int) -> SeparableUNet:
    """Instantiate a student by registry name (``picosam2`` or ``picosam3``) with fresh weights."""
    if name not in STUDENTS:
        raise PipelineError(f"unknown student {name!r}; expected one of {', '.join(STUDENTS)}")
    return STUDENTS[name](**kwargs)


# --------------------------------------------------------------------------------------------------
# summary: parameters, MACs, sizes


@dataclass(frozen=True)
class StudentSummary:
    """Static cost figures of a student at one input size."""

    name: str
    input_size: int
    params: int
    bn_running_stats: int  # BatchNorm running_mean + running_var elements (stored, not trained)
    state_dict_keys: int
    macs: int  # conv + linear multiply-accumulates for one image; see count_macs
    int8_folded_bytes: int  # int8 weights + 32-bit biases after BN folding; see folded_int8_bytes
    output_shape: tuple[int, ...]

    @property
    def float32_bytes(self) -> int:
        """Float checkpoint: every parameter and BN running statistic as 4 bytes."""
        return (self.params + self.bn_running_stats) * 4

    @property
    def int8_bytes(self) -> int:
        """One byte per parameter: the convention of the published INT8 sizes (biases counted as 8-bit)."""
        return self.params


def count_macs(model: nn.Module, x: Tensor) -> int:
    """Multiply-accumulates of ``nn.Conv2d`` and ``nn.Linear`` layers in one forward pass on ``x``.

    A conv output element costs ``in_channels / groups * kh * kw`` MACs; a linear output element
    ``in_features``. Not counted: BatchNorm (folded into the convs at export), ReLU, add, upsampling,
    pooling, sigmoid and mul, which are element-wise and small next to the convs.
    """
    total = 0

    def hook(module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.numel() * (module.in_channels // module.groups) * kh * kw
        else:
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total


def folded_int8_bytes(model: nn.Module) -> int:
    """Deployed weight bytes after BN folding: int8 conv/linear weights plus 32-bit biases.

    The IMX500 target quantises weights to 8 bit but keeps biases unquantised; folding gives every conv
    followed by BN a bias of ``out_channels`` and removes the BN parameters.
    """
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    biases = sum(
        m.bias.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None
    )
    biases += sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    return weights + 4 * biases


def summarize_student(name: str, *, input_size: int = 96) -> StudentSummary:
    """Build student ``name`` and measure parameters, BN statistics, MACs and output shape for one image."""
    if input_size < 16 or input_size % 16:
        raise PipelineError(f"--input-size {input_size}: the students need a positive multiple of 16 (e.g. 96)")
    model = build_student(name).eval()
    x = torch.zeros(1, 3, input_size, input_size)
    macs = count_macs(model, x)
    with torch.no_grad():
        out = model(x)
    bn_stats = sum(
        m.running_mean.numel() + m.running_var.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d)
    )
    return StudentSummary(
        name=name,
        input_size=input_size,
        params=sum(p.numel() for p in model.parameters()),
        bn_running_stats=bn_stats,
        state_dict_keys=len(model.state_dict()),
        macs=macs,
        int8_folded_bytes=folded_int8_bytes(model),
        output_shape=tuple(out.shape),
    )


def format_student_summary(s: StudentSummary) -> str:
    """The ``model-summary`` table: our figures beside the sizes the papers publish."""
    fp32_pub, int8_pub = PUBLISHED_SIZES_MB[s.name]
    mib = 2**20  # the published "MB" match sizes in MiB (4.84 = (params + BN stats) x 4 / 2^20)
    size = f"1x3x{s.input_size}x{s.input_size}"
    rows = [
        f"{s.name}: input {size} (ImageNet-normalised RGB) -> output {'x'.join(map(str, s.output_shape))} logits",
        f"  parameters      {s.params:>11,}        {s.state_dict_keys} state-dict keys, "
        f"{s.bn_running_stats:,} BN running stats",
        f"  MACs            {s.macs / 1e6:>9.1f} M        conv + linear multiply-accumulates at "
        f"{s.input_size}x{s.input_size};"
        " BN, ReLU, add, upsample, pool, sigmoid, mul not counted",
        f"  float32 size    {s.float32_bytes / mib:>9.2f} MiB      (params + BN running stats) x 4 B;  "
        f"published {fp32_pub} MB",
        f"  int8 size       {s.int8_bytes / mib:>9.2f} MiB      params x 1 B;  published {int8_pub} MB",
        f"  int8 deployed   {s.int8_folded_bytes / mib:>9.2f} MiB      int8 weights + 32-bit biases after BN folding"
        " (the IMX500 target does not quantise biases)",
    ]
    return "\n".join(rows)
