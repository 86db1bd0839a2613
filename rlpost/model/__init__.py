"""The policy model and its token-level maths (layer 3): loading, LoRA, attention for
packed rows, fused kernels, chunked log-probs / entropies / KL."""
