"""Tiny random-weight captioners beside BLIP, saved as the local folders a download gives: a Florence-2 built from
transformers' own classes, and a WD-style tagger (an ONNX model that takes 0–255 BGR pictures channels-last and
gives each tag's probability, with its selected_tags.csv) exported from a tiny transformers ViT."""

import csv
import json
from pathlib import Path

FLORENCE_WORDS = ["a", "red", "blue", "green", "circle", "square", "on", "white", "background", "photo", "of"]
# (name, category): WD's categories are 9 = rating, 0 = general, 4 = character
WD_TAGS = [("general", 9), ("sensitive", 9), ("questionable", 9), ("explicit", 9), ("1girl", 0), ("long_hair", 0),
           ("red_circle", 0), ("blue_sky", 0), ("^_^", 0), ("simple_background", 0), ("solo", 0),
           ("hatsune_miku", 4), ("kirby", 4)]


def save_tiny_florence(folder: Path) -> Path:
    """Config, weights, BART tokenizer and image processor, as a downloaded Florence-2 folder holds them. The word
    tokens get a small bias, so the random model says words rather than ending at once."""
    import torch
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import (
        BartConfig,
        BartTokenizer,
        CLIPImageProcessorPil,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
        Florence2VisionConfig,
    )

    folder.mkdir(parents=True, exist_ok=True)
    words = [f"Ġ{word}" for word in FLORENCE_WORDS]
    tokens = ["<s>", "<pad>", "</s>", "<unk>", *sorted(ByteLevel.alphabet()), *words, "<mask>"]
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = BartTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                              extra_special_tokens={"image_token": "<image>"})
    images = CLIPImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False,
                                   image_seq_length=17)  # 4×4 patches after two stages, and one pooled token
    vision = Florence2VisionConfig(depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1],
                                   patch_prenorm=[False, True], embed_dim=[16, 32], num_heads=[2, 2],
                                   num_groups=[2, 2], window_size=2, projection_dim=32, drop_path_rate=0.0)
    text = BartConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
                      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                      max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.eos_token_id, forced_bos_token_id=tokenizer.bos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Florence2ForConditionalGeneration(Florence2Config(vision_config=vision, text_config=text,
                                                                  image_token_id=tokenizer.image_token_id))
    with torch.no_grad():
        model.lm_head.weight[tokenizer.convert_tokens_to_ids(words)] *= 20
    model.save_pretrained(folder)
    Florence2Processor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def save_tiny_wd_tagger(folder: Path, probabilities: list[float] | None = None) -> Path:
    """``model.onnx`` and ``selected_tags.csv`` as a WD v3 tagger's download holds them. With ``probabilities``,
    every picture gets those (one per tag of WD_TAGS), so a test knows which tags pass which thresholds."""
    import torch
    from transformers import ViTConfig, ViTModel

    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "selected_tags.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["tag_id", "name", "category", "count"])
        for index, (name, category) in enumerate(WD_TAGS):
            writer.writerow([1000 + index, name, category, 100 - index])

    class Tagger(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vit = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=32), add_pooling_layer=False)
            self.head = torch.nn.Linear(16, len(WD_TAGS))
            fixed = torch.logit(torch.tensor(probabilities)) if probabilities else torch.zeros(len(WD_TAGS))
            self.register_buffer("fixed", fixed)
            self.scale = 0.0 if probabilities else 1.0

        def forward(self, pictures: torch.Tensor) -> torch.Tensor:
            rgb = pictures.flip(-1).permute(0, 3, 1, 2) / 127.5 - 1  # BGR 0–255, channels last
            features = self.vit(pixel_values=rgb).last_hidden_state[:, 0]
            return torch.sigmoid(self.head(features) * self.scale + self.fixed)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tagger = Tagger().eval()
    torch.onnx.export(tagger, (torch.zeros(1, 32, 32, 3),), str(folder / "model.onnx"), dynamo=False,
                      input_names=["input"], output_names=["output"], dynamic_axes={"input": {0: "batch"}})
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_tiny_wd_test", "num_classes": len(WD_TAGS)}))
    return folder
