"""Base language models: loading, edited layers, tokens, hooks, the embedded model's pretraining."""
