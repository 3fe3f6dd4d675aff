"""Text <-> token ids: the `Tokenizer` facade and its backends, chat templates."""
