"""MaxxViT / CoAtNet: timm 0.9 gave the CoAtNet configs a `head_hidden_size`, which swaps
the final `norm` + linear classifier for a head that pools, normalises (`head.norm`)
and adds a tanh pre-logits layer (`head.pre_logits.fc`) before `head.fc`. A file from
0.6.13 or earlier has no pre-logits weights, so it loads into the newer model built
with `head_hidden_size=0` (timm.create_model drops None kwargs), which restores the old
head with the old keys; a 0.9+ file built that way goes back as it is. The pre-logits
layer has no counterpart in 0.6.13, so a file trained with it cannot go back."""
from . import Migration, register


def _has_old_head(keys):
    # the old head normalises the feature map before pooling, at the top level
    return "norm.weight" in keys


def _kwargs(source, target):
    if _has_old_head(source) and any(k.startswith("head.pre_logits.") for k in target):
        return {"head_hidden_size": 0}
    return {}


register(Migration(("maxxvit",), "head-without-pre-logits", kwargs=_kwargs))
