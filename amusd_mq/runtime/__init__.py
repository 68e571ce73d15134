"""Running models for the workers: a native forward over a slot KV cache (CUDA-graphed on a GPU) or transformers
as the reference, behind one interface (`lm.LM`), and the thread they run on. Nothing here imports benchmark code.
"""
