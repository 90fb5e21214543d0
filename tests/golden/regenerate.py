"""Regenerate the shipped golden vectors (docs/golden.md).

    python tests/golden/regenerate.py            # the numbers, from the checked-in models and data
    python tests/golden/regenerate.py --inputs   # first rebuild the models, tokenizers and data too

Inputs (tests/golden/models, tests/golden/data) are built here from the real config.json files
(tests/data/configs) scaled down as in tests/conftest.py, one small tokenizer, and the conversations
and preference pairs below. Each vector in VECTORS is `python -m lion_min golden` with its settings,
written to tests/golden/vectors/NAME. tests/test_golden.py checks that running this again gives the
checked-in numbers.
"""

import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MODELS, DATA, VECTORS_DIR = HERE / "models", HERE / "data", HERE / "vectors"
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

# --- inputs --------------------------------------------------------------------------------------

VOCAB = 656  # the tokenizer's 651 ids (Gemma-like specials, BPE, ChatML) + 5 Llama-3 specials
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
REFERENCE = "llama-3.2-1b-ref"  # the DPO reference: llama-3.2-1b with every weight nudged

LONG = " ".join(f"Step {i}: add {i} to the total, then check the running sum again." for i in range(1, 16))
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "user", "content": "Hello there!"}, {"role": "assistant", "content": "Hello! How are you today?"},
     {"role": "user", "content": "I am fine, thank you."}, {"role": "assistant", "content": "Glad to hear it."},
     {"role": "user", "content": "Write a short poem about the sea."},
     {"role": "assistant", "content": "The sea is wide,\nthe sea is deep."}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}],
    [{"role": "system", "content": ""},
     {"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "You sent an empty message."}],
    [{"role": "user", "content": "   \n"}, {"role": "assistant", "content": "  Only whitespace?  \n\n"}],
    [{"role": "user", "content": "Two lines, please."}, {"role": "assistant", "content": "\nLine one.\nLine two.\n"}],
    [{"role": "user", "content": "Bonjour, ça va ? 你好，世界！"},
     {"role": "assistant", "content": "Très bien, merci. こんにちは 😀 🎉 👍🏽 — naïve café."}],
    [{"role": "user", "content": "Count slowly."}, {"role": "assistant", "content": LONG}],
    [{"role": "user", "content": "def add(a, b):"}, {"role": "assistant", "content": "    return a + b"}],
]
# Gemma's template allows no system turn and needs user/assistant alternation from a user turn.
GEMMA_CHATS = [c for c in CHATS if c[0]["role"] == "user"]
PREFS = [
    {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Lyon, I think."},
    {"prompt": "Bonjour ! 你好", "chosen": "Bonjour, ça va ? 😀", "rejected": "Hello."},
    {"prompt": "Say something.", "chosen": "  Something.  ", "rejected": "\nNo.\n"},
    {"prompt": "Count slowly.", "chosen": "One, two, three.", "rejected": LONG},
    {"prompt": LONG + " What is the total?", "chosen": "120.", "rejected": "100."},
    {"prompt": "Write a short poem about the sea.", "chosen": "The sea is wide,\nthe sea is deep.",
     "rejected": "The sea is wide,\nthe sea is wet."},
]


def build_tokenizers(tmp: Path) -> dict[str, Path]:
    """One small vocabulary, two tokenizer_config.json: Llama-style (BOS <|begin_of_text|>) and
    Gemma-style (BOS <bos>, EOS <eos>, PAD <pad> at the real Gemma ids)."""
    from tokenizers import AddedToken, Tokenizer

    from tokenizers_for_tests import _bos_processor, build_gemma_chatml_tokenizer

    gemma = build_gemma_chatml_tokenizer(tmp / "gemma")
    tok = Tokenizer.from_file(str(gemma / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in LLAMA3_SPECIALS])
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    tok.save(str(gemma / "tokenizer.json"))  # Gemma-style keeps its <bos> post-processor
    llama = tmp / "llama"
    llama.mkdir()
    tok.post_processor = _bos_processor("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))
    tok.save(str(llama / "tokenizer.json"))
    config = json.loads((gemma / "tokenizer_config.json").read_text())
    config = {k: v for k, v in config.items() if not k.endswith("_token")}
    config |= {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    (llama / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"llama": llama, "gemma": gemma}


def build_models(out: Path, tokenizers: dict[str, Path]) -> None:
    import torch
    import transformers

    from conftest import CONFIG_NAMES, make_hf_checkpoint

    for name in CONFIG_NAMES:
        family = "gemma" if name.startswith("gemma") else "llama"
        ids = {}
        if family == "llama":  # the Llama-style tokenizer's BOS / EOS
            ids = dict(bos_token_id=VOCAB - 5, eos_token_id=VOCAB - 4)
        make_hf_checkpoint(name, out / name, vocab_size=VOCAB, **ids)
        for f in tokenizers[family].iterdir():
            shutil.copy(f, out / name / f.name)
    # The reference: the policy's weights plus 5% noise, so that the policy and reference disagree
    # by a few nats per sequence (as after some training), not by a random model's hundreds.
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "llama-3.2-1b", dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05 * p.std())
    model.save_pretrained(out / REFERENCE)
    for f in tokenizers["llama"].iterdir():
        shutil.copy(f, out / REFERENCE / f.name)


def write_data(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, records in (("chats.jsonl", [{"messages": c} for c in CHATS]),
                          ("chats_gemma.jsonl", [{"messages": c} for c in GEMMA_CHATS]), ("prefs.jsonl", PREFS)):
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def build_inputs() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tokenizers = build_tokenizers(Path(tmp))
        models = Path(tmp) / "models"
        build_models(models, tokenizers)
        shutil.rmtree(MODELS, ignore_errors=True)
        shutil.copytree(models, MODELS)
    write_data(DATA)


# --- vectors -------------------------------------------------------------------------------------

_SFT = dict(data="tests/golden/data/chats.jsonl", seq_len=128)
_DPO = dict(model="tests/golden/models/llama-3.2-1b", ref_model=f"tests/golden/models/{REFERENCE}",
            data="tests/golden/data/prefs.jsonl", chat_template="llama3", seq_len=96, max_prompt_len=48)
VECTORS = {
    # SFT: packed rows of 128 tokens (several conversations per row, one cut at 128).
    "sft-llama-3-8b-llama3": _SFT | dict(model="tests/golden/models/llama-3-8b", chat_template="llama3", lr=1e-3),
    "sft-llama-3.1-8b-chatml": _SFT | dict(model="tests/golden/models/llama-3.1-8b", chat_template="chatml",
                                           system_prompt="", lr=1e-3, weight_decay=0.1),
    "sft-llama-3.2-1b-unpacked-nomask": _SFT | dict(model="tests/golden/models/llama-3.2-1b", chat_template="llama3",
                                                    packing=False, loss_mask=False),
    "sft-gemma-2b-gemma": _SFT | dict(model="tests/golden/models/gemma-2b", data="tests/golden/data/chats_gemma.jsonl",
                                      chat_template="gemma", lr=1e-3),
    "sft-gemma-7b-chatml-last": _SFT | dict(model="tests/golden/models/gemma-7b", chat_template="chatml",
                                            train_on="last", system_prompt=""),
    "sft-llama-3.2-1b-bf16": _SFT | dict(model="tests/golden/models/llama-3.2-1b", chat_template="llama3",
                                         dtype="bfloat16", lr=1e-3),
    # Gemma-2 / Gemma-3: sliding window of 4 tokens (conftest), so every packed document runs past it.
    "sft-gemma-2-2b-chatml": _SFT | dict(model="tests/golden/models/gemma-2-2b-it", chat_template="chatml",
                                         system_prompt="", lr=1e-3),
    "sft-gemma-3-1b-gemma": _SFT | dict(model="tests/golden/models/gemma-3-1b-it",
                                        data="tests/golden/data/chats_gemma.jsonl", chat_template="gemma", lr=1e-3),
    # DPO: llama-3.2-1b (tied head) against its nudged copy; sides of 96 tokens, prompts cut to 48.
    "dpo-sigmoid": _DPO | dict(beta=0.1, lr=1e-3),
    "dpo-cdpo": _DPO | dict(beta=0.1, label_smoothing=0.2),
    "dpo-ipo": _DPO | dict(beta=0.1, loss_type="ipo"),
    "dpo-hinge": _DPO | dict(beta=0.1, loss_type="hinge"),
}


def generate(name: str, out_dir: Path) -> Path:
    """Vector `name` into out_dir; the settings record the paths relative to the repository."""
    from lion_min.golden import compare as golden
    from lion_min.golden import compute as golden_compute
    settings = VECTORS[name]
    absolute = {k: str(ROOT / v) if k in ("model", "ref_model", "data") else v for k, v in settings.items()}
    g = golden_compute.compute(golden_compute.GoldenConfig(**absolute, out=str(out_dir)))
    g.meta["settings"] |= {k: settings[k] for k in ("model", "ref_model", "data") if k in settings}
    g.meta["settings"]["out"] = f"tests/golden/vectors/{name}"
    return golden.write(g, out_dir)


def main(argv: list[str]) -> None:
    if argv not in ([], ["--inputs"]):
        raise SystemExit("usage: python tests/golden/regenerate.py [--inputs]")
    import torch

    torch.set_num_threads(1)  # the numbers do not depend on it on CPU; one thread is fast for tiny models
    if argv:
        build_inputs()
    for name in VECTORS:
        generate(name, VECTORS_DIR / name)
        print(f"wrote {VECTORS_DIR / name}")


if __name__ == "__main__":
    main(sys.argv[1:])
