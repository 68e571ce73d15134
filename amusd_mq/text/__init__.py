"""Text: a deployment's vocabulary and its identity (`vocab`), chat templates (`chat`), detokenizing with stop
strings (`detokenize`). Imports only `models`, to find a model's tokenizer."""
