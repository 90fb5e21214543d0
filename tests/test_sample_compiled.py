"""The compiled decode path of sample.generate (the CUDA default), run on CPU: inductor compiles
the same step there (CUDA graphs are skipped off CUDA), so the graph, its guards and the cache
reuse are checked here; bench/gpu_check.py times the CUDA-graph version."""

import torch
from torch._dynamo.utils import counters

from lion_min.core.args import ModelArgs

from lion_min.core.model import Transformer
from lion_min.core.sample import generate


def test_compiled_decode_equals_eager_and_compiles_once():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                                  hidden_dim=64, max_seq_len=512))
    model.init_weights(std=0.3, seed=0)
    model.eval()
    gen = torch.Generator().manual_seed(1)
    batches = [[torch.randint(0, 64, (n,), generator=gen).tolist() for n in lengths]
               for lengths in ([3, 9, 5], [7, 2, 11])]  # same batch size, other prompt lengths
    counters.clear()
    stop = [generate(model, batches[0], 4, temperature=0, compile=False)[1][3]]  # a token row 1 emits
    kw = dict(temperature=1.0, top_p=0.9, seed=3, stop_ids=stop)
    for prompts in batches:
        eager = generate(model, prompts, 20, temperature=0, stop_ids=stop, compile=False)
        sampled = generate(model, prompts, 12, compile=False, **kw)
        assert generate(model, prompts, 20, temperature=0, stop_ids=stop, compile=True) == eager
        # Sampling draws from the same generator stream in both paths.
        assert generate(model, prompts, 12, compile=True, **kw) == sampled
        assert any(len(r) < 20 for r in eager)  # the stop token cut some row short
    # Both batches round to one cache length: one graph, compiled once, its caches left for reuse.
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert model.layers[0].attention.cache.k.shape[2] == 256
    model.clear_caches()
