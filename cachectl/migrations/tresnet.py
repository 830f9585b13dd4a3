"""TResNet: timm 0.4.12 to 0.6.13 follow each conv by an InplaceABN (`conv1.0` conv,
`conv1.1` norm; `conv1.0.0` / `conv1.0.1` where a blur pool follows a strided conv,
`downsample.N.0` / `.1` in the shortcut); timm 0.9 made them ConvNormAct modules
(`conv`, `bn`, `aa`) with plain batch norm, which also saves `num_batches_tracked`.

InplaceABN scales by |weight| + eps where batch norm scales by weight, so values change
too. Upward that is what timm's own filter does (|w| + eps); downward a batch-norm
weight that is negative or below eps has no InplaceABN weight of its own, so its sign
moves into the conv and running mean and its size into the running variance.
"""
import re

import torch

from . import Migration, register

EPS = 1e-5  # InplaceABN's and BatchNorm2d's default, the one both TResNets use


def _is_old(keys):
    return "body.conv1.0.weight" in keys


def _new_name(k):
    k = re.sub(r"\.(conv\d+)\.0\.0\.", r".\1.conv.", k)
    k = re.sub(r"\.(conv\d+)\.0\.1\.", r".\1.bn.", k)
    k = re.sub(r"\.(conv\d+)\.0\.", r".\1.conv.", k)
    k = re.sub(r"\.(conv\d+)\.1\.", r".\1.bn.", k)
    k = re.sub(r"\.(downsample\.\d+)\.0\.", r".\1.conv.", k)
    return re.sub(r"\.(downsample\.\d+)\.1\.", r".\1.bn.", k)


def _upgrade(state):
    out = {}
    for k, v in state.items():
        k = _new_name(k)
        out[k] = v.abs() + EPS if k.endswith(".bn.weight") else v
    return out


def _blurred(keys):
    """Prefixes of the convs a blur pool follows: the strided one of each block that
    starts a stage with a stride, told by the average pool before its shortcut conv."""
    out = set()
    for k in keys:
        m = re.match(r"^(.*\.layer\d+\.0)\.downsample\.1\.conv\.weight$", k)
        if m:
            block = m.group(1)
            # Bottleneck strides its 3x3 (conv2), BasicBlock its first conv
            out.add(block + (".conv2" if block + ".conv3.conv.weight" in keys else ".conv1"))
    return out


def _old_name(k, blurred):
    m = re.match(r"^(.*)\.(conv|bn)\.(.*)$", k)
    if not m:
        return k
    unit, part, leaf = m.groups()
    index = "0" if part == "conv" else "1"
    return "%s.%s%s.%s" % (unit, "0." if unit in blurred else "", index, leaf)


def _to_inplace_abn(state, unit):
    """Batch norm of `unit` as InplaceABN computes it, folding into the conv what
    |weight| + eps cannot say: a negative or near-zero weight."""
    w = state[unit + ".bn.weight"]
    conv, mean, var = state[unit + ".conv.weight"], state[unit + ".bn.running_mean"], state[unit + ".bn.running_var"]
    size = w.abs()
    # a zero weight leaves the channel its bias alone: silence the conv, centre at zero
    flip = torch.where(w < 0, -1.0, 1.0).to(w.dtype) * (w != 0).to(w.dtype)
    conv = conv * flip.to(conv.dtype).view(-1, *([1] * (conv.dim() - 1)))
    mean = mean * flip
    # below eps the weight is 0 and the variance carries the scale:
    # (0 + eps) / sqrt(var' + eps) == |w| / sqrt(var + eps)
    tiny = (size > 0) & (size < EPS)
    ratio = EPS / torch.where(tiny, size, torch.ones_like(size))
    var = torch.where(tiny, (var + EPS) * ratio ** 2 - EPS, var)
    weight = torch.where(size < EPS, torch.zeros_like(size), size - EPS)
    return {unit + ".conv.weight": conv, unit + ".bn.weight": weight,
            unit + ".bn.running_mean": mean, unit + ".bn.running_var": var}


def _downgrade(state):
    units = [k[: -len(".bn.weight")] for k in state if k.endswith(".bn.weight")]
    state = dict(state)
    for unit in units:
        state.update(_to_inplace_abn(state, unit))
    blurred = _blurred(state)
    # InplaceABN does not count batches
    return {_old_name(k, blurred): v for k, v in state.items() if not k.endswith(".num_batches_tracked")}


register(Migration(("tresnet",), "inplace-abn", _is_old, _upgrade, _downgrade))
