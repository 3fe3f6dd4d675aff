"""Writes what a GPU machine needs but cannot fetch: SmolLM2's tokenizer as an HF directory.

    python scripts/make_gpu_kit.py [.gpu]     # then carry .gpu to the device (gpu_check.sh)

The 98 MB GGUF file does not travel (the device tool takes 64 MiB); its tokenizer, re-saved by
transformers as tokenizer.json + tokenizer_config.json (~3.5 MB), does. The tests and benchmarks
find it through $JINFER_SMOLLM2_TOKENIZER. The result is checked against the GGUF's own
tokenizer before it is kept.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from transformers import AutoTokenizer

from jinfer.loader import named_models
from jinfer.tokenizer.tokenizer import load_tokenizer

log = logging.getLogger("make_gpu_kit")


def main(out: str = ".gpu") -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    gguf = named_models.resolve_model("smollm2-135m-instruct")
    target = Path(out) / "smollm2-tokenizer"
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(target)
    text = "Hello, world! def f(x): return x ** 2  # ünïcode, 数字 123"
    if load_tokenizer(target).encode(text) != load_tokenizer(gguf).encode(text):
        raise SystemExit(f"{target}: the exported tokenizer disagrees with the GGUF's")
    size = sum(f.stat().st_size for f in target.iterdir()) / 1e6
    log.info("wrote %s (%.1f MB); carry %s to the device", target, size, os.fspath(out))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=".gpu", help="the kit's folder (default .gpu)")
    main(parser.parse_args().out)
