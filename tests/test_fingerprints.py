"""Math fingerprints: what each catalogued (model, release) computes, and conversion refusing
to carry a file between entries that compute differently (issue 9, part 1).

The fingerprints are the shipped ones (cachectl/data/catalog/fingerprints-v2.json.gz, made by
cachectl catalog build); a test needing a release or model the shipped file does
not have yet is skipped with the reason."""
import json
import os
import subprocess

import pytest
import timm
import torch

from cachectl import _fingerprint, migrations, numerics
from cachectl.catalog import Catalog, Fingerprint, same_math, version_key
from cachectl.convert import convert
from cachectl.errors import NoPlanError
from conftest import ATOL, INSTALLED, make_checkpoint, python_for, run_in
from tools.timm_releases import UNCATALOGUED

pytestmark = pytest.mark.slow  # real timm releases: the full tier only (make test-fast skips it)


@pytest.fixture(scope="module")
def catalog():
    return Catalog.load()


def fp(catalog, release, name):
    found = catalog.fingerprint(release, name)
    if found is None:
        pytest.skip(catalog.why_no_fingerprint(release, name))
    return found


def test_weights_are_a_function_of_key_and_shape():
    a = _fingerprint.generated_tensor("blocks.0.attn.qkv.weight", (96, 32))
    assert torch.equal(a, _fingerprint.generated_tensor("blocks.0.attn.qkv.weight", (96, 32)))
    assert not torch.equal(a, _fingerprint.generated_tensor("blocks.1.attn.qkv.weight", (96, 32)))
    assert a.std() == pytest.approx(32 ** -0.5, rel=0.2)  # scaled by fan-in
    assert (_fingerprint.generated_tensor("bn1.running_var", (64,)) > 0).all()
    assert _fingerprint.generated_tensor("norm.weight", (64,)).mean() == pytest.approx(1.0, abs=0.1)


def test_integer_and_derived_buffers_are_kept_as_built():
    keep = _fingerprint.is_generated
    assert not keep("bn1.num_batches_tracked", torch.zeros((), dtype=torch.long), True)
    assert not keep("layers.0.blocks.0.attn_mask", torch.zeros(4, 49, 49), True)
    assert keep("bn1.running_mean", torch.zeros(4), True)
    assert keep("head.weight", torch.zeros(4, 4), False)


class _InitSkippedOnMeta(torch.nn.Module):
    """timm 1.0.23's and 1.0.24's pattern (Swin, LeViT, BEiT, EVA attention): a module
    computes its non-persistent buffers only when its parameters are not on meta."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.register_buffer("index", torch.empty(4, dtype=torch.long), persistent=False)
        self.register_buffer("k_bias", torch.empty(4), persistent=False)
        self.pretrained_cfg = {"input_size": (4,)}
        if not self.proj.weight.is_meta:
            self.init_non_persistent_buffers()

    def init_non_persistent_buffers(self):
        self.index.copy_(torch.tensor([3, 1, 2, 0]))
        self.k_bias.zero_()

    def forward(self, x):
        return self.proj(x)[..., self.index] + self.k_bias


class _InitOnParameterDevice(_InitSkippedOnMeta):
    """timm 1.0.23's Swin V2: the skipped init, made again, computes on the parameters' device."""

    def init_non_persistent_buffers(self):
        self.index.copy_(torch.tensor([3, 1, 2, 0], device=self.proj.weight.device))
        self.k_bias.zero_()


@pytest.mark.parametrize("module", [_InitSkippedOnMeta, _InitOnParameterDevice])
def test_buffers_a_release_skips_on_meta_are_computed_not_left_as_memory(monkeypatch, module):
    agent = _fingerprint.load_agent()
    monkeypatch.setattr(timm, "create_model", lambda name, **kw: module())
    built = agent["empty_model"]("like_swin_in_1_0_23")
    assert built.proj.weight.is_meta == (module is _InitSkippedOnMeta)  # else built with real parameters
    assert torch.equal(built.index, torch.tensor([3, 1, 2, 0])) and not built.k_bias.any()
    got = _fingerprint.fingerprint_name("like_swin_in_1_0_23", agent)["fingerprint"]
    plain = _fingerprint.fingerprint(module())
    assert (got["values"], got["sum"], got["weights"]) == (plain["values"], plain["sum"], plain["weights"])


def _fp(**kw):
    base = dict(release="r", name="m", method=1, weights="w", input=(3, 224, 224), shape=(1, 4),
                total=1.0, abs_total=4.0, values=(1.0, -1.0, 1.5, -0.5))
    return Fingerprint(**{**base, **kw})


def test_same_math_is_a_tolerance_and_unknown_where_not_comparable():
    assert same_math(_fp(), _fp(values=(1.0 + 1e-6, -1.0, 1.5, -0.5))) is True
    assert same_math(_fp(), _fp(values=(1.01, -1.0, 1.5, -0.5))) is False
    assert same_math(_fp(), _fp(total=1.1)) is False
    assert same_math(_fp(), _fp(weights="other")) is None  # other tensors: no common weights
    assert same_math(_fp(), _fp(input=(3, 256, 256))) is None
    assert same_math(_fp(), None) is None


def test_catalog_accessor(catalog):
    got = fp(catalog, "0.9.16", "resnet50")
    assert got.release == "0.9.16" and got.name == "resnet50" and got.shape == (1, 1000)
    assert catalog.fingerprint("0.9.16", "resnet50.a1_in1k") == got  # a pretrained tag is ignored
    assert "0.9.16" in catalog.fingerprinted_releases
    assert catalog.why_no_fingerprint("0.9.16", "resnet50") is None
    assert catalog.fingerprint("9.9.9", "resnet50") is None
    assert "holds no fingerprints of timm 9.9.9" in catalog.why_no_fingerprint("9.9.9", "resnet50")
    assert catalog.fingerprint("0.9.16", "no_such_model") is None


def test_a_model_over_the_budget_says_so(catalog):
    rel = catalog._fingerprints().get("0.9.16")
    if not rel or not rel["skipped"]:
        pytest.skip("timm 0.9.16 has no model over the budget in the shipped file")
    name = sorted(rel["skipped"])[0]
    assert catalog.fingerprint("0.9.16", name) is None
    assert "budget" in catalog.why_no_fingerprint("0.9.16", name)


def test_an_unchanged_model_computes_the_same_in_every_release(catalog):
    # resnet50's code and layout are the same from 0.4.12 to 1.0.31
    prints = [catalog.fingerprint(r, "resnet50") for r in catalog.fingerprinted_releases]
    prints = [p for p in prints if p is not None]
    if len(prints) < 2:
        pytest.skip("fewer than two releases have a fingerprint of resnet50")
    assert all(same_math(prints[0], p) for p in prints[1:]), [p.release for p in prints]


# resnet18 ends 1e-7 apart between CPUs; the others' activations grow large on generated
# weights, and they ended 1e-5 to 3e-3 apart on an AVX-512 machine until the kernels were
# pinned (cachectl/numerics.py): a machine that cannot reproduce them would read as a change
@pytest.mark.parametrize("name", ["resnet18", "visformer_tiny", "repvit_m1", "efficientvit_m0", "resnest200e"])
def test_a_release_reproduces_its_catalogued_fingerprint_on_this_machine(catalog, name):
    shipped = fp(catalog, "0.9.16", name)
    proc = subprocess.run([str(python_for("0.9.16")), _fingerprint.__file__, name], capture_output=True, text=True,
                          check=True, cwd="/", env=numerics.pinned(dict(os.environ, OMP_NUM_THREADS="1")))
    again = Fingerprint.taken("0.9.16", name, json.loads(proc.stdout)["fingerprint"])
    assert same_math(shipped, again) is True, (shipped, again)
    assert again.weights == shipped.weights


def test_look_alikes_that_pad_differently_differ(catalog):
    a, b = fp(catalog, "1.0.31", "efficientnet_b0"), fp(catalog, "1.0.31", "tf_efficientnet_b0")
    assert a.weights == b.weights  # the same keys and shapes ...
    assert same_math(a, b) is False  # ... and other math


def test_distilled_pit_changed_math_without_changing_tensors(catalog):
    old, new = fp(catalog, "0.9.16", "pit_ti_distilled_224"), fp(catalog, "1.0.31", "pit_ti_distilled_224")
    assert old.weights == new.weights
    assert same_math(old, new) is False
    assert same_math(fp(catalog, "0.9.16", "pit_ti_224"), fp(catalog, "1.0.31", "pit_ti_224")) is True


def _boundary_pairs(catalog, change):
    """(inside, outside) fingerprinted release pairs across a hand-written math change."""
    span = (version_key(change.first), version_key(change.last))
    inside = [r for r in catalog.fingerprinted_releases if span[0] <= version_key(r) <= span[1]]
    outside = [r for r in catalog.fingerprinted_releases if r not in inside]
    return [(a, b) for a in inside for b in outside]


# Changes whose releases also differ in layout, so no common weights exist for both sides:
# fingerprints cannot see them, the family's cross-version test proves them.
LAYOUT_CHANGED_TOO = {
    ("poolformer", "0.6.13"): "poolformer's keys moved into metaformer in 0.9 (test_family_metaformer)",
    ("vovnet", "0.4.12"): "ese_vovnet39b_evos's EvoNorm keys changed in 0.5 (test_family_vovnet)",
}


@pytest.mark.parametrize("change", migrations.all_math_changes(), ids=lambda c: "%s-%s" % (c.families[0], c.last))
def test_the_fingerprints_confirm_each_hand_written_math_change(catalog, change):
    confirmed, contradicted, other_tensors = [], [], []
    for inside, outside in _boundary_pairs(catalog, change):
        for name, entry in catalog.models(inside).items():
            if entry.family not in change.families or not change.applies(name) or name not in catalog.models(outside):
                continue
            verdict = same_math(catalog.fingerprint(inside, name), catalog.fingerprint(outside, name))
            where = "%s %s/%s" % (name, inside, outside)
            if verdict is False:
                confirmed.append(where)
            elif verdict is True:
                contradicted.append(where)
            elif catalog.fingerprint(inside, name) and catalog.fingerprint(outside, name):
                other_tensors.append(where)
    assert not contradicted, "fingerprints say these compute the same across %s-%s: %s" % (
        change.first, change.last, contradicted)
    if (change.families[0], change.last) in LAYOUT_CHANGED_TOO:
        return  # no weights fit both sides: nothing for fingerprints to confirm or contradict
    if not confirmed:
        pytest.skip("no release pair across %s-%s has fingerprints of an affected model yet (%d with other tensors)" % (
            change.first, change.last, len(other_tensors)))


def test_distilled_pit_saved_by_0_9_16_is_never_converted_different_for_1_0_31(targets, tmp_path, catalog):
    fp(catalog, "0.9.16", "pit_ti_distilled_224")
    fp(catalog, "1.0.31", "pit_ti_distilled_224")
    made = make_checkpoint("0.9.16", "pit_ti_distilled_224")
    try:
        result = convert(made.path, tmp_path / "out.safetensors", targets(INSTALLED))
    except NoPlanError as exc:
        assert "pit_ti_distilled_224" in exc.problem and "0.9.16" in exc.problem and "1.0.31" in exc.problem
        assert "fingerprints" in exc.problem
        assert "convert it for timm" in exc.fix.lower()
        return
    got = run_in(INSTALLED, {"name": result.model.name, "kwargs": dict(result.model.kwargs)}, result.output, tmp_path)
    assert (got - made.logits).abs().max().item() <= ATOL


def test_an_unchanged_model_converts_with_its_math_verified(roundtrip, catalog):
    fp(catalog, "0.9.16", "resnet18")
    fp(catalog, "1.0.31", "resnet18")
    result, diff = roundtrip("resnet18", "0.9.16", INSTALLED)
    assert diff <= ATOL
    math = [s for s in result.steps if s.startswith("math:")]
    assert math and "fingerprints" in math[0] and "0.9.16" in math[0], result.steps


def test_a_migrated_conversion_has_its_math_proven_by_running(roundtrip):
    # pit 0.6.13 -> 1.0.31 needs a migration: no two catalog entries share its tensors, so
    # the proof runs the migration on 0.6.13's fingerprint weights in 1.0.31
    result, diff = roundtrip("pit_ti_224", "0.6.13", INSTALLED)
    assert diff <= ATOL
    assert any(s.startswith("migration pit.") for s in result.steps), result.steps
    math = [s for s in result.steps if s.startswith("math:")]
    assert math and "computes like pit_ti_224 of timm" in math[0] and "0.6.13" in math[0], result.steps
    assert "run in timm %s on the fingerprint weights" % timm.__version__ in math[0], result.steps


def test_a_release_the_catalog_lacks_has_its_math_proven_by_running(targets, tmp_path, catalog_without):
    # a timm newer than this cachectl's catalog: no fingerprint of the target to compare,
    # so the conversion runs the source release's fingerprint weights in the target
    catalog_without(UNCATALOGUED)
    made = make_checkpoint("0.9.16", "resnet18")
    result = convert(made.path, tmp_path / "out.safetensors", targets(UNCATALOGUED))
    math = [s for s in result.steps if s.startswith("math:")]
    assert math and "computes like resnet18 of timm" in math[0], result.steps
    assert "run in timm %s" % UNCATALOGUED in math[0], result.steps
    got = run_in(UNCATALOGUED, {"name": result.model.name, "kwargs": dict(result.model.kwargs)}, result.output, tmp_path)
    assert (got - made.logits).abs().max().item() <= ATOL


def test_a_release_the_catalog_lacks_is_refused_where_its_run_computes_otherwise(targets, tmp_path, catalog_without):
    # convnext_tiny's layout is made by 0.5.4 and by 0.6.13 on, which normalise differently;
    # the run in the uncatalogued target tells which side it is on
    catalog_without(UNCATALOGUED)
    made = make_checkpoint("0.6.13", "convnext_tiny")
    with pytest.raises(NoPlanError) as exc:
        convert(made.path, tmp_path / "out.safetensors", targets(UNCATALOGUED))
    assert "computes differently in timm %s than in timm 0.5.4" % UNCATALOGUED in exc.value.problem
    assert "run in timm %s" % UNCATALOGUED in exc.value.problem
    assert "--source-timm" in exc.value.fix
    result = convert(made.path, tmp_path / "out.safetensors", targets(UNCATALOGUED), source_timm="0.6.13")
    got = run_in(UNCATALOGUED, {"name": result.model.name, "kwargs": dict(result.model.kwargs)}, result.output, tmp_path)
    assert (got - made.logits).abs().max().item() <= ATOL


def test_a_layout_made_with_two_maths_is_refused_and_the_fitting_releases_named(targets, tmp_path, catalog):
    # convnext_tiny's layout is the same from 0.5.4 on; 0.5.4 normalises with another variance
    fp(catalog, "0.5.4", "convnext_tiny")
    fp(catalog, "0.6.13", "convnext_tiny")
    fp(catalog, "1.0.31", "convnext_tiny")
    made = make_checkpoint("0.6.13", "convnext_tiny")
    with pytest.raises(NoPlanError) as exc:
        convert(made.path, tmp_path / "out.safetensors", targets(INSTALLED))
    assert "2 ways" in exc.value.problem and "nothing in the file says which" in exc.value.problem
    assert "if timm 0.5.4 made it, convert it for timm 0.5.4" in exc.value.fix.lower()
    assert "--source-timm" in exc.value.fix
    # told which release saved it, the file converts, computing as it did there
    result = convert(made.path, tmp_path / "out.safetensors", targets(INSTALLED), source_timm="0.6.13")
    assert result.source_timm_versions == ("0.6.13",) and result.steps[-1].startswith("math: ")
    got = run_in(INSTALLED, {"name": result.model.name, "kwargs": dict(result.model.kwargs)}, result.output, tmp_path)
    assert (got - made.logits).abs().max().item() <= ATOL
    # and a file cachectl wrote says it itself: converting it again needs no flag
    again = convert(result.output, tmp_path / "again.safetensors", targets("0.6.13"))
    assert again.source_timm_versions == (result.target_timm,)
    with pytest.raises(NoPlanError, match="does not make this layout"):
        convert(made.path, tmp_path / "x.safetensors", targets(INSTALLED), source_timm="0.4.12")


def test_a_math_change_no_table_names_is_caught(targets, tmp_path, catalog):
    # found by the fingerprints: mobilenetv3_rw computes otherwise from 0.9.16 on, same tensors
    old, new = fp(catalog, "0.9.2", "mobilenetv3_rw"), fp(catalog, "0.9.16", "mobilenetv3_rw")
    assert old.weights == new.weights and same_math(old, new) is False
    made = make_checkpoint("0.9.2", "mobilenetv3_rw")
    try:
        result = convert(made.path, tmp_path / "out.safetensors", targets("0.9.16"))
    except NoPlanError as exc:
        assert "mobilenetv3_rw" in exc.problem and "fingerprints" in exc.problem
        return
    got = run_in("0.9.16", {"name": result.model.name, "kwargs": dict(result.model.kwargs)}, result.output, tmp_path)
    assert (got - made.logits).abs().max().item() <= ATOL


def test_a_file_carrying_other_derived_tables_than_the_target_says_its_math_is_unverified(targets, tmp_path):
    # fingerprints and proofs run every release on the index tables it derives itself; a
    # file handing the target other tables (here a tampered attention_bias_idxs, which
    # timm saves for efficientformer) is not covered by them, and the conversion says so
    from safetensors.torch import save_file

    state = timm.create_model("efficientformer_l1").state_dict()
    key = next(k for k in state if k.endswith("attention_bias_idxs"))
    save_file(state, tmp_path / "own.safetensors")
    own = convert(tmp_path / "own.safetensors", tmp_path / "own-out.safetensors", targets(INSTALLED))
    math = next(s for s in own.steps if s.startswith("math:"))
    assert "computes like efficientformer_l1" in math and "derives" not in math, own.steps
    state[key] = state[key].flip(-1).contiguous()
    save_file(state, tmp_path / "tampered.safetensors")
    tampered = convert(tmp_path / "tampered.safetensors", tmp_path / "tampered-out.safetensors", targets(INSTALLED))
    math = next(s for s in tampered.steps if s.startswith("math:"))
    assert "unverified: " in math and "the file's %s differ from the tables timm %s derives" % (key, timm.__version__) in math, tampered.steps


def test_a_catalog_replaced_is_freed_with_the_tables_it_decoded():
    # a daemon replaces its catalog each time an environment is catalogued anew: the old
    # one (its decoded tables tens of MB) must go, not stay held by a cache on the class
    import gc
    import gzip
    import weakref

    from cachectl.catalog import index_path

    with gzip.open(index_path(), "rt") as f:
        catalog = Catalog(json.load(f), index_path())
    catalog.models(catalog.releases[-1])
    catalog.renames("resnet50")
    catalog.layout_key_sets()
    gone = weakref.ref(catalog)
    del catalog
    gc.collect()
    assert gone() is None
