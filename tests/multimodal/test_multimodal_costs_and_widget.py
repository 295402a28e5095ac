"""The image-token FLOP formulas, the trainer's determinism, and the explorers' figures."""

from __future__ import annotations

import pytest
import torch

from labsupport.harness.costs import encoder_layer_flops, image_tokens
from labsupport.multimodal import models, widget
from labsupport.multimodal.scans import scan_mixer


def test_image_tokens_and_layer_flops():
    assert image_tokens(224, 224, 16) == 196 and image_tokens(336, 336, 14) == 576
    with pytest.raises(ValueError, match="divisible"):
        image_tokens(224, 224, 15)
    f = encoder_layer_flops(196, 768, mlp_ratio=4)
    assert f["attention"] == 4 * 196 * 196 * 768 and f["projections"] == 8 * 196 * 768 ** 2
    assert f["total"] == f["attention"] + f["projections"] + f["mlp"]
    n = (2 + 4) * 768                                    # the crossover the docstring states
    g = encoder_layer_flops(n, 768, mlp_ratio=4)
    assert g["attention"] == g["projections"] + g["mlp"]


def test_layer_flops_count_a_real_layers_matmuls():
    from torch.utils.flop_counter import FlopCounterMode

    from labsupport.lm.layers import MLP, SoftmaxAttention
    n, d = 10, 16
    attn, mlp = SoftmaxAttention(d, 2, causal=False), MLP(d, 2)
    x = torch.randn(1, n, d)
    with FlopCounterMode(display=False) as counter:
        mlp(attn(x))
    counted = counter.get_total_flops()
    seen = {str(op) for ops in counter.get_flop_counts().values() for op in ops}
    if not any("scaled_dot_product" in op for op in seen):
        # torch <= 2.14 does not count inside the CPU's scaled_dot_product_attention (2.15 does): there, the
        # attention core written out (2 heads) adds it once
        with FlopCounterMode(display=False) as core:
            q, k, v = torch.randn(3, 1, 2, n, d // 2).unbind(0)
            ((q @ k.transpose(-1, -2)).softmax(-1)) @ v
        counted += core.get_total_flops()
    f = encoder_layer_flops(n, d, mlp_ratio=2)
    assert counted == f["total"]


def test_training_is_deterministic_per_seed():
    x, y = torch.rand(40, 1, 4, 4), torch.arange(40) % 3

    def run():
        model = models.seeded(lambda: models.PatchClassifier(image_size=4, patch=1, channels=1, d_model=8,
                                                             n_layers=1, n_classes=3, mixer=scan_mixer("row", 4, 4)), 0)
        models.train_classifier(model, x, y, steps=3, batch=8, seed=0)
        return model(x)
    assert torch.equal(run(), run())


def test_training_rejects_mismatched_inputs():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="rows"):
        models.train_classifier(model, torch.zeros(3, 2), torch.zeros(4, dtype=torch.long), steps=1)


def test_scan_figure_shades_what_the_patch_has_seen():
    fig = widget.scan_figure(torch.rand(4, 5), "row", 1, 2)
    assert "has seen 8 of 20" in fig.layout.title.text
    assert len([t for t in fig.data if t.type == "scatter"]) == 2        # one path, one marker
    fig = widget.scan_figure(torch.rand(4, 5), "cross", 0, 0)
    assert "has seen 20 of 20" in fig.layout.title.text
    with pytest.raises(ValueError):
        widget.scan_figure(torch.rand(4, 5), "row", 4, 0)


def test_merge_groups_and_figure():
    source = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    assert widget.merge_groups(source).tolist() == [0, 0, -1, 2, 2, 2, -1]
    fig = widget.merge_figure(torch.rand(2, 2), [torch.tensor([0, 0, 1, 2])], 0)
    assert "3 tokens" in fig.layout.annotations[1].text


def test_figures_hold_no_nan_a_live_widget_could_not_send():
    import json

    def strict(fig):
        return json.dumps(fig.to_plotly_json(), allow_nan=False,
                          default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    strict(widget.scan_figure(torch.rand(4, 5), "row", 1, 1))
    strict(widget.merge_figure(torch.rand(2, 2), [torch.tensor([0, 0, 1, 2])], 0))
