"""Regenerate the bundled CLIP tokenizer from OpenAI's BPE merges, so SD1.x loads with no hub access.

Usage: ``python -m lora_gradio.configs.build_clip_tokenizer bpe_simple_vocab_16e6.txt.gz``. The file ships inside the
open-clip-torch wheel (``pip download --no-deps open-clip-torch``, path ``open_clip/bpe_simple_vocab_16e6.txt.gz``).
"""

import gzip
import json
import sys
from pathlib import Path

TOKENIZER_DIR = Path(__file__).parent / "sd15" / "tokenizer"
MERGE_LINES = slice(1, 48895)  # CLIP uses 48,894 merges: 49,408 tokens minus 2 x 256 bytes and 2 specials.


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for raw bytes, in the order byte-level BPE vocabularies list them."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def build(bpe_gz: Path, out_dir: Path = TOKENIZER_DIR) -> None:
    """Write vocab.json, merges.txt and the tokenizer configs that CLIPTokenizer reads."""
    with gzip.open(bpe_gz, "rt", encoding="utf-8") as handle:
        merges = handle.read().split("\n")[MERGE_LINES]
    symbols = byte_symbols()
    vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m.split()) for m in merges)]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
              "clean_up_tokenization_spaces": True, "errors": "replace", "add_prefix_space": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    build(Path(sys.argv[1]))
