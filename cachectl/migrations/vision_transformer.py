"""Vision Transformer: what changed between timm releases, beyond names and heads.

- timm 0.6 dropped the pre-logits layer (`pre_logits.fc`, a linear + tanh before the
  head) that 0.5.4 and earlier built into four `*_in21k` models; 0.6+ filters it out of
  old files, which then load but compute something else. Nothing in 0.6+ can run it, so
  old files of those models are refused. Files of 0.6+ go back as the plain model of the
  same name without the suffix (same layout, no pre-logits in any release).
- timm 1.0 gave `vit_medium_patch16_reg4_gap_256` layer scale (`blocks.N.ls1/ls2.gamma`,
  init_values=1e-5); 0.9.16 built it without. Any release builds either one through
  `init_values`, so the target is built with the file's own choice.

Renames (0.9 made `*_in21k`, `*_dino`, `*_clip_laion2b` tags of a base name; the
deprecated names still build), default heads (0.9.2, 0.9.16, vitamin in 1.0.31) and the
hybrids' move to vision_transformer_hybrid.py need no migration: the planner follows
deprecations and keeps the file's own number of classes.
"""
from . import MathChange, Migration, register, register_math_change

PRE_LOGITS = ("vit_base_r50_s16_224_in21k", "vit_base_resnet50_224_in21k",
              "vit_large_patch32_224_in21k", "vit_huge_patch14_224_in21k")
# any truthy value builds LayerScale; the file's gammas overwrite it. 0 builds none
# (None would be dropped by timm.create_model and leave the model's default).
WITH_LAYER_SCALE, WITHOUT_LAYER_SCALE = 1e-5, 0


def _has_layer_scale(keys):
    return "blocks.0.ls1.gamma" in keys


def _never(keys):
    # the keys are the same once the target is built with the file's layer scale
    return False


def _same(state):
    return dict(state)


def _layer_scale_kwargs(source, target):
    if _has_layer_scale(source) == _has_layer_scale(target):
        return {}
    return {"init_values": WITH_LAYER_SCALE if _has_layer_scale(source) else WITHOUT_LAYER_SCALE}


register(Migration(("vision_transformer",), "layer-scale-follows-the-file", _never, _same, _same, _layer_scale_kwargs))
register_math_change(MathChange(
    ("vision_transformer",), lambda name: name in PRE_LOGITS, "0.4.12", "0.5.4",
    "timm 0.4.12 to 0.5.4 end it with a pre-logits layer (linear + tanh) that later releases do not have"))
