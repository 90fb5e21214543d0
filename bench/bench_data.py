"""Data at scale: the old in-memory path against the prepared cache (lion_min/run/data_cache.py).

    python bench/bench_data.py                          # 20k conversations, about 4 minutes here
    python bench/bench_data.py --conversations=5000     # a quick look

A synthetic LION-shaped SFT mix is written once into --work (JSONL, messages schema): 1-4
user/assistant exchanges (65/20/10/5%), a system turn in 20% of them, log-normal turn lengths in
words (user median 30, assistant median 120, sigma 1, cut at 3000) drawn from the real Llama-3
vocabulary's common whole words, sentences and paragraphs. The tokenizer is the real Llama-3 one
plus the ChatML tokens (tests/tokenizers_for_tests.py: build_chatml_tokenizer), the template ChatML
with LION's empty system prompt, seq_len 2048.

Each run is a fresh process of train_sft.py (or lion_min.run.data_cache) on a tiny random Llama (dim 64,
2 layers, the full 128258-token vocabulary), one optimizer step of one 2048-token row. Timed from
the start of the process: until the packing summary line (the data is ready: time to batches),
and until the first step's progress line (time to the first step; the tiny model's step adds the
same second or so to every variant). Peak resident memory is the process's ru_maxrss.

  old       --data_cache=off: every conversation rendered, tokenized and masked in Python, then
            pack() into four int64 arrays (what every rank did before)
  cold      an empty cache folder: encode_chats in batches, shards on disk, rows laid out, mmap
  warm      the same folder again: fingerprint, then mmap

Then lion_min.run.data_cache alone on empty folders with 1 process, 1 process with one tokenizer thread
(RAYON_NUM_THREADS=1: the per-core rate), and 2 processes (torchrun), reporting the phases rank 0
records in meta.json, and an extrapolation to 2.1M conversations on an 8-rank node.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from lion_min.run.flags import parse_cli  # noqa: E402

LION_CONVERSATIONS = 2_100_000
"""Conversations in the LION SFT mix."""


@dataclass
class DataBench:
    conversations: int = 20000
    seq_len: int = 2048
    work: str = "/tmp/lion_min_bench_data"
    """Data, tokenizer and model are written here once and reused."""
    seed: int = 0
    prepare_runs: bool = True
    """Also time lion_min.run.data_cache with 1 and 2 processes."""


# --- the synthetic mix ------------------------------------------------------------------------------


def common_words(tok_json: str, n: int = 8000) -> np.ndarray:
    """The first n byte-level BPE tokens that are a space and 2+ ASCII letters: frequent whole words."""
    vocab = json.loads(tok_json)["model"]["vocab"]
    words = [t[1:] for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])
             if t.startswith("Ġ") and len(t) > 2 and t[1:].isascii() and t[1:].isalpha()]
    return np.array(words[:n])


def text(rng: np.random.Generator, words: np.ndarray, n: int) -> str:
    w = words[rng.zipf(1.3, n) % len(words)]  # Zipf: a few words very often, as in prose
    out, i = [], 0
    while i < n:
        k = int(rng.integers(6, 25))
        sentence = " ".join(w[i : i + k])
        out.append(sentence[:1].upper() + sentence[1:] + rng.choice([".", ".", ".", "?", ",", ":"]))
        i += k
        if rng.random() < 0.08:
            out.append("\n\n" if rng.random() < 0.7 else f"\n{int(rng.integers(1, 9))}. ")
    return " ".join(out)


def lion_like_mix(n: int, words: np.ndarray, seed: int) -> list[list[dict]]:
    rng = np.random.default_rng(seed)
    convs = []
    for _ in range(n):
        turns = [{"role": "system", "content": text(rng, words, int(rng.integers(5, 40)))}] if rng.random() < 0.2 else []
        for _ in range(int(rng.choice([1, 2, 3, 4], p=[0.65, 0.2, 0.1, 0.05]))):
            for role, median in (("user", 30), ("assistant", 120)):
                length = int(min(3000, max(1, rng.lognormal(np.log(median), 1.0))))
                turns.append({"role": role, "content": text(rng, words, length)})
        convs.append(turns)
    return convs


def setup(b: DataBench) -> tuple[Path, Path]:
    """(model folder with the tokenizer, data file), written once."""
    from conftest import make_hf_checkpoint
    from tokenizers_for_tests import build_chatml_tokenizer

    work = Path(b.work)
    model, data = work / "model", work / f"mix-{b.conversations}-{b.seed}.jsonl"
    if not (model / "tokenizer.json").is_file():
        build_chatml_tokenizer(model)
        make_hf_checkpoint("llama-3-8b", model, std=0.02, vocab_size=128258)
    if not data.is_file():
        words = common_words((model / "tokenizer.json").read_text())
        tmp = data.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"messages": c}) + "\n"
                               for c in lion_like_mix(b.conversations, words, b.seed)))
        tmp.rename(data)
    return model, data


# --- timing a process ---------------------------------------------------------------------------------


def timed(cmd: list[str], env: dict, stop_at: str = "") -> dict:
    """Run cmd: seconds from the start until the first stdout line containing `stop_at` (then the
    process is stopped) or until it ends; its peak resident memory (GiB; under torchrun the largest
    process); its stdout."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines, rss = [], 0.0
    for line in proc.stdout:
        lines.append(line)
        if stop_at and stop_at in line:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            rss = int(next(ln for ln in status.splitlines() if ln.startswith("VmHWM:")).split()[1]) / 2**20
            proc.kill()
            break
    seconds = time.perf_counter() - t0
    proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if not rss:  # ran to the end: the peak of the process and of those it waited for (torchrun's workers)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{''.join(lines[-30:])}")
        rss = usage.ru_maxrss / 2**20
    elif not any(stop_at in ln for ln in lines):
        raise RuntimeError(f"{' '.join(cmd)} ended before {stop_at!r}:\n{''.join(lines[-30:])}")
    return {"seconds": seconds, "rss_gib": rss, "out": "".join(lines)}


def main(argv=None):
    b = parse_cli(DataBench, {}, argv, doc=__doc__)
    import torch

    print(f"command: python bench/bench_data.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    t = time.perf_counter()
    model, data = setup(b)
    print(f"setup {time.perf_counter() - t:.1f}s: {data} ({data.stat().st_size / 2**20:.0f} MiB)")
    work = Path(b.work)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    recipe = work / "lion_system_prompt.toml"  # LION's empty system turn ("--system_prompt=" reads as None)
    recipe.write_text('[shared]\nsystem_prompt = ""\n')
    train = [sys.executable, str(ROOT / "train_sft.py"), f"--config={recipe}", f"--model={model}", f"--data={data}",
             f"--seq_len={b.seq_len}", "--batch_size=1", "--max_steps=1", "--device=cpu", "--chat_template=chatml",
             f"--out_dir={work / 'out'}", f"--seed={b.seed}", "--overwrite=true"]
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    runs = {"old": timed(train + ["--data_cache=off"], env, stop_at="training 1 steps")}
    runs["cold"] = timed(train + [f"--data_cache={cache}"], env, stop_at="training 1 steps")
    runs["warm"] = timed(train + [f"--data_cache={cache}"], env, stop_at="training 1 steps")
    # The opening summary's rows line: the same rows, however they were prepared.
    summary = [ln.strip() for ln in runs["old"]["out"].splitlines() if ln.strip().startswith("rows ")][0]
    assert summary in runs["cold"]["out"] and summary in runs["warm"]["out"], "the packing summaries differ"
    prepared = next(p for p in cache.iterdir() if (p / "meta.json").is_file())
    split = json.loads((prepared / "train" / "split.json").read_text())["counts"]
    tokens = split["real_tokens"]
    print(f"data: {b.conversations} conversations, {tokens:,} tokens kept ({tokens / b.conversations:.0f} per "
          f"conversation), seq_len {b.seq_len}\n{summary}")
    disk = sum(f.stat().st_size for f in prepared.rglob("*") if f.is_file())
    print(f"prepared folder: {disk / 2**20:.1f} MiB ({disk / tokens:.2f} bytes per token; the old rows: 32 bytes "
          f"per row token)\n")
    old = runs["old"]
    print("| variant | time to batches s | vs old | peak RSS GiB | vs old |")
    print("|---|---:|---:|---:|---:|")
    for name, r in runs.items():
        print(f"| {name} | {r['seconds']:.1f} | {old['seconds'] / r['seconds']:.2f}x faster | {r['rss_gib']:.2f} | "
              f"{r['rss_gib'] / old['rss_gib']:.2f}x |")

    if not b.prepare_runs:
        return
    prep = [f"--config={recipe}", f"--model={model}", f"--data={data}", f"--seq_len={b.seq_len}",
            "--chat_template=chatml", f"--seed={b.seed}"]
    variants = {
        "1 process": ([sys.executable, "-m", "lion_min", "prepare", "sft"], {}),
        "1 process, 1 tokenizer thread": ([sys.executable, "-m", "lion_min", "prepare", "sft"],
                                          {"RAYON_NUM_THREADS": "1"}),
        "2 processes (torchrun)": ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node=2", "-m", "lion_min", "prepare", "sft"], {}),
    }
    print("\n| lion_min.run.data_cache | load s | encode s | merge s | prepare s | prepared tokens/s | peak RSS GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    phases = {}
    for name, (cmd, extra) in variants.items():
        folder = work / "prep"
        shutil.rmtree(folder, ignore_errors=True)
        r = timed(cmd + prep + [f"--data_cache={folder}"], env | extra)
        meta = json.loads(next(folder.glob("*/meta.json")).read_text())
        s = phases[name] = meta["prepare_seconds"]
        total = s["load"] + s["encode"] + s["merge"]
        print(f"| {name} | {s['load']:.1f} | {s['encode']:.1f} | {s['merge']:.1f} | {total:.1f} | "
              f"{tokens / total:,.0f} | {r['rss_gib']:.2f} |")

    # 2.1M conversations on one node of 8 ranks, a core (or more) each. Every rank reads all the
    # records (load, per rank as measured here); encoding splits 8 ways (the per-core rate, one
    # tokenizer thread); rank 0 lays out the rows (merge, linear in the data; best-fit-decreasing
    # is slightly worse than linear). The old path: every rank encodes and packs everything.
    # The floor for one thread: the Rust tokenizer alone on the rendered texts, one call per text.
    from lion_min.core.chat import render, with_system
    from lion_min.formats.data import load_conversations
    from lion_min.formats.tokenizer import Tokenizer
    from lion_min.run.data_cache import file_identity

    tok = Tokenizer.from_dir(model)
    texts = [render(with_system(c, ""), "chatml", bos_token=tok.bos_token) for c in load_conversations(str(data))[0]]
    t = time.perf_counter()
    for x in texts:
        tok.encode_with_offsets(x)
    alone = time.perf_counter() - t
    print(f"\nthe tokenizer alone, one thread, one call per text: {alone:.1f}s ({tokens / alone:,.0f} tokens/s)")

    # The old path's data work is its time to batches less the warm run's (process start, model,
    # fingerprint, mmap), and its memory above the warm run's.
    t = time.perf_counter()
    file_identity(data)
    hashing = time.perf_counter() - t
    scale = LION_CONVERSATIONS / b.conversations
    one = phases["1 process, 1 tokenizer thread"]
    cold = scale * (one["load"] + one["encode"] / 8 + one["merge"])
    old_data = scale * (old["seconds"] - runs["warm"]["seconds"])
    old_rss = scale * (old["rss_gib"] - runs["warm"]["rss_gib"])
    print(f"\nextrapolated to {LION_CONVERSATIONS:,} conversations (x{scale:.0f}), 8 ranks of a node: prepared "
          f"cache cold {cold / 60:.1f} min of data preparation (load {scale * one['load'] / 60:.1f} + encode "
          f"{scale * one['encode'] / 8 / 60:.1f} + merge {scale * one['merge'] / 60:.1f}); warm: "
          f"{scale * hashing:.0f} s hashing the data files ({data.stat().st_size * scale / 2**30:.1f} GiB) "
          f"on top of start-up; old path {old_data / 60:.0f} min on every rank, holding {old_rss:.0f} GiB more per "
          f"rank")


if __name__ == "__main__":
    main()
