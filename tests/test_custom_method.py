"""The custom-method guide (docs/methods/custom.md): its example, run as written, is a method
like the built-in ones: options, training, task artifacts, serving."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

import vprompt
from vprompt.errors import ConfigError
from vprompt.methods import registry

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "methods" / "custom.md"


@pytest.fixture
def scale_shift():
    """The guide's first code block, executed; unregistered afterwards so other tests see only
    the built-in methods."""
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    module = types.ModuleType("guide_example")  # dataclasses look their module up
    sys.modules[module.__name__] = module
    try:
        exec(compile(blocks[0], str(GUIDE), "exec"), module.__dict__)
        yield module
    finally:
        registry._REGISTRY.pop("scale-shift", None)
        del sys.modules[module.__name__]


def test_the_guides_method_trains_saves_loads_and_serves(
    scale_shift, tiny_vit_spec, tiny_data_spec, tmp_path, single_thread
):
    from vprompt.data import build_splits
    from vprompt.engine.trainer import fit
    from vprompt.serve import MultiTaskModel

    assert "scale-shift" in vprompt.list_methods()
    bb = vprompt.load_backbone(tiny_vit_spec)
    with pytest.raises(ConfigError, match="init_scale must be > 0"):
        vprompt.attach(bb, "scale-shift", num_classes=3, init_scale=0)
    splits = build_splits(tiny_data_spec, data_config=bb.data_config, train_size=12)
    model = vprompt.attach(bb, "scale-shift", num_classes=3, init_scale=0.5)
    assert model.parameter_report()["method"] == 2 * bb.model.num_features
    fit(model, splits, {"epochs": 1, "batch_size": 4, "lr": 0.5})
    assert not torch.equal(model.method.shift, torch.zeros_like(model.method.shift))

    model.save_task(tmp_path / "task")
    loaded = vprompt.load_task(tmp_path / "task", backbone=bb)
    assert loaded.config.init_scale == 0.5
    x = torch.randn(3, 3, bb.img_size, bb.img_size)
    with torch.no_grad():
        expected = model.eval()(x)
        assert torch.equal(loaded(x), expected)
        served = MultiTaskModel(bb)
        served.add_task("mine", tmp_path / "task")
        torch.testing.assert_close(torch.stack(served(x, ["mine"] * 3)), expected)
