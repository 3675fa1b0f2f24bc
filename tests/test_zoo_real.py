"""Real weights of the offline zoo: ImageNet predictions and agreement with the ONNX source."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from vprompt.backbones import Backbone, load_backbone
from vprompt.backbones.zoo import ZOO

pytestmark = pytest.mark.slow

ESPRESSO = 967
CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _require(name: str) -> Path:
    entry = ZOO[name]
    path = entry.source_path()
    if path is None:
        pytest.skip(f"zoo:{name} needs `{entry.install}`")
    return path


@pytest.fixture(scope="module")
def zoo_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh cache for this module, so the first load really converts."""
    path = tmp_path_factory.mktemp("vprompt-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VPROMPT_CACHE", str(path))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield path


@pytest.fixture(scope="module")
def lite0(zoo_cache: Path) -> Backbone:
    _require("efficientnet-lite0")
    return load_backbone("zoo:efficientnet-lite0", keep_head=True)


@pytest.fixture(scope="module")
def dinov2(zoo_cache: Path) -> Backbone:
    _require("dinov2-s")
    return load_backbone("zoo:dinov2-s", img_size=224)


def _imagenet_probs(bb: Backbone, image: np.ndarray) -> torch.Tensor:
    from PIL import Image
    from timm.data import create_transform

    dc = bb.data_config
    transform = create_transform(
        input_size=dc.input_size,
        interpolation=dc.interpolation,
        mean=dc.mean,
        std=dc.std,
        crop_pct=dc.crop_pct,
    )
    x = transform(Image.fromarray(image)).unsqueeze(0)  # (1, 3, 224, 224)
    with torch.no_grad():
        return bb.model(x).softmax(-1)[0]  # (1000,)


def test_lite0_classifies_coffee_as_espresso(lite0: Backbone) -> None:
    from skimage import data

    probs = _imagenet_probs(lite0, data.coffee())
    assert int(probs.argmax()) == ESPRESSO
    assert float(probs[ESPRESSO]) > 0.9


def test_lite0_classifies_chelsea_as_a_cat(lite0: Backbone) -> None:
    from skimage import data

    probs = _imagenet_probs(lite0, data.chelsea())
    assert int(probs.argmax()) in CATS


def test_lite0_headless_by_default(lite0: Backbone, zoo_cache: Path) -> None:
    bb = load_backbone("zoo:efficientnet-lite0", img_size=160)
    assert bb.model.num_classes == 0 and bb.model.num_features == 1280
    assert bb.data_config.input_size == (3, 160, 160) and bb.data_config.mean == (0.5, 0.5, 0.5)
    assert all(not p.requires_grad for p in bb.model.parameters()) and not bb.model.training
    with torch.no_grad():
        assert bb.model.forward_features(torch.zeros(1, 3, 160, 160)).shape == (1, 1280, 5, 5)
    lite0_body = {
        k: v for k, v in lite0.model.state_dict().items() if not k.startswith("classifier")
    }
    for k, v in bb.model.state_dict().items():
        torch.testing.assert_close(v, lite0_body[k], rtol=0, atol=0)


def _onnx_with_final_layernorm(path: Path):
    """An in-memory copy of the ONNX model that also outputs the backbone's final LayerNorm.

    The final LayerNorm's output is the ``Add`` that adds ``backbone.layernorm.bias``.
    """
    import onnx

    model = onnx.load(str(path))
    node = next(
        n for n in model.graph.node if n.op_type == "Add" and "backbone.layernorm.bias" in n.input
    )
    name = node.output[0]
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
    )
    return model, name


def test_dinov2_matches_onnx_backbone(dinov2: Backbone) -> None:
    import onnxruntime as ort

    model, out_name = _onnx_with_final_layernorm(_require("dinov2-s"))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 224, 224, generator=g)
    (expected,) = session.run([out_name], {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        got = dinov2.model.forward_features(x)  # (2, 1 + 16 * 16, 384)
    assert got.shape == (2, 257, 384) == expected.shape
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-4)


def test_dinov2_metadata(dinov2: Backbone) -> None:
    assert dinov2.arch == "vit_small_patch14_dinov2" and dinov2.model.num_classes == 0
    dc = dinov2.data_config
    assert dc.input_size == (3, 224, 224) and dc.interpolation == "bicubic"
    assert dc.mean == (0.485, 0.456, 0.406) and dc.std == (0.229, 0.224, 0.225)
    assert all(not p.requires_grad for p in dinov2.model.parameters()) and not dinov2.model.training
    assert dinov2.fingerprint == load_backbone("zoo:dinov2-s").fingerprint  # 224 is the default


def test_dinov2_112_uses_cache_and_runs(dinov2: Backbone, zoo_cache: Path) -> None:
    entry = ZOO["dinov2-s"]
    cache_file = entry.cache_path()
    assert cache_file.parent.parent == zoo_cache and entry.is_cached()
    mtime = cache_file.stat().st_mtime_ns
    bb = load_backbone("zoo:dinov2-s", img_size=112)
    assert cache_file.stat().st_mtime_ns == mtime  # read back, not converted again
    assert bb.model.patch_embed.grid_size == (8, 8) and bb.model.pos_embed.shape == (1, 65, 384)
    with torch.no_grad():
        tokens = bb.model.forward_features(torch.randn(3, 3, 112, 112))
    assert tokens.shape == (3, 1 + 64, 384) and torch.isfinite(tokens).all()
    assert bb.fingerprint != dinov2.fingerprint  # a different position table
