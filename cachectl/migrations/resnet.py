"""ResNet: timm 1.0.31 made `ecaresnext50t_32x4d` the 50-layer net its name promises
(layers 3, 4, 6, 3); every release before built it with layers 2, 2, 2, 2, the same
net as `ecaresnext26t_32x4d`. The blocks both depths have keep their keys, so a file
of either depth loads into the other release built with the file's own depth:
`layers=` overrides the depth in every release since 0.9. Releases before 0.9 take no
such override, so a 50-layer file has nowhere to go there."""
import re

from . import Migration, register

# keys only ECA bottleneck nets have: they alone changed depth under one name, and an
# explicit --model of another depth elsewhere (resnet18 as resnet34) stays a refusal
_ECA_BOTTLENECK = ("layer1.0.conv3.weight", "layer1.0.se.conv.weight")


def _depths(keys):
    depth: dict[int, int] = {}
    for k in keys:
        m = re.match(r"^layer(\d)\.(\d+)\.", k)
        if m:
            depth[int(m.group(1))] = max(depth.get(int(m.group(1)), 0), int(m.group(2)) + 1)
    return [depth[i] for i in sorted(depth)]


def _kwargs(source, target):
    if not all(k in source for k in _ECA_BOTTLENECK):
        return {}
    ours = _depths(source)
    return {"layers": ours} if ours != _depths(target) else {}


register(Migration(("resnet",), "eca-depth", kwargs=_kwargs))
