"""Sequencer2d: timm 0.9 regrouped the flat `blocks.S.B` sequences into
`stages.S.blocks.B`, moved each stage's trailing downsample (`blocks.S.<depth>.down`) to
the start of the next stage (`stages.S+1.downsample.down`) and put the classifier under
`head.fc`. Same math. timm 0.9+ maps old files itself; nothing maps them back."""
import re

from . import Migration, register, rename


def _is_old(keys):
    return any(k.startswith("blocks.") for k in keys)


def _upgrade_key(k):
    k = re.sub(r"^blocks\.(\d+)\.\d+\.down\.", lambda m: "stages.%d.downsample.down." % (int(m.group(1)) + 1), k)
    k = re.sub(r"^blocks\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", k)
    return re.sub(r"^head\.", "head.fc.", k)


def _upgrade(state):
    return rename(state, _upgrade_key)


def _depths(keys):
    # the old downsample sits right after a stage's last block, so its index is the depth
    depth = {}
    for k in keys:
        m = re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.", k)
        if m:
            s, b = int(m.group(1)), int(m.group(2))
            depth[s] = max(depth.get(s, 0), b + 1)
    return depth


def _downgrade(state):
    depth = _depths(state)

    def key(k):
        k = re.sub(r"^stages\.(\d+)\.downsample\.down\.",
                   lambda m: "blocks.%d.%d.down." % (int(m.group(1)) - 1, depth[int(m.group(1)) - 1]), k)
        k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"blocks.\1.\2.", k)
        return re.sub(r"^head\.fc\.", "head.", k)

    return rename(state, key)


register(Migration(("sequencer",), "stages", _is_old, _upgrade, _downgrade))
