"""Batched sampling with a preallocated KV cache (gpt-fast style), and a small CLI.

    python -m lion_min.sample --model=DIR --prompt="Why is the sky blue?"
    python -m lion_min.sample --model=DIR --prompts_file=prompts.jsonl --temperature=0.7 --top_p=0.9

The chat template comes from the model folder unless --chat_template names one (none = raw text);
one line says which is used.

How a batch runs: prompts of different lengths are left-padded to the longest one, T. Padding has
doc id -1 and real tokens doc id 0, and positions restart at 0 at each row's first real token, so
the cache's block-diagonal mask keeps every row blind to its padding (model.py, KVCache). One
prefill writes cache slots 0..T-1; then each step feeds one token per row into slot T + step.

What comes back: the new tokens of each row, cut AFTER its first stop token, which is KEPT (the
online DPO stage scores and trains on the end-of-turn token). A row that never emits a stop token
returns max_new_tokens tokens and does not end with one; that is how a caller tells a reply that
was cut off. Rows that have finished keep running (emitting pad, which is dropped) until every
row has finished or max_new_tokens is reached.

On CUDA the decode step (one token per row) is compiled with mode="reduce-overhead", which
captures it in a CUDA graph (gpt-fast's approach): a step of a 2B model is about a thousand small
kernels, so launching them one by one, not the GPU, would set the pace. A graph needs fixed
shapes and addresses: the cache length is rounded up to a multiple of CACHE_ROUND, and the caches
stay on the model after generate() for the next call of the same shape (model.clear_caches()
frees them). "All rows done?" is a host sync, so on CUDA it is asked every STOP_CHECK_EVERY steps
(finished rows emit pad meanwhile; what is returned is the same). The prefill runs eagerly.

Sampling, in fp32 whatever the model dtype: logits / temperature, then top-k, then top-p (the
order transformers uses), then one draw from a torch.Generator. temperature=0 is greedy argmax.
The same seed, prompts and batch_size give the same tokens (on the same device and dtype).
"""

import dataclasses
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from lion_min.model import Transformer


@dataclass
class SampleStats:
    prompts: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    """Tokens returned (stop tokens included, pad of finished rows not)."""
    steps: int = 0
    """Decode steps run, summed over chunks (one token per row per step; the prefill gives the first)."""
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def seconds(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def tokens_per_s(self) -> float:
        """Returned new tokens per second of prefill + decode."""
        return self.new_tokens / max(self.seconds, 1e-9)

    def add(self, other: "SampleStats") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def __str__(self) -> str:
        return (f"{self.prompts} prompts | {self.prompt_tokens} prompt tok | {self.new_tokens} new tok | "
                f"prefill {self.prefill_s:.3f}s | decode {self.decode_s:.3f}s | {self.tokens_per_s:.1f} tok/s")


# --- one token from a row of logits ----------------------------------------------------------------


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits (B, V) -> the same with every token outside the top-k / nucleus set at -inf.

    top_k > 0 keeps the k largest (ties with the k-th are kept too, as in transformers).
    top_p < 1 then keeps the smallest set of most likely tokens whose probability sums to >= top_p:
    a token stays if the mass of the tokens ranked above it is < top_p (so the top token always stays).
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_above = probs.cumsum(-1) - probs  # (B, V) probability of the tokens ranked higher
        sorted_logits = sorted_logits.masked_fill(mass_above >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). Works in fp32 whatever the logits' dtype."""
    if temperature == 0:
        return logits.argmax(-1)  # greedy; ties go to the lowest id, as in transformers
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


# --- the batched loop --------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _last_logits(model: Transformer, tokens, positions, doc_ids, slots) -> torch.Tensor:
    # Only the last position is projected onto the vocabulary: a full (B, T, V) prefill logits tensor
    # would be 64 x 512 x 256k floats for Gemma.
    h = model.hidden(tokens, positions=positions, doc_ids=doc_ids, cache_slots=slots)[:, -1]  # (B, dim)
    return F.linear(h, model.head_weight)  # (B, V), model dtype


# Compiled lazily, at the first call (torch.compile imports torch._dynamo, seconds, only then);
# dynamo guards on shapes, not on the model or cache objects, so every model of one architecture and
# every generate() call with one cache shape share the graph.
@functools.cache
def _compiled_last_logits():
    return torch.compile(_last_logits, mode="reduce-overhead", fullgraph=True)
CACHE_ROUND = 256
STOP_CHECK_EVERY = 8


def _generate_chunk(model, prompts, max_new_tokens, temperature, top_k, top_p, stop, pad_id, generator,
                    compiled: bool):
    device = model.tok_embeddings.weight.device
    B, T = len(prompts), max(len(p) for p in prompts)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    doc_ids = torch.full((B, T), -1, dtype=torch.long)  # -1: left padding, attended by nothing
    positions = torch.zeros((B, T), dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        doc_ids[i, T - len(p):] = 0
        positions[i, T - len(p):] = torch.arange(len(p))
    tokens, doc_ids, positions = tokens.to(device), doc_ids.to(device), positions.to(device)
    next_pos = positions[:, -1:] + 1  # (B, 1) position of the first generated token
    zeros = torch.zeros((B, 1), dtype=torch.long, device=device)

    stats = SampleStats(prompts=B, prompt_tokens=sum(len(p) for p in prompts))
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    cache_len, decode, check_every = T + max_new_tokens, _last_logits, 1 if device.type == "cpu" else STOP_CHECK_EVERY
    if compiled:
        cache_len, decode = -(-cache_len // CACHE_ROUND) * CACHE_ROUND, _compiled_last_logits()
    model.setup_caches(B, cache_len)
    try:
        t0 = time.perf_counter()
        logits = _last_logits(model, tokens, positions, doc_ids, torch.arange(T, device=device))
        # Weights holding NaN/inf (a diverged run) make every logit NaN: say so, once per chunk,
        # instead of failing in multinomial (or, greedy, returning token 0 everywhere).
        if not bool(torch.isfinite(logits).all()):
            raise FloatingPointError("the model's logits are not finite (NaN/inf) after the prompt: its weights "
                                     "hold NaN/inf (a diverged run?) or overflow in this dtype")
        t1 = time.perf_counter()
        slot = torch.tensor([T], device=device)  # (1,) the cache slot of the token being fed
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            nxt = torch.where(done, pad_id, nxt)  # finished rows emit pad (dropped below)
            out[:, step] = nxt
            done |= torch.isin(nxt, stop)
            if step == max_new_tokens - 1 or ((step + 1) % check_every == 0 and bool(done.all())):
                break
            if compiled:  # the previous step's logits are consumed: the graph may overwrite them
                torch.compiler.cudagraph_mark_step_begin()
            logits = decode(model, nxt[:, None], next_pos + step, zeros, slot)
            slot += 1
            stats.steps += 1
        _sync(device)
        stats.prefill_s, stats.decode_s = t1 - t0, time.perf_counter() - t1
    finally:
        if not compiled:
            model.clear_caches()

    results, stop_set = [], set(stop.tolist())
    for row in out.tolist():
        cut = next((j + 1 for j, t in enumerate(row) if t in stop_set), len(row))
        results.append(row[:cut])
    stats.new_tokens = sum(len(r) for r in results)
    return results, stats


@torch.inference_mode()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    batch_size: Optional[int] = None,
    return_stats: bool = False,
    compile: Optional[bool] = None,
):
    """Continue each prompt (a list of token ids) by up to max_new_tokens tokens.

    Returns the new tokens of each prompt, in order, cut after (and including) the first token in
    stop_ids; with return_stats=True, (tokens, SampleStats). batch_size splits the prompts into
    chunks run one after another (None: all at once). seed makes a fresh generator; generator (on
    the model's device) is used as is and advanced; neither: torch's global RNG.
    pad_id fills the left padding (never attended to) and what finished rows emit (dropped); any
    valid id works and nothing returned depends on it.
    compile: the compiled, CUDA-graph decode step (see the module docstring); None: on CUDA.
    """
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. the BOS)")
    device = model.tok_embeddings.weight.device
    longest = max((len(p) for p in prompts), default=0)
    if longest + max_new_tokens > model.args.max_seq_len:
        raise ValueError(f"longest prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"max_seq_len ({model.args.max_seq_len})")
    if generator is None and seed is not None:
        generator = torch.Generator(device).manual_seed(seed)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    compiled = device.type == "cuda" if compile is None else compile

    results, stats = [], SampleStats()
    if max_new_tokens > 0:
        step = batch_size or max(len(prompts), 1)
        for i in range(0, len(prompts), step):
            chunk, s = _generate_chunk(model, prompts[i:i + step], max_new_tokens, temperature, top_k, top_p,
                                       stop, pad_id, generator, compiled)
            results += chunk
            stats.add(s)
    else:
        results = [[] for _ in prompts]
        stats.prompts, stats.prompt_tokens = len(prompts), sum(len(p) for p in prompts)
    return (results, stats) if return_stats else results


# --- CLI ---------------------------------------------------------------------------------------------


@dataclass
class SampleConfig:
    CHOICES = {"chat_template": ("auto", "chatml", "llama3", "gemma", "none")}

    model: str = ""
    """Hugging Face checkpoint folder (or hub id) holding the weights and tokenizer.json."""
    prompt: str = ""
    """One prompt (the user turn when a chat template is used)."""
    prompts_file: str = ""
    """More prompts: .jsonl with a "prompt" field per line (text, or a list of messages) or an SFT
    file's "messages" (the turns before the final reply), or plain text with one prompt per line."""
    chat_template: str = "auto"
    """auto (the model folder's: the chat_template of the lion_min run that wrote it, else its
    tokenizer's template if it is a known one) | chatml | llama3 | gemma | none (raw text, preceded
    by the tokenizer's BOS if it has one)."""
    max_new_tokens: int = 128
    temperature: float = 1.0
    """0 = greedy."""
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    batch_size: int = 64
    device: str = "auto"
    """'auto' (cuda if available), 'cpu' or 'cuda'."""
    dtype: str = "auto"
    """'auto' (bfloat16 on GPU, float32 on CPU), 'bfloat16' or 'float32'."""


def read_prompts(path: str) -> list:
    """Prompts from a file: str per prompt, or a list of messages. A .jsonl line holds "prompt" (text
    or messages), or "messages", a conversation as SFT files hold it: its turns before the final
    assistant reply(ies) are the prompt, so an SFT file can be sampled from as it is."""
    from lion_min.config import ConfigError
    from lion_min.schemas import BadRecord, prompt_turns

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: no such file (expected prompts: .jsonl or one per line)")
    lines = []
    for n, raw in enumerate(p.read_bytes().splitlines(), 1):  # n is the line an editor shows
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: line {n}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if line.strip():
            lines.append((n, line))
    if not lines:
        raise ConfigError(f"{path}: no prompts in the file")
    if p.suffix != ".jsonl":
        return [line for _, line in lines]
    prompts = []
    for n, line in lines:  # n counts blank lines too, so it is the line an editor shows
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: line {n}: not valid JSON ({e})") from None
        key = "messages" if isinstance(record, dict) and "prompt" not in record and "messages" in record else "prompt"
        if not isinstance(record, dict) or not isinstance(record.get(key), (str, list)):
            raise ConfigError(f"{path}: line {n}: expected an object with a \"prompt\" field (text or messages) "
                              f"or a \"messages\" conversation")
        prompt = record[key]
        if isinstance(prompt, list):
            try:
                prompt = prompt_turns(prompt, key)
            except BadRecord as bad:
                raise ConfigError(f"{path}: line {n}: '{bad.key}': {bad.detail}") from None
            while key == "messages" and prompt and prompt[-1]["role"] == "assistant":
                prompt.pop()  # a conversation's reply: what the policy is to write
            if not prompt or prompt[-1]["role"] != "user":
                got = f"got {prompt[-1]['role']}" if prompt else "no turns"
                raise ConfigError(f"{path}: line {n}: '{key}': the last turn must be the user's ({got})")
        prompts.append(prompt)
    return prompts


def encode_prompt(tokenizer, prompt, chat_template: str, system_prompt: Optional[str] = None) -> list[int]:
    """A prompt's ids with the generation prompt; `system_prompt` is inserted as training did (with_system)."""
    from lion_min.chat import encode_chat, with_system

    if chat_template == "none":
        if not isinstance(prompt, str):
            raise ValueError("a list of messages needs a chat template (--chat_template)")
        return ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(prompt)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return encode_chat(tokenizer, with_system(messages, system_prompt), chat_template,
                       add_generation_prompt=True).input_ids


def folder_template(folder: Path, tokenizer) -> tuple[str, str]:
    """--chat_template=auto: (the template's name, where it came from) for a model folder. The
    train_config.json that a lion_min run writes beside its export names the template it trained
    with; otherwise the tokenizer's Jinja template (chat_template.jinja or tokenizer_config.json) must
    be exactly one that lion_min knows. A folder with no template at all gets raw text."""
    from lion_min.chat import TEMPLATES, template_of
    from lion_min.config import ConfigError

    run = folder / "train_config.json"
    name = json.loads(run.read_text()).get("chat_template") if run.is_file() else None
    advice = f"pass --chat_template=none for raw text or name one ({', '.join(TEMPLATES)})"
    if name:
        if name not in TEMPLATES:
            raise ConfigError(f"{run}: chat_template {name!r} is not one lion_min knows; {advice}")
        return name, f"from {run}"
    if tokenizer.chat_template is None:
        return "none", f"{folder} has no chat template: raw text"
    known = template_of(tokenizer.chat_template)
    if known is None:
        raise ConfigError(f"{folder}: its tokenizer's chat template is not one lion_min knows; {advice}")
    return known.name, f"the tokenizer's template in {folder}"


if __name__ == "__main__":  # python -m lion_min.sample: cli.sample_main
    from lion_min.cli import run_cli, sample_main

    run_cli(sample_main)  # bad input: exit 2 and one `error:` line, like the training scripts
