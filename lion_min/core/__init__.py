"""The method: the models, the document mask, packing, the chat loss mask, the losses, the sampler,
the FSDP2 + compile wrap. Imports only torch, numpy, tokenizers and itself."""
