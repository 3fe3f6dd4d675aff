"""The model runner: a step plan to padded device inputs, the jitted programs, the compile cache."""
