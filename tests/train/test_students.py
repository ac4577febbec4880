"""Students: exact sizes and state-dict layout of the published models, shapes, fx-traceability, IMX500 ops."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx
from torch import nn

from picosam_pipeline.errors import PipelineError
from picosam_pipeline.train.students import (
    NORMALIZATION,
    STUDENTS,
    build_student,
    count_macs,
    normalize,
    summarize_student,
)

# (parameters, state-dict keys) of the published checkpoints, counted from the papers' model code.
PUBLISHED = {"picosam2": (1_262_818, 122), "picosam3": (1_371_418, 141)}

# What the IMX500 target accepts and MCT folds / quantises; anything else in the graph fails deployment.
ALLOWED_MODULES = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Upsample, nn.AdaptiveAvgPool2d, nn.Sigmoid)
ALLOWED_FUNCTIONS = {operator.add, operator.mul}


@pytest.mark.parametrize("name", STUDENTS)
def test_parameter_and_state_dict_counts_match_published_models(name: str) -> None:
    model = build_student(name)
    params, keys = PUBLISHED[name]
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) == keys


@pytest.mark.parametrize(
    ("name", "key", "shape"),
    [
        ("picosam2", "encoder_stage1.0.weight", (3, 1, 3, 3)),
        ("picosam2", "down4.weight", (256, 256, 3, 3)),
        ("picosam2", "bottleneck.4.running_var", (320,)),
        ("picosam2", "up1.1.3.weight", (192, 320, 1, 1)),
        ("picosam2", "skip_conn1.bias", (40,)),
        ("picosam2", "output_head.weight", (1, 40, 1, 1)),
        ("picosam3", "bottleneck.0.3.weight", (320, 256, 1, 1)),
        ("picosam3", "bottleneck.1.weight", (320, 1, 3, 3)),
        ("picosam3", "bottleneck.5.weight", (320,)),
        ("picosam3", "eca.conv1x1.weight", (40, 40, 1, 1)),
        ("picosam3", "refine.0.weight", (40, 1, 3, 3)),
        ("picosam3", "refine.3.bias", (1,)),
    ],
)
def test_state_dict_names_follow_published_checkpoints(name: str, key: str, shape: tuple[int, ...]) -> None:
    assert tuple(build_student(name).state_dict()[key].shape) == shape


def test_picosam3_has_no_picosam2_head_and_vice_versa() -> None:
    assert not any(k.startswith("output_head") for k in build_student("picosam3").state_dict())
    assert not any(k.startswith(("eca", "refine")) for k in build_student("picosam2").state_dict())


@pytest.mark.parametrize("name", STUDENTS)
def test_output_is_one_logit_channel_at_input_resolution(name: str) -> None:
    model = build_student(name).eval()
    rgb = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        out = model(normalize(rgb))
    assert out.shape == (2, 1, 96, 96)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", STUDENTS)
def test_symbolic_trace_has_only_imx500_ops_and_matches_eager(name: str) -> None:
    model = build_student(name).eval()
    traced = torch.fx.symbolic_trace(model)
    for node in traced.graph.nodes:
        if node.op == "call_module":
            module = traced.get_submodule(node.target)
            assert isinstance(module, ALLOWED_MODULES), f"{node.target}: {type(module).__name__}"
            if isinstance(module, nn.Upsample):
                assert module.mode == "nearest" and module.scale_factor == 2
        elif node.op == "call_function":
            assert node.target in ALLOWED_FUNCTIONS, f"{node.name}: {node.target}"
        else:
            assert node.op in ("placeholder", "output"), f"{node.name}: {node.op} {node.target}"
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


def test_picosam3_graph_uses_attention_ops_picosam2_does_not() -> None:
    def ops(name: str) -> set[str]:
        traced = torch.fx.symbolic_trace(build_student(name))
        return {type(traced.get_submodule(n.target)).__name__ for n in traced.graph.nodes if n.op == "call_module"}

    assert {"AdaptiveAvgPool2d", "Sigmoid"} <= ops("picosam3")
    assert not {"AdaptiveAvgPool2d", "Sigmoid"} & ops("picosam2")


def test_normalize_uses_imagenet_statistics() -> None:
    rgb = torch.tensor(NORMALIZATION.mean).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert torch.allclose(normalize(rgb), torch.zeros(1, 3, 2, 2), atol=1e-7)
    ones = normalize(torch.ones(1, 3, 1, 1)).flatten()
    expected = [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225]
    assert torch.allclose(ones, torch.tensor(expected))
    with pytest.raises(TypeError, match="uint8"):
        normalize(torch.zeros(1, 3, 2, 2, dtype=torch.uint8))


def test_count_macs_on_a_hand_sized_net() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 8*4*4 outputs x 3*9 = 3,456
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # 8*4*4 outputs x 1*9 = 1,152
        nn.Flatten(),
        nn.Linear(128, 10),  # 10 outputs x 128 = 1,280
    )
    assert count_macs(net, torch.zeros(1, 3, 4, 4)) == 3_456 + 1_152 + 1_280


def test_summary_figures() -> None:
    s = summarize_student("picosam2")
    assert (s.params, s.state_dict_keys, s.output_shape) == (1_262_818, 122, (1, 1, 96, 96))
    assert s.bn_running_stats == 2 * 2_603  # 2 x (sum of BN channels)
    assert round(s.float32_bytes / 2**20, 2) == 4.84  # the Z plots' FP32 size in MiB
    # folded: conv weights (params - BN gammas/betas - 441 conv biases) as int8, 441 + 2,603 folded biases as int32
    assert s.int8_folded_bytes == (1_262_818 - 2 * 2_603 - 441) + 4 * (441 + 2_603)
    assert round(s.macs / 1e6, 1) == 323.1  # conv MACs counted by hand from the paper's code (paper: 336 M)
    s3 = summarize_student("picosam3")
    assert round(s3.float32_bytes / 2**20, 2) == 5.26 and round(s3.int8_bytes / 2**20, 2) == 1.31
    assert round(s3.macs / 1e6, 1) == 330.2
    assert summarize_student("picosam2", input_size=64).macs < s.macs


def test_bad_names_and_sizes_are_user_errors() -> None:
    with pytest.raises(PipelineError, match="picosam2, picosam3"):
        build_student("picosam4")
    with pytest.raises(PipelineError, match="multiple of 16"):
        summarize_student("picosam2", input_size=100)


def test_model_summary_command() -> None:
    from click.testing import CliRunner

    from picosam_pipeline.cli import cli

    result = CliRunner().invoke(cli, ["model-summary", "picosam3"])
    assert result.exit_code == 0, result.output
    assert "1,371,418" in result.output and "330.2 M" in result.output
    assert "5.26 MiB" in result.output and "published 5.26 MB" in result.output
    bad = CliRunner().invoke(cli, ["model-summary", "picosam2", "--input-size", "90"])
    assert bad.exit_code == 1 and "multiple of 16" in bad.output and "Traceback" not in bad.output
