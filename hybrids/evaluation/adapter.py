"""An lm-evaluation-harness model (lm_eval.api.model.LM) for any HybridLM layout.

- loglikelihood: context and continuation tokenized together (the context's trailing spaces move to the
  continuation, as lm-eval's own models do), truncated from the left to max_length, right-padded into batches:
  a causal model never reads the padding before a scored position, so no mask is needed.
- loglikelihood_rolling: lm-eval's disjoint rolling windows of max_length, each scored as above.
- generate_until: greedy decoding through the model's generation cache. Prompts are grouped by token length, so a
  batch needs no padding: a recurrent state would otherwise read left padding as input.

Imported only when an lm-eval task is asked for: lm_eval is the optional extra `eval`.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from hybrids.model import HybridLM


class TextCodec:
    """str <-> token ids through a hybrids tokenizer (hybrids.training.tokenizer): "byte" or an HF file."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos = tokenizer.separator

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode([text.encode("utf-8")])[0].tolist() if text else []

    def decode(self, ids: list[int]) -> str:
        out = self.tokenizer.decode(ids)
        return out.decode("utf-8", errors="replace") if isinstance(out, bytes) else out


class HybridsLM(LM):
    """lm-eval's view of a HybridLM (see the module docstring).

    Args:
        model: the model, in eval mode, on its device. codec: its tokenizer (TextCodec).
        batch_size: sequences per forward pass. max_length: tokens a scored window holds.
        max_gen_toks: the default cap of generated tokens when a task sets none.
    """

    def __init__(self, model: HybridLM, codec: TextCodec, batch_size: int = 8, max_length: int = 2048,
                 max_gen_toks: int = 256):
        super().__init__()
        self.model, self.codec = model, codec
        self.batch_size, self.max_length, self.max_gen_toks = batch_size, max_length, max_gen_toks
        self.prefix = codec.eos if codec.eos is not None else 0  # what an empty context starts from
        self.on = model.embed.weight.device

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, head = self.codec.encode(context + continuation), self.codec.encode(context)
        if not head:
            return [self.prefix], whole
        return head, whole[len(head):]

    @torch.no_grad()
    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log-probabilities of the continuation, whether greedy decoding gives it) per (context,
        continuation) token pair; a window keeps the last max_length + 1 tokens."""
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            windows = [(pairs[i][0] + pairs[i][1])[-(self.max_length + 1):] for i in chunk]
            length = max(len(w) for w in windows) - 1
            inputs = torch.zeros(len(chunk), length, dtype=torch.long)
            for row, w in enumerate(windows):
                inputs[row, :len(w) - 1] = torch.tensor(w[:-1])
            logprobs = F.log_softmax(self.model(inputs.to(self.on)).float(), dim=-1).cpu()  # (B, L, V)
            for row, (i, w) in enumerate(zip(chunk, windows, strict=True)):
                k = len(pairs[i][1])
                here = logprobs[row, len(w) - 1 - k:len(w) - 1]  # (k, V)
                target = torch.tensor(w[-k:])
                total = float(here.gather(-1, target[:, None]).sum())
                out[i] = (total, bool((here.argmax(-1) == target).all()))
        return out

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self.score([self._pair(*r.args) for r in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for r in requests:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.codec.encode(r.args[0]), self.prefix, self.max_length, 1)]
            out.append(sum(s for s, _ in self.score(windows)))
        return out

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = defaultdict(list)
        prompts = []
        for i, r in enumerate(requests):
            context, kwargs = r.args
            until = kwargs.get("until", [])
            until = [until] if isinstance(until, str) else list(until)
            steps = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = (self.codec.encode(context) or [self.prefix])[-max(1, self.max_length - steps):]
            prompts.append((ids, until))
            groups[(len(ids), steps)].append(i)
        for (_, steps), members in groups.items():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                ids = torch.tensor([prompts[i][0] for i in chunk], device=self.on)
                new = self.model.generate(ids, steps, eos_token_id=self.codec.eos)[:, ids.shape[1]:].tolist()
                for i, tokens in zip(chunk, new, strict=True):
                    if self.codec.eos in tokens:
                        tokens = tokens[:tokens.index(self.codec.eos)]
                    text = self.codec.decode(tokens)
                    for stop in prompts[i][1]:
                        if stop and stop in text:
                            text = text[:text.index(stop)]
                    out[i] = text
        return out
