"""generate.py --ray-actors: a record file through `jinfer.ray_data` on Ray Data actors, written
in jinfer's output format (the same lines the single process writes)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from _records import Record, output_record

from jinfer.config.cli import engine_options

log = logging.getLogger("generate")


def run_file(
    args: argparse.Namespace, records: Sequence[Record], pending: Sequence[Record], out_path: Path
) -> int:
    """Records through `jinfer.ray_data` on `--ray-actors` actors; returns the exit status."""
    from tqdm.auto import tqdm

    try:
        import ray
    except ImportError:
        log.error("--ray-actors needs Ray Data: pip install 'jinfer[ray]'")
        return 2
    from jinfer import CompletionOutput, RequestOutput
    from jinfer.ray_data import build_processor

    asking = next((r for r in pending if r.params.logprobs is not None), None)
    if asking is not None:
        log.error("line %d: logprobs are not returned through Ray (run without --ray-actors)",
                  asking.line)  # fmt: skip
        return 2
    options = engine_options(args)
    model = options.pop("model")
    rows = [
        {
            "row": i,
            "prompt": r.prompt or "",
            "messages": json.dumps(r.messages) if r.messages else "",
            "prompt_token_ids": json.dumps(r.prompt_token_ids) if r.prompt_token_ids else "",
            "sampling_params": json.dumps(dataclasses.asdict(r.params)),
        }
        for i, r in enumerate(pending)
    ]
    ray.init(address=args.ray_address, ignore_reinit_error=True, log_to_driver=False)
    t0, written, tokens = time.perf_counter(), 0, 0
    process = build_processor(model, args.ray_actors, args.batch_size, **options)
    results = process(ray.data.from_items(rows))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(out_path, "a", encoding="utf-8") as out,
        tqdm(total=len(records), initial=len(records) - len(pending), desc="records",
             unit="rec", file=sys.stderr, disable=args.no_progress) as bar,
    ):  # fmt: skip
        try:
            for batch in results.iter_batches(batch_size=args.batch_size, batch_format="numpy"):
                lines = []
                for j, row in enumerate(batch["row"]):
                    record = pending[int(row)]
                    outputs = [
                        CompletionOutput(k, text, ids, finish_reason=reason)
                        for k, (text, ids, reason) in enumerate(zip(
                            json.loads(batch["generated_text"][j]),
                            json.loads(batch["generated_token_ids"][j]),
                            json.loads(batch["finish_reason"][j]), strict=True,
                        ))
                    ]  # fmt: skip
                    prompt_ids = [0] * int(batch["num_input_tokens"][j])  # (only its length)
                    out_ = RequestOutput(str(record.id), record.prompt, prompt_ids, outputs, True)
                    lines.append(json.dumps(output_record(record, out_), ensure_ascii=False))
                    tokens += int(batch["num_generated_tokens"][j])
                out.write("".join(line + "\n" for line in lines))
                out.flush()
                os.fsync(out.fileno())
                written += len(lines)
                bar.update(len(lines))
                bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - t0):.1f}")
        except KeyboardInterrupt:
            log.warning("interrupted: %d record(s) written this run; rerun to resume", written)
            return 130
        finally:
            ray.shutdown()
    wall = time.perf_counter() - t0
    log.info(
        "wrote %d record(s) to %s on %d Ray actors: %d output tokens in %.1f s (%.1f tok/s)",
        written, out_path, args.ray_actors, tokens, wall, tokens / wall,
    )  # fmt: skip
    return 0
