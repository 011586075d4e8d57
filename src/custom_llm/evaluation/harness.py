"""Our models in EleutherAI's lm-evaluation-harness: the ``custom-llm`` model type.

Importing this module registers :class:`CustomLLM` under the names ``custom-llm`` and ``custom_llm``,
so ``lm_eval.simple_evaluate(model="custom-llm", model_args="ckpt=runs/tiny", tasks=[...])`` works, as
does ``python -m custom_llm.evaluation --model custom-llm --model_args ckpt=runs/tiny --tasks ...``
(lm-eval's own command line with this module imported first: lm-eval 0.4 has no plugin discovery,
so a model defined outside its source tree exists only once the defining module is imported).

The three request types, with the conventions of lm-eval's ``HFLM`` (tests hold the two together):

* ``loglikelihood``: :mod:`.scoring` (left truncation, only the continuation scored, shared prefixes);
* ``loglikelihood_rolling``: lm-eval's disjoint rolling windows over the document, each window
  keeping as much context as the model allows, scored by the same engine in one sorted pass;
* ``generate_until``: our :class:`~custom_llm.generation.Engine`, batched, stopping on the task's
  strings and on end-of-sequence (:mod:`.until`).

The prefix token (what an empty context conditions on) is the start token the model was trained
with: end-of-sequence, the document separator, for custom-llm checkpoints; BOS for Hugging Face folders.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Optional

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from ..errors import UserError
from ..generation import Engine, SamplingParams
from .scoring import score_requests
from .until import generate_until

log = logging.getLogger(__name__)
DEFAULT_BATCH_SIZE = 16


@register_model("custom-llm", "custom_llm")
class CustomLLM(TemplateLM):
    """An lm-eval ``LM`` over a custom-llm model and tokenizer (a checkpoint, a run, or a Hugging Face folder).

    ``ckpt``: the path to load; or pass ``model`` and ``tokenizer`` objects instead. ``batch_size``:
    requests per forward pass. ``max_length``: the context (default: the model's ``max_seq_len``).
    ``max_gen_toks``: tokens generated when a task does not say. ``prefix_token_id``: what an empty
    context conditions on (default: see the module docstring). ``seed``: for sampled generation.
    """

    def __init__(self, ckpt: Optional[str] = None, *, model: Optional[torch.nn.Module] = None, tokenizer: Any = None,
                 device: Optional[str] = None, dtype: str = "auto", batch_size: Any = DEFAULT_BATCH_SIZE,
                 max_length: Optional[int] = None, max_gen_toks: int = 256, prefix_token_id: Optional[int] = None,
                 seed: int = 1234, max_batch_size: Optional[int] = None, quantize: Optional[str] = None,
                 group_size: Any = 32, **unused: Any):
        super().__init__()
        if unused:
            log.warning("custom-llm: ignoring model arguments it does not know: %s", ", ".join(sorted(unused)))
        if (ckpt is None) == (model is None):
            raise UserError("custom-llm: give either ckpt=PATH or a model and tokenizer")
        start = None
        if ckpt is not None:
            from ..api import load_for_inference

            model, tokenizer, start = load_for_inference(ckpt, device, dtype, quantize or None, int(group_size))
        elif tokenizer is None:
            raise UserError("custom-llm: a model needs its tokenizer")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self._device = model.embed_tokens.weight.device
        self._batch_size = _parse_batch_size(batch_size)
        self._max_length = int(max_length or model.config.max_seq_len)
        self._max_gen_toks = int(max_gen_toks)
        if prefix_token_id is None:
            prefix_token_id = start if start is not None else _default_start(tokenizer)
        self._prefix_token_id = int(prefix_token_id)
        self._seed = int(seed)
        self._engine: Optional[Engine] = None

    # ------------------------------------------------------------------ what the harness asks about
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self._prefix_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return f"custom-llm-{self.tokenizer.fingerprint()}"

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, left_truncate_len: Optional[int] = None,
                   **kwargs: Any) -> list[int]:
        """Token ids of ``string`` (our tokenizers add no special tokens), optionally only the last ones."""
        ids = self.tokenizer.encode(string)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids: list[int]) -> str:
        """Text of ``ids``, special tokens dropped (as HFLM decodes generations)."""
        return self.tokenizer.decode(ids)

    # ------------------------------------------------------------------------------ log-likelihoods
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """Score (strings, context ids, continuation ids) requests; feeds lm-eval's response cache."""
        answers = score_requests(self.model, [(ctx, cont) for _, ctx, cont in requests], max_length=self.max_length,
                                 batch_size=self.batch_size)
        for (strings, _, _), answer in zip(requests, answers):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents, over disjoint windows that each keep the most context they can."""
        windows, owner = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(string)
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((context, continuation))
                owner.append(index)
        scores = score_requests(self.model, windows, max_length=self.max_length, batch_size=self.batch_size)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, scores):
            totals[index] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---------------------------------------------------------------------------------- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continue each context until a stop string, end-of-sequence or ``max_gen_toks`` (batched by kwargs)."""
        if self._engine is None:
            self._engine = Engine(self.model, compile=False)
        groups: dict[str, list[int]] = {}
        for index, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(index)
        out: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="custom-llm generate_until")
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            for index, text in zip(indices, self._generate_group([requests[i].args[0] for i in indices], kwargs)):
                out[index] = text
                self.cache_hook.add_partial("generate_until", requests[index].args, text)
                bar.update(1)
        bar.close()
        return out

    def _generate_group(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        """Texts for contexts that share generation arguments, longest context first in each batch."""
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        stops = handle_stop_sequences(kwargs.pop("until", None),
                                      eos=self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False))
        max_new = int(kwargs.pop("max_gen_toks"))
        budget = self.max_length - max_new
        if budget <= 0:
            raise UserError(f"custom-llm: max_gen_toks {max_new} leaves no room for a context in {self.max_length} "
                            f"tokens (pass max_gen_toks=... in --gen_kwargs or the model arguments)")
        params, generator = self._sampling(kwargs)
        prompts = [self.tok_encode(c, left_truncate_len=budget) or [self.prefix_token_id] for c in contexts]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        texts = [""] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            rows = generate_until(self._engine, self.tok_decode, [prompts[i] for i in batch], max_new, stops, params,
                                  generator, eos_ids={self.eot_token_id})
            for i, row in zip(batch, rows):
                texts[i] = postprocess_generated_text(self.tok_decode(row), stops, None)
        return texts

    def _sampling(self, kwargs: dict) -> tuple[SamplingParams, Optional[torch.Generator]]:
        """Sampling parameters from normalised generation kwargs (greedy unless ``do_sample``)."""
        if not kwargs.pop("do_sample", False):
            return SamplingParams(), None
        params = SamplingParams(temperature=float(kwargs.get("temperature", 1.0)), top_k=int(kwargs.get("top_k") or 0),
                                top_p=float(kwargs.get("top_p") or 1.0))
        return params, torch.Generator(device=self._device).manual_seed(self._seed)


def _parse_batch_size(value: Any) -> int:
    """An int batch size; lm-eval's ``auto`` (memory probing) becomes the default."""
    if isinstance(value, str) and value.startswith("auto"):
        log.info("custom-llm: batch_size=%s is not supported; using %d", value, DEFAULT_BATCH_SIZE)
        return DEFAULT_BATCH_SIZE
    size = int(value) if value is not None else DEFAULT_BATCH_SIZE
    if size < 1:
        raise UserError(f"custom-llm: batch_size must be >= 1 (got {size})")
    return size


def _default_start(tokenizer) -> int:
    """End-of-sequence (our document separator) when the tokenizer has one, else BOS."""
    return tokenizer.eos_id if tokenizer.eos_id >= 0 else tokenizer.bos_id

