"""HieraDet (SAM2 trunk): `hieradet_small` always asked for LayerScale (init_values=1e-5),
but until timm 1.0.15 HieraDet did not pass it to its blocks; 1.0.20 does, adding
`blocks.N.ls1.gamma` (after attention) and `blocks.N.ls2.gamma` (after the MLP).

A per-channel scale right after a linear layer is that layer with scaled rows, so an
old file gains gammas of one and a new file goes back with each gamma folded into the
attention projection (`attn.proj`) or the MLP's output layer (`mlp.fc2`)."""
import re

import torch

from . import Migration, register

# LayerScale -> the linear layer whose output it scales
_SCALED = {"ls1": "attn.proj", "ls2": "mlp.fc2"}


def _is_old(keys):
    return not any(re.match(r"^blocks\.\d+\.ls[12]\.gamma$", k) for k in keys)


def _blocks(state):
    return sorted({int(m.group(1)) for k in state if (m := re.match(r"^blocks\.(\d+)\.attn\.proj\.weight$", k))})


def _upgrade(state):
    out = dict(state)
    for i in _blocks(state):
        for ls, linear in _SCALED.items():
            weight = state["blocks.%d.%s.weight" % (i, linear)]
            out["blocks.%d.%s.gamma" % (i, ls)] = torch.ones(weight.shape[0], dtype=weight.dtype)
    return out


def _downgrade(state):
    out = {k: v for k, v in state.items() if not re.match(r"^blocks\.\d+\.ls[12]\.gamma$", k)}
    for i in _blocks(state):
        for ls, linear in _SCALED.items():
            gamma = state["blocks.%d.%s.gamma" % (i, ls)]
            weight, bias = "blocks.%d.%s.weight" % (i, linear), "blocks.%d.%s.bias" % (i, linear)
            out[weight] = state[weight] * gamma[:, None]
            out[bias] = state[bias] * gamma
    return out


register(Migration(("hieradet_sam2",), "layer-scale", _is_old, _upgrade, _downgrade))
