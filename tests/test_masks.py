"""Masked loss: a mask from transparency or a name.mask.png, kept through import and Prepare, shown by the dataset's
thumbnails and report; on the demo model the half a mask leaves out gets no gradient."""

from pathlib import PurePosixPath

import torch
from bad_files import photo_bytes
from PIL import Image
from safetensors import safe_open

from lora_gradio.dataset import list_images, prepare_dataset, scan_training_folder, write_caption
from lora_gradio.imports import import_image
from lora_gradio.quality import check_dataset, thumbnail
from lora_gradio.training.config import apply_overrides
from lora_gradio.training.data import TrainData
from lora_gradio.training.kohya_config import read_kohya_config
from lora_gradio.training.loop import Trainer, train


def half_masked(folder, count, size=64):
    """``count`` demo-like pictures whose left half is left out: odd ones by transparency, even ones by a
    name.mask.png; the two halves differ in colour, so the mask is what tells them apart."""
    folder.mkdir(parents=True)
    for index in range(count):
        picture = Image.new("RGB", (size, size), (200, 30 + 20 * index, 40))
        picture.paste((20, 60, 220), (size // 2, 0, size, size))
        keep = Image.new("L", (size, size), 0)
        keep.paste(255, (size // 2, 0, size, size))
        if index % 2:
            picture.putalpha(keep)
        else:
            keep.save(folder / f"ring{index}.mask.png")
        picture.save(folder / f"ring{index}.png")
        write_caption(folder / f"ring{index}.png", "lgdemo, a blue ring")
    return folder


def output_gradients(monkeypatch):
    """The gradient of the loss with respect to the UNet's prediction, for every step a run makes."""
    grads = []
    step = Trainer.train_step

    def watch(_module, _inputs, output):
        output.sample.register_hook(grads.append)

    def recording(self, batches):
        hook = self.unet.register_forward_hook(watch)
        try:
            return step(self, batches)
        finally:
            hook.remove()

    monkeypatch.setattr(Trainer, "train_step", recording)
    return grads


def test_the_half_a_mask_leaves_out_gets_no_gradient(demo_spec, quick_config, tmp_path, monkeypatch):
    data = half_masked(tmp_path / "data", 4)
    grads = output_gradients(monkeypatch)
    config = apply_overrides(quick_config, {"masked_loss": True, "max_train_steps": 1, "batch_size": 4,
                                            "resolution": 64, "enable_buckets": False, "validation_images": 0})
    events = []
    result = train(config, demo_spec, TrainData(data), tmp_path / "masked", on_event=events.append)
    assert result.steps == 1 and len(grads) == 1
    grad = grads[0]  # batch × 4 × 8 × 8: the left four latent columns are the left half of every picture
    assert grad.shape[-1] == 8 and torch.count_nonzero(grad[..., :4]) == 0
    assert torch.count_nonzero(grad[..., 4:]) == grad[..., 4:].numel()
    assert not [e for e in events if e.kind == "warning" and "no mask" in e.message]
    with safe_open(str(result.lora_path), "pt") as handle:
        assert handle.metadata()["ss_masked_loss"] == "True"

    grads.clear()
    train(apply_overrides(config, {"masked_loss": False}), demo_spec, TrainData(data), tmp_path / "whole")
    assert torch.count_nonzero(grads[0][..., :4]) == grads[0][..., :4].numel()  # off: the whole picture counts


def test_masks_come_through_import_prepare_and_the_report(tmp_path):
    sources = half_masked(tmp_path / "sources", 2, size=640)
    images = tmp_path / "images"
    stored = {}
    for path in sorted(sources.glob("*.png")):
        result, _ = import_image(path.read_bytes(), PurePosixPath(path.name), images)
        stored[path.name] = result
    assert "transparency kept" in stored["ring1.png"].message
    assert (stored["ring0.mask.png"].status, stored["ring0.mask.png"].message) == ("imported", "loss mask of ring0.*")
    with Image.open(images / "ring1.png") as kept:
        assert kept.mode == "RGBA" and kept.getchannel("A").getextrema() == (0, 255)
    assert [p.name for p in list_images(images)] == ["ring0.png", "ring1.png"]  # a mask is not a picture to train
    for name in ("ring0.png", "ring1.png"):
        write_caption(images / name, "lgdemo, a blue ring")

    report = check_dataset(images).markdown()
    assert "Loss masks on 2 of 2 images" in report
    for name in ("ring0.png", "ring1.png"):
        with Image.open(thumbnail(images / name, images)) as small:
            left, right = small.getpixel((10, small.height // 2)), small.getpixel((small.width - 10, small.height // 2))
        assert max(left) < 110 and right[2] > 180  # the left half darkened, the kept half as it is

    prepare_dataset(images, tmp_path / "prepared", 512)
    scan = scan_training_folder(images, prepared=tmp_path / "prepared", masks=True)
    assert [(i.path.parent.name, i.mask.name) for i in scan.images] == [("prepared", "ring0.mask.png"),
                                                                         ("prepared", "ring1.png")]
    assert all(i.mask.parent == images for i in scan.images)  # the originals', whose transparency Prepare drops
    assert all(i.mask is None for i in scan_training_folder(images).images)  # only asked for with masked loss

    (images / "ring0.mask.png").write_bytes(b"not a picture")
    (images / "plain.png").write_bytes(photo_bytes(3))
    broken = scan_training_folder(images, masks=True)
    assert [i.mask for i in broken.images if i.path.name != "ring1.png"] == [None, None]
    assert any("ring0.mask.png: not an image" in w and "ring0.png is learnt whole" in w for w in broken.warnings)
    assert any("2 of 3 images have no mask" in w and "plain.png" in w for w in broken.warnings)


def test_kohya_files_turn_masked_loss_on_both_ways(tmp_path):
    assert read_kohya_config('{"masked_loss": true}', "gui.json").settings["masked_loss"] is True
    subset = read_kohya_config('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\nalpha_mask = true\n',
                               "dataset.toml")
    assert subset.settings["masked_loss"] is True
