"""Judges: a prompt and several responses in, one score per response out (higher is better).

The online DPO loop only calls `judge.score(messages, responses)` and keeps the best and worst
response, so any scorer fits behind it:

- RewardModelJudge: a Hugging Face LlamaForSequenceClassification / GemmaForSequenceClassification
  checkpoint run on our own backbone plus its linear score head; prompt and response are rendered
  from text with ITS OWN tokenizer and chat template (--judge_template when its folder has none).
- RuleJudge (lion_min/core/judge.py): a plain Python function (prompt messages, response text) ->
  float, e.g. a verifier.
- PairRMJudge (lion_min/pairrm/model.py, spec "pairrm:DIR"): the paper's pairwise ranker compares every
  ordered pair of responses and scores each by llm-blender's mean logit margin.

make_judge turns a command-line spec (a rule name, "pairrm:DIR", or a reward-model folder) into one of these.
"""

import dataclasses
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lion_min.core.judge import RULES, Judge, Messages, RuleFn, RuleJudge
from lion_min.core.model import Transformer
from lion_min.formats.hf import load_weights
from lion_min.formats.hf_config import read_config, resolve_path, weight_files
from lion_min.formats.tokenizer import Tokenizer
from lion_min.pairrm.model import PairRMJudge
from lion_min.run.config import ConfigError
from lion_min.run.model_checks import judge_template, reward_head_shape, unknown_judge

# --- reward model ----------------------------------------------------------------------------------


def load_reward_model(path: str | Path, dtype=torch.float32, device="cpu") -> tuple[Transformer, nn.Parameter]:
    """The backbone of a *ForSequenceClassification checkpoint and its score head (num_labels, dim).

    Its tensors are model.* (our usual names) and score.weight; there is no lm_head, so the backbone
    is built with a tied head and has no output parameter to miss."""
    folder = resolve_path(str(path))
    args = dataclasses.replace(read_config(folder), tie_embeddings=True)
    files = weight_files(folder)
    shape = reward_head_shape(folder, args)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device=device)
    model.to(dtype)
    score = nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)
    load_weights(model, files, extra={"score.weight": score})
    model.init_buffers()
    return model.eval().requires_grad_(False), score


def last_token_index(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B, T) padded ids -> (B,) index of the position whose score is read.

    transformers 5 (modeling_layers.GenericForSequenceClassification.forward) takes "the rightmost
    token that is not equal to pad_token_id": argmax(arange(T) * (ids != pad_token_id)), int32.
    So if a sequence itself ends with the pad id (some reward models use EOS or <|eot_id|> as pad),
    the score is read BEFORE those tokens; we do the same rather than "fix" it, to give the scores
    the checkpoint's authors got. (With no pad_token_id, transformers reads the last token and only
    accepts batch size 1; score_ids then reads each row's last real token, the same thing.)
    """
    T = ids.shape[1]
    non_pad = (ids != pad_id).to(torch.int32)
    return (torch.arange(T, device=ids.device, dtype=torch.int32) * non_pad).argmax(-1)


def render_jinja(jinja: str, messages: Messages, tokenizer: Tokenizer) -> str:
    """`messages` rendered by a Jinja chat template as transformers' apply_chat_template renders it (a
    sandbox with trim_blocks and lstrip_blocks; the tokenizer's special tokens; raise_exception)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        return env.from_string(jinja).render(
            messages=messages, add_generation_prompt=False, raise_exception=raise_exception,
            bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "", pad_token=tokenizer.pad_token)
    except TemplateError as e:
        raise ConfigError(f"the judge's chat template refuses the conversation: {e}") from None


class RewardModelJudge:
    """Scores prompt + response with a reward model, rendered from text by the reward model's OWN
    tokenizer and chat template (as TRL's online DPO does: the judge need not share the policy's)."""

    def __init__(
        self,
        path: str | Path,
        chat_template: Optional[str] = None,
        tokenizer: Optional[Tokenizer] = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        batch_size: int = 8,
        label: int = 0,
    ):
        """chat_template: None (its folder's own), a name lion_min knows, or a .jinja file
        (judge_template). tokenizer: defaults to the one in the checkpoint folder. label: which output
        of the score head is the reward (reward models have one)."""
        folder = resolve_path(str(path))
        self.tokenizer = tokenizer or Tokenizer.from_dir(folder)
        self.jinja = judge_template(chat_template, self.tokenizer, folder)  # (before the weights load)
        self.model, self.score_weight = load_reward_model(folder, dtype, device)
        self.batch_size, self.label = batch_size, label
        if not 0 <= label < self.score_weight.shape[0]:
            raise ValueError(f"label={label}, but the score head has {self.score_weight.shape[0]} output(s)")
        # transformers reads pad_token_id from the model's config.json (not the tokenizer).
        self.pad_id: Optional[int] = self.model.args.pad_token_id

    def encode(self, prompt: Messages, response: str) -> list[int]:
        """The text rendered by the judge's template, tokenized once by its tokenizer (no special tokens
        added: the template writes its own, as apply_chat_template does)."""
        messages = list(prompt) + [{"role": "assistant", "content": response}]
        return self.tokenizer.encode(render_jinja(self.jinja, messages, self.tokenizer))

    @torch.inference_mode()
    def score_ids(self, sequences: list[list[int]]) -> torch.Tensor:
        """Token id sequences -> (N, num_labels) fp32 scores, batch_size at a time.

        Rows are right-padded, so with a plain causal mask no real token sees padding and positions
        are 0..len-1 as when run alone; the score is read where transformers reads it."""
        if any(len(s) == 0 for s in sequences):
            raise ValueError("cannot score an empty sequence")
        longest = max((len(s) for s in sequences), default=0)
        if longest > self.model.args.max_seq_len:
            raise ValueError(f"a sequence of {longest} tokens is longer than the reward model's max_seq_len "
                             f"({self.model.args.max_seq_len})")
        device = self.score_weight.device
        out = []
        for i in range(0, len(sequences), self.batch_size):
            chunk = sequences[i:i + self.batch_size]
            T = max(len(s) for s in chunk)
            pad = self.pad_id if self.pad_id is not None else 0
            ids = torch.tensor([s + [pad] * (T - len(s)) for s in chunk], device=device)  # (B, T)
            if self.pad_id is not None:
                idx = last_token_index(ids, self.pad_id)
            else:
                idx = torch.tensor([len(s) - 1 for s in chunk], device=device)
            h = self.model.hidden(ids)  # (B, T, dim)
            h_last = h[torch.arange(len(chunk), device=device), idx]  # (B, dim)
            out.append(F.linear(h_last, self.score_weight).float())  # head in the model dtype, as HF
        return torch.cat(out).cpu()

    def score(self, prompt: Messages, responses: list[str]) -> list[float]:
        scores = self.score_ids([self.encode(prompt, r) for r in responses])
        return scores[:, self.label].tolist()


# --- from a spec -----------------------------------------------------------------------------------


def make_judge(
    spec: str,
    *,
    rules: Optional[dict[str, RuleFn]] = None,
    chat_template: Optional[str] = None,
    tokenizer: Optional[Tokenizer] = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
) -> Judge:
    """spec: a rule name (from `rules`, which default to RULES), "pairrm:DIR" (a PairRM folder, see
    docs/pairrm.md), or a reward-model checkpoint folder or hub id "org/name" (rendered with its own
    tokenizer and chat template; chat_template names one when its folder has none: judge_template)."""
    rules = RULES if rules is None else rules
    if spec in rules:
        return RuleJudge(rules[spec], name=spec)
    if spec.startswith("pairrm:"):
        if not spec.removeprefix("pairrm:"):
            raise ValueError("judge 'pairrm:' needs a folder: --judge=pairrm:DIR")
        return PairRMJudge(spec.removeprefix("pairrm:"), dtype=dtype, device=device, batch_size=batch_size)
    if Path(spec).expanduser().is_dir() or "/" in spec:  # a folder, or a hub id (resolve_path says if neither)
        return RewardModelJudge(spec, chat_template, tokenizer, dtype=dtype, device=device, batch_size=batch_size)
    raise unknown_judge(spec, rules)
