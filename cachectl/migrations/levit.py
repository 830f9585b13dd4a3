"""LeViT: timm 0.9 regrouped the flat `blocks` sequence (attention, MLP and subsampling
residuals in a row) into `stages.S.downsample` / `stages.S.blocks.B`, renamed the
stem from `patch_embed.N` to `stem.convK` and each conv/linear from `c` to `linear`;
`attention_bias_idxs` stopped being saved. timm 0.9-1.0.13 remapped old files by key
order; 1.0.14 dropped even that, and nothing maps the other way."""
import re

from . import Migration, register

_STEM = {"0": "1", "2": "2", "4": "3", "6": "4"}
# (old, new) renames inside one residual, applied to the part after its prefix
_ATTN = [(r"^(qkv|kv)\.c\.", r"\1.linear."), (r"^(q|proj)\.1\.c\.", r"\1.ln.linear."), (r"^(q|proj)\.1\.bn\.", r"\1.ln.bn.")]
_MLP = [(r"^0\.c\.", "ln1.linear."), (r"^0\.bn\.", "ln1.bn."), (r"^2\.c\.", "ln2.linear."), (r"^2\.bn\.", "ln2.bn.")]
_ATTN_BACK = [(r"^(qkv|kv)\.linear\.", r"\1.c."), (r"^(q|proj)\.ln\.linear\.", r"\1.1.c."), (r"^(q|proj)\.ln\.bn\.", r"\1.1.bn.")]
_MLP_BACK = [(r"^ln1\.linear\.", "0.c."), (r"^ln1\.bn\.", "0.bn."), (r"^ln2\.linear\.", "2.c."), (r"^ln2\.bn\.", "2.bn.")]


def _sub(rest, rules):
    for pattern, repl in rules:
        rest, n = re.subn(pattern, repl, rest)
        if n:
            break
    return rest


def _is_old(keys):
    return any(k.startswith(("patch_embed.", "blocks.")) for k in keys)


def _head(k, old_to_new):
    a, b = (".l.", ".linear.") if old_to_new else (".linear.", ".l.")
    return k.replace(a, b, 1) if k.startswith(("head.", "head_dist.")) else k


def _upgrade(state):
    kinds = {}
    for k in state:
        m = re.match(r"^blocks\.(\d+)\.(m\.qkv|m\.0|kv)\.", k)
        if m:
            kinds[int(m.group(1))] = {"m.qkv": "attn", "m.0": "mlp", "kv": "down"}[m.group(2)]
    prefix, stage, block, after = {}, 0, -1, None
    for i in sorted(kinds):
        kind = kinds[i]
        if kind == "down":
            stage, block = stage + 1, -1
            prefix[i] = ("blocks.%d." % i, "stages.%d.downsample.attn_downsample." % stage, _ATTN)
        elif kind == "attn":
            block += 1
            prefix[i] = ("blocks.%d.m." % i, "stages.%d.blocks.%d.attn." % (stage, block), _ATTN)
        elif after == "down":
            prefix[i] = ("blocks.%d.m." % i, "stages.%d.downsample.mlp." % stage, _MLP)
        else:
            prefix[i] = ("blocks.%d.m." % i, "stages.%d.blocks.%d.mlp." % (stage, block), _MLP)
        after = kind
    out = {}
    for k, v in state.items():
        m = re.match(r"^patch_embed\.(\d)\.(c|bn)\.(.*)$", k)
        if m:
            k = "stem.conv%s.%s.%s" % (_STEM[m.group(1)], "linear" if m.group(2) == "c" else "bn", m.group(3))
        elif k.startswith("blocks."):
            old, new, rules = prefix[int(k.split(".")[1])]
            k = new + _sub(k[len(old):], rules)
        else:
            k = _head(k, True)
        out[k] = v
    return out


def _downgrade(state):
    stem_back = {v: k for k, v in _STEM.items()}
    units = set()
    for k in state:
        m = re.match(r"^stages\.(\d+)\.(downsample\.attn_downsample|downsample\.mlp|blocks\.(\d+)\.(attn|mlp))\.", k)
        if m:
            s = int(m.group(1))
            if m.group(2).startswith("downsample"):
                units.add((s, -1, 0 if m.group(2).endswith("attn_downsample") else 1))
            else:
                units.add((s, int(m.group(3)), 0 if m.group(4) == "attn" else 1))
    prefix = {}
    for i, (s, b, part) in enumerate(sorted(units)):
        if b < 0:
            prefix[(s, b, part)] = (
                ("stages.%d.downsample.attn_downsample." % s, "blocks.%d." % i, _ATTN_BACK) if part == 0
                else ("stages.%d.downsample.mlp." % s, "blocks.%d.m." % i, _MLP_BACK))
        else:
            name = "attn" if part == 0 else "mlp"
            prefix[(s, b, part)] = ("stages.%d.blocks.%d.%s." % (s, b, name), "blocks.%d.m." % i,
                                    _ATTN_BACK if part == 0 else _MLP_BACK)
    by_new = {p[0]: p for p in prefix.values()}
    out = {}
    for k, v in state.items():
        m = re.match(r"^stem\.conv(\d)\.(linear|bn)\.(.*)$", k)
        if m:
            k = "patch_embed.%s.%s.%s" % (stem_back[m.group(1)], "c" if m.group(2) == "linear" else "bn", m.group(3))
        elif k.startswith("stages."):
            new = next(p for p in by_new if k.startswith(p))
            _, old, rules = by_new[new]
            k = old + _sub(k[len(new):], rules)
        else:
            k = _head(k, False)
        out[k] = v
    return out


register(Migration(("levit",), "stages", _is_old, _upgrade, _downgrade))
