"""The LoRA tools judged by what the files do: a resized file's change against the original's, a merge against both
files applied, a baked checkpoint's outputs against the base with the LoRA attached, an extraction against the LoRA
that was baked in. Full SD1.5 shapes where the work allows it, else the demo model."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_network_types import outputs, trained_file

from lora_gradio.errors import UserError
from lora_gradio.lora_attach import attach, detach, set_strengths
from lora_gradio.lora_map import read_modules, sd15_table
from lora_gradio.lora_svd import RankRule
from lora_gradio.lora_tools import TOOL_KEY, bake, extract, merge, resize
from lora_gradio.models import load_pipeline, resolve_base
from lora_gradio.training import kohya
from lora_gradio.views import pipeline_view


def deltas(path):
    """Each module's ΔW = up · down · alpha/rank of a file, flattened to a matrix, in fp32."""
    return {name: kohya.lora_delta(item.down, item.up, (item.alpha or item.rank) / item.rank,
                                   (item.up.shape[0], item.down.flatten(1).shape[1]))
            for name, item in read_modules(load_file(str(path))).items()}


def relative(a, b):
    return float((a - b).norm() / b.norm())


def sd15_locon(path, rank=16, alpha=8.0, seed=0):
    """A random LoCon file on every attention layer and every ResBlock conv of the full SD1.5 (no model built)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (_, module_path, layer) in sd15_table().items():
        if not ("transformer_blocks" in module_path or "resnets" in module_path) or layer.weight.dim() == 1:
            continue
        shape = layer.weight.shape
        tensors[f"{name}.lora_down.weight"] = (torch.randn(rank, *shape[1:], generator=generator) * 0.1).half()
        tail = (1, 1) if len(shape) == 4 else ()
        tensors[f"{name}.lora_up.weight"] = (torch.randn(shape[0], rank, *tail, generator=generator) * 0.1).half()
        tensors[f"{name}.alpha"] = torch.tensor(alpha).half()
    metadata = {"ss_network_dim": str(rank), "ss_network_alpha": str(alpha), "ss_training_comment": "trigger: anna"}
    return kohya.save_lora(path, tensors, metadata)


@pytest.fixture(scope="module")
def sd15_file(tmp_path_factory):
    return sd15_locon(tmp_path_factory.mktemp("sd15") / "anna.safetensors")


def test_a_full_sd15_locon_resized_at_its_own_rank_is_the_same_file(sd15_file):
    tensors, metadata, report = resize(sd15_file, RankRule(16))
    before, after = deltas(sd15_file), deltas_of(tensors)
    assert set(after) == set(before) and len(before) > 200
    assert any(tensors[f"{n}.lora_down.weight"].dim() == 4 and tensors[f"{n}.lora_down.weight"].shape[2] == 3
               for n in after)  # 3×3 convs (LoCon) are resized too, and stay 3×3
    for name, delta in before.items():
        assert relative(after[name], delta) < 2e-3, name  # the same change, to fp16's precision
    assert all(m.rank == 16 and m.error < 1e-5 for m in report.modules)
    assert float(tensors[f"{next(iter(after))}.alpha"]) == 8.0  # alpha/rank kept, so training settings still read
    assert metadata["ss_network_dim"] == "16" and metadata["ss_network_alpha"] == "8"


def deltas_of(tensors):
    return {name: kohya.lora_delta(item.down, item.up, item.alpha / item.rank,
                                   (item.up.shape[0], item.down.flatten(1).shape[1]))
            for name, item in read_modules(tensors).items()}


def test_a_lower_rank_reports_each_modules_true_error_within_the_svd_bound(sd15_file, tmp_path):
    tensors, metadata, report = resize(sd15_file, RankRule(4))
    path = kohya.save_lora(tmp_path / "r4.safetensors", tensors, metadata)
    before, after = deltas(sd15_file), deltas(path)
    errors = {m.name: m.error for m in report.modules}
    for name, delta in before.items():
        true_error = relative(after[name], delta)
        assert true_error == pytest.approx(errors[name], abs=3e-3), name  # what it says is what it did
        assert errors[name] <= math.sqrt(1 - 4 / 16) + 1e-6  # the best 4 of 16 ranks keep at least 4/16 of ‖ΔW‖²
    assert {tensors[k].shape[0] for k in tensors if k.endswith("lora_down.weight")} == {4}
    done = json.loads(metadata[TOOL_KEY])
    assert done["tool"] == "resize" and done["rule"]["rank"] == 4 and done["modules"] == len(before)
    assert done["max_error"] == pytest.approx(max(errors.values()), abs=1e-5)
    assert metadata["ss_training_comment"] == "trigger: anna; resized from anna.safetensors to rank 4"
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2"
    model_hash, _ = kohya.addnet_hashes(kohya.encode_lora_file(tensors, {k: v for k, v in metadata.items()
                                                                        if k.startswith("ss_")}))
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata()["sshs_model_hash"] == model_hash  # the hash is the new file's, not the old one's


@pytest.mark.parametrize("method, value", [("sv_fro", 0.9), ("sv_ratio", 3.0)])
def test_a_dynamic_rank_keeps_the_fewest_ranks_that_meet_the_rule(demo_pipe, tmp_path, method, value):
    _, path, _ = trained_file(demo_pipe, "locon", tmp_path / "locon.safetensors")
    tensors, _, report = resize(path, RankRule(4, method, value))
    kept = {m.name: m.rank for m in report.modules}
    for name, delta in deltas(path).items():
        s = torch.linalg.svdvals(delta.double())
        if method == "sv_fro":
            share = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
            fewest = int((share < value ** 2).sum()) + 1
        else:
            fewest = int((s >= s[0] / value).sum())
        assert kept[name] == min(fewest, 4), name
        assert tensors[f"{name}.lora_down.weight"].shape[0] == kept[name]
    assert len(set(kept.values())) > 1  # the rule, not a fixed rank, chose them


@pytest.mark.parametrize("rule", [None, RankRule(8)])
def test_merging_at_weights_equals_applying_both_at_those_weights(demo_pipe, tmp_path, rule):
    _, first, _ = trained_file(demo_pipe, "lora", tmp_path / "a.safetensors")
    second = tmp_path / "b.safetensors"
    tensors = {k: v.flip(0) if k.endswith("lora_up.weight") else v for k, v in load_file(str(first)).items()}
    kohya.save_lora(second, tensors, {})  # a second, different change on the same modules
    merged, metadata, report = merge([(first, 0.6), (second, -0.3)], rule)
    path = kohya.save_lora(tmp_path / "m.safetensors", merged, metadata)
    a, b, m = deltas(first), deltas(second), deltas(path)
    for name in a:
        assert relative(m[name], 0.6 * a[name] - 0.3 * b[name]) < 2e-3, name  # rank 4 + 4 = 8: nothing is lost
    assert {r.rank for r in report.modules} == {8}
    done = json.loads(metadata[TOOL_KEY])
    assert done["sources"] == [{"file": "a.safetensors", "weight": 0.6}, {"file": "b.safetensors", "weight": -0.3}]
    view = pipeline_view(demo_pipe)  # and as the model sees it: both files at once, against the merge alone
    both, _, _ = bake(view, "demo", [(first, 0.6, 0.6), (second, -0.3, -0.3)], "fp32")
    alone, _, _ = bake(view, "demo", [(path, 1.0, 1.0)], "fp32")
    for key, weight in both.items():
        torch.testing.assert_close(alone[key], weight, atol=2e-4, rtol=1e-3)


def test_dora_and_files_of_other_models_are_refused_by_name(demo_pipe, tmp_path, sd15_file):
    _, dora, _ = trained_file(demo_pipe, "dora", tmp_path / "dora.safetensors")
    _, plain, _ = trained_file(demo_pipe, "lora", tmp_path / "plain.safetensors")
    with pytest.raises(UserError, match=r"'dora\.safetensors' is a DoRA file"):
        merge([(plain, 1.0), (dora, 1.0)], None)
    with pytest.raises(UserError, match="do not fit each other at lora_"):
        merge([(plain, 1.0), (sd15_file, 1.0)], None)
    for rule, words in ((RankRule(0), "from 1 to 1024"), (RankRule(4, "sv_fro", float("nan")), "sv_fro value"),
                        (RankRule(4, "svd"), "Unknown rank method")):
        with pytest.raises(UserError, match=words):
            resize(plain, rule)
    with pytest.raises(UserError, match="merge weight must be a number"):
        merge([(plain, float("inf")), (plain, 1.0)], None)


@pytest.mark.parametrize("network_type", ["lora", "dora"])
def test_a_baked_checkpoint_is_the_base_with_the_lora_at_those_strengths(demo_pipe, tmp_path, network_type):
    _, path, _ = trained_file(demo_pipe, network_type, tmp_path / f"{network_type}.safetensors")
    state, metadata, report = bake(pipeline_view(demo_pipe), "demo", [(path, 0.7, -0.4)], "fp32")
    checkpoint = tmp_path / "baked.safetensors"
    save_file(state, checkpoint, metadata)
    loaded = load_pipeline(resolve_base(str(checkpoint)))  # the single-file loader, as the app picks a base
    view = pipeline_view(demo_pipe)
    try:
        set_strengths(view, attach(view, path, "t"), {"unet": 0.7, "text_encoder": -0.4})
        for got, expected in zip(outputs(loaded), outputs(view), strict=True):
            torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-3)
    finally:
        detach(view)
    untouched = "first_stage_model.decoder.conv_out.weight"
    assert torch.equal(state[untouched], load_file(str(checkpoint))[untouched])
    done = json.loads(metadata[TOOL_KEY])
    assert done["loras"] == [{"file": path.name, "strength_model": 0.7, "strength_clip": -0.4}]
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1"
    assert f"All {len(read_modules(load_file(str(path))))} LoRA modules applied" in report.summary()


def test_extraction_from_a_base_with_a_known_lora_recovers_it(demo_pipe, tmp_path):
    _, path, _ = trained_file(demo_pipe, "locon", tmp_path / "known.safetensors")
    state, metadata, _ = bake(pipeline_view(demo_pipe), "demo", [(path, 1.0, 1.0)], "fp32")
    tuned = tmp_path / "tuned.safetensors"
    save_file(state, tuned, metadata)
    tensors, meta, report = extract(pipeline_view(demo_pipe), "demo", tuned, RankRule(4), RankRule(2))
    found = kohya.save_lora(tmp_path / "found.safetensors", tensors, meta)
    known, got = deltas(path), deltas(found)
    assert set(got) == set(known)  # every changed module, and only those
    for name, delta in known.items():
        assert relative(got[name], delta) < 2e-3, name
    assert max(m.error for m in report.modules) < 1e-4
    assert "modules were unchanged" in report.summary()
    assert json.loads(meta[TOOL_KEY])["tuned"] == "tuned.safetensors" and meta["ss_sd_model_name"] == "demo"
    _, _, fewer = extract(pipeline_view(demo_pipe), "demo", tuned, RankRule(1), None)
    assert all(m.rank == 1 for m in fewer.modules) and max(m.error for m in fewer.modules) > 0.05
    assert "3×3 convs are left out" in fewer.summary()
    with pytest.raises(UserError, match="nothing to extract"):
        extract(pipeline_view(demo_pipe), "demo", tuned_of_base(demo_pipe, tmp_path), RankRule(4), None)


def tuned_of_base(demo_pipe, tmp_path):
    from lora_gradio.ldm_layout import pipeline_to_ldm

    same = tmp_path / "same.safetensors"
    save_file(pipeline_to_ldm(demo_pipe), same)
    return same
