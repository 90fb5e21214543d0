"""PairRM, the paper's online judge, on a hand-written DeBERTa-v2 encoder."""
