"""Which module streams a checkpoint layer: the model's own, found from its tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

import memplan
from memplan import Device, Streamed
from tests.loaders.test_load import plan_only, tight_spec


def _one_child_model() -> Any:
    """Blocks whose only weights sit in one child, which the block's forward uses without calling."""
    import torch.nn.functional as F
    from transformers import PretrainedConfig, PreTrainedModel

    class OneChildConfig(PretrainedConfig):
        model_type = "memplan_one_child"

        def __init__(self, hidden_size: int = 32, num_hidden_layers: int = 4, **kwargs: Any) -> None:
            self.hidden_size, self.num_hidden_layers = hidden_size, num_hidden_layers
            super().__init__(**kwargs)

    class Block(nn.Module):
        def __init__(self, hidden: int) -> None:
            super().__init__()
            self.proj = nn.Linear(hidden, hidden)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.tanh(F.linear(x, self.proj.weight, self.proj.bias))

    class OneChild(PreTrainedModel):
        config_class = OneChildConfig

        def __init__(self, config: OneChildConfig) -> None:
            super().__init__(config)
            self.embed = nn.Linear(config.hidden_size, config.hidden_size)
            self.layers = nn.ModuleList(Block(config.hidden_size) for _ in range(config.num_hidden_layers))
            self.post_init()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.embed(x)
            for layer in self.layers:
                x = layer(x)
            return x

    return OneChild, OneChildConfig


def test_a_layer_whose_weights_sit_in_one_child_streams_as_the_layer(tmp_path: Path) -> None:
    """Its tensors all lie in ``layers.N.proj``, but the model calls ``layers.N``: streaming the
    child left its weights on the meta device."""
    model_cls, config_cls = _one_child_model()
    torch.manual_seed(0)
    theirs = model_cls(config_cls()).eval()
    theirs.save_pretrained(tmp_path / "m")
    x = torch.randn(2, 32)
    with torch.no_grad():
        want = theirs(x)
    strategy = Streamed(Device("cuda", 0), "disk", resident_layers=0, prefetch_depth=1, dtype="F32")
    chosen = plan_only(
        tmp_path / "m", "streamed-disk", tight_spec(tmp_path / "m", strategy), prefetch_depth=1
    )
    model = memplan.load(tmp_path / "m", plan=chosen, model_cls=model_cls, progress=False)
    assert model.hf_device_map["layers.1"] == "disk"
    with torch.no_grad():
        assert torch.equal(model(x), want)
