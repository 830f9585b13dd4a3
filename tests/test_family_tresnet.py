"""TResNet across the 0.9 move from InplaceABN to conv + batch norm, both ways, proven on outputs.

timm <= 0.6.13 runs TResNet only with mapillary's inplace_abn, a compiled extension that
is not installed here; the old releases get an eval-only stand-in written from its CPU
kernel (inplace_abn/src/inplace_abn_cpu.cpp, forward_cpu), found first on PYTHONPATH."""
import os
import textwrap

import pytest
import torch
import torch.nn.functional as F

from cachectl.migrations import tresnet
from conftest import ATOL, INSTALLED

MODEL = "tresnet_m"

INPLACE_ABN = textwrap.dedent('''
    import torch
    import torch.nn.functional as F


    def inplace_abn(x, weight, bias, running_mean, running_var, training=True, momentum=0.1, eps=1e-05,
                    activation="leaky_relu", activation_param=0.01):
        if training:
            raise NotImplementedError("this stand-in only evaluates")
        scale = (weight.abs() + eps) / torch.sqrt(running_var + eps)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        x = x * scale.view(shape) + (bias - running_mean * scale).view(shape)
        if activation == "leaky_relu":
            return F.leaky_relu(x, activation_param)
        if activation == "elu":
            return F.elu(x, activation_param)
        return x


    inplace_abn_sync = inplace_abn
''')


@pytest.fixture(autouse=True)
def inplace_abn_stand_in(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.mktemp("site")
    (root / "inplace_abn").mkdir()
    (root / "inplace_abn" / "__init__.py").write_text("")
    (root / "inplace_abn" / "functions.py").write_text(INPLACE_ABN)
    monkeypatch.setenv("PYTHONPATH", str(root), prepend=os.pathsep)


@pytest.mark.slow
@pytest.mark.parametrize("src,dst", [("0.6.13", INSTALLED), (INSTALLED, "0.6.13")])
def test_tresnet_converts_with_equal_outputs(roundtrip, src, dst):
    result, diff = roundtrip(MODEL, src, dst)
    assert diff <= ATOL
    assert any("tresnet.inplace-abn" in s for s in result.steps)


def test_batch_norm_weights_inplace_abn_cannot_hold_fold_into_conv_and_variance():
    # random checkpoints have weights near 1; trained ones may have any sign and size
    g = torch.Generator().manual_seed(0)
    weight = torch.tensor([1.5, -0.7, 3e-6, -4e-7, 0.0, 1e-5])
    bn = {"weight": weight, "bias": torch.randn(6, generator=g), "running_mean": torch.randn(6, generator=g),
          "running_var": torch.rand(6, generator=g) + 0.5}
    conv = torch.randn(6, 4, 3, 3, generator=g)
    state = {"body.conv1.conv.weight": conv, "body.conv1.bn.num_batches_tracked": torch.tensor(3),
             **{"body.conv1.bn." + k: v for k, v in bn.items()}}
    x = torch.randn(2, 4, 8, 8, generator=g)
    want = F.batch_norm(F.conv2d(x, conv), bn["running_mean"], bn["running_var"], weight, bn["bias"], eps=1e-5)

    old = tresnet._downgrade(state)
    assert sorted(old) == ["body.conv1.0.weight", "body.conv1.1.bias", "body.conv1.1.running_mean",
                           "body.conv1.1.running_var", "body.conv1.1.weight"]
    iabn = {}
    exec(INPLACE_ABN, iabn)
    got = iabn["inplace_abn"](F.conv2d(x, old["body.conv1.0.weight"]), old["body.conv1.1.weight"], old["body.conv1.1.bias"],
                              old["body.conv1.1.running_mean"], old["body.conv1.1.running_var"],
                              training=False, activation="identity")
    assert (got - want).abs().max().item() <= ATOL
