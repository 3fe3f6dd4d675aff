"""Structured output: constraints on what a request may generate (a JSON schema, a regex, a
choice, a grammar), compiled by llguidance into per-request matchers that give each decode step
a token bitmask; the sampler applies it on the device before temperature, top-k and top-p.

    params.py    StructuredOutputsParams: what a request asks for (vLLM's names)
    grammar.py   GrammarCompiler: the vocabulary once, grammars compiled off the caller's
                 thread under a time bound, cached (LRU); a fresh matcher per request
    bitmask.py   a batch's packed masks [rows, ceil(V/32)] int32 filled on the host, and
                 applied to the logits on the device

Only the pieces so far: the engine does not yet carry matchers through its steps (issue 20).
"""
