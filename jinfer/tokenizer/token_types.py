"""GGUF token types (`tokenizer.ggml.token_type`); they equal sentencepiece's
`ModelProto.SentencePiece.Type` values."""

CONTROL, USER_DEFINED, UNKNOWN = 3, 4, 2
