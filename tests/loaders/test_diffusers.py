"""diffusers models and pipelines: a component class as ``model_cls`` loads like diffusers'
``from_pretrained``, and a pipeline folder plans component by component with one total."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import memplan

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Stable-Diffusion-shaped pipeline: unet, vae and text encoder with weights; a
    scheduler folder without."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("pipeline") / "tiny-sd"
    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2,
    ).save_pretrained(root / "unet")  # fmt: skip
    AutoencoderKL(
        block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        latent_channels=4, norm_num_groups=4, sample_size=8,
    ).save_pretrained(root / "vae")  # fmt: skip
    text = CLIPTextConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=100
    )
    CLIPTextModel(text).save_pretrained(root / "text_encoder")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "PNDMScheduler"}))
    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "scheduler": ["diffusers", "PNDMScheduler"],
    }  # fmt: skip
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def test_a_pipeline_is_planned_component_by_component_with_one_total(pipeline: Path) -> None:
    whole = memplan.inspect(pipeline)
    parts = dict(whole.components)
    assert sorted(parts) == ["text_encoder", "unet", "vae"]
    assert whole.nbytes == sum(memplan.inspect(pipeline / name).nbytes for name in parts)
    text = memplan.plan(whole, memplan.probe("cuda:0=1GiB,cpu=8GiB")).explain()
    assert "component unet (diffusers.UNet2DConditionModel)" in text and "no usable config.json" not in text


def test_loading_a_whole_pipeline_says_to_load_its_components(pipeline: Path) -> None:
    with pytest.raises(memplan.CheckpointError, match="component"):
        memplan.load(pipeline, progress=False)


def test_a_diffusers_class_loads_like_diffusers(pipeline: Path) -> None:
    """Every tensor equals diffusers' from_pretrained's, bit for bit. Outputs are compared with
    the same weights in ordinary memory: from_pretrained's own output moves in the last bit when
    its weights are merely copied (a deepcopy of it differs from it), so it is no fixed reference."""
    from diffusers import UNet2DConditionModel

    reference = UNet2DConditionModel.from_pretrained(pipeline / "unet").eval()
    model = memplan.load(pipeline / "unet", model_cls=UNet2DConditionModel, progress=False)
    want_state, got_state = reference.state_dict(), model.state_dict()
    assert want_state.keys() == got_state.keys()
    assert all(torch.equal(want_state[k], got_state[k]) for k in want_state)
    copied = UNet2DConditionModel.from_config(reference.config).eval()
    copied.load_state_dict(want_state)
    sample, hidden = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 16)
    with torch.no_grad():
        got = model(sample, 10, encoder_hidden_states=hidden).sample
        assert torch.equal(got, copied(sample, 10, encoder_hidden_states=hidden).sample)
        torch.testing.assert_close(got, reference(sample, 10, encoder_hidden_states=hidden).sample)
