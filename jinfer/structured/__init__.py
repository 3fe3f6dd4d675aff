"""Structured output: constraints on what a request may generate (a JSON schema, a regex, a
choice, a grammar), compiled by llguidance into per-request matchers that give each decode step
a token bitmask; the sampler applies it on the device before temperature, top-k and top-p.
What a request asks for is `jinfer.sampling_params.StructuredOutputsParams` (vLLM keeps it
there too).

    grammar.py   GrammarCompiler: the vocabulary once, grammars compiled off the caller's
                 thread under a time bound, cached (LRU); a fresh matcher per request
    bitmask.py   a batch's packed masks [rows, ceil(V/32)] int32 filled on the host, and
                 applied to the logits on the device

The engine gives each constrained completion a matcher (`Sequence.matcher`), advances it as
tokens land and ends the request when the grammar is complete; the sampler masks its rows.
"""
