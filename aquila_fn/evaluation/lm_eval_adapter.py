"""Run any lm-evaluation-harness task on this project's models (optional extra: `pip install .[eval]`).

    import lm_eval
    from aquila_fn.evaluation.lm_eval_adapter import AquilaLM        # imports lm_eval, registers "aquila_fn"
    lm = AquilaLM(model="stories260K.bin", tokenizer="tok512.model", batch_size=8)
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])

or from the harness CLI once registered (e.g. in a wrapper script that imports this module and
calls `register()`): `--model aquila_fn --model_args model=PATH,tokenizer=PATH,batch_size=8`.

`AquilaEvalModel` implements the harness's three request types on `aquila_fn.evaluation.evaluate` and does
not need lm_eval at all (requests only need an `.args` tuple, as `lm_eval.api.instance.Instance`
has). `AquilaLM` is the same class with `lm_eval.api.model.LM` mixed in, created on first access
so that importing this module never requires the harness.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch

from aquila_fn.evaluation.evaluate import (encode_pair, greedy_generate, load_model_and_tokenizer, rolling_windows,
                                score_continuations)

REGISTERED_NAME = "aquila_fn"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _as_bool(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


class AquilaEvalModel:
    """The harness's LM interface over pure `forward`.

    Construct from loaded objects (`config=, params=, tokenizer=`) or from paths as the harness's
    `--model_args` give them (`model=PATH[,tokenizer=PATH,adapters=PATH,dtype=bf16]`). Every
    string argument is converted, since `create_from_arg_string` passes strings.
    """

    def __init__(self, model: str | None = None, tokenizer: Any = None, *, config=None, params=None,
                 adapters: str | None = None, batch_size: int | str = 8, max_length: int | str | None = None,
                 max_gen_toks: int | str = 256, add_bos_token: bool | str = True, dtype: str = "float32",
                 device: str = "cpu", **unused):
        super().__init__()  # lm_eval's LM.__init__ when mixed in (rank, world size, cache hook)
        if params is None:
            if model is None:
                raise ValueError("give model=PATH, or config=, params= and tokenizer=")
            if dtype not in _DTYPES:
                raise ValueError(f"dtype={dtype!r}; expected one of {sorted(_DTYPES)}")
            config, params, tokenizer = load_model_and_tokenizer(
                model, tokenizer, adapters_path=adapters, dtype=_DTYPES[dtype], device=device)
        if config is None or tokenizer is None:
            raise ValueError("config and tokenizer are required with params")
        if unused:
            warnings.warn(f"AquilaEvalModel ignores arguments {sorted(unused)}", stacklevel=2)
        self.config, self.params, self.tokenizer = config, params, tokenizer
        self.batch_size = int(batch_size)
        self.max_length = min(int(max_length or config.max_seq_len), config.max_seq_len)
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = _as_bool(add_bos_token)

    # --- what the harness reads besides the three methods
    @property
    def prefix_token_id(self) -> int:
        """The token an empty context (and a rolling window's start) is conditioned on."""
        tok = self.tokenizer
        return tok.bos_id if tok.bos_id is not None else tok.eos_id

    @property
    def eot_token_id(self) -> int | None:
        return self.tokenizer.eos_id

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "path", type(self.tokenizer).__name__)).replace("/", "__")

    # --- request types
    def loglikelihood(self, requests: Sequence, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """args = (context, continuation) -> (log p(continuation | context), is greedy)."""
        pairs = [self._encode_pair(*req.args[:2]) for req in requests]
        scores = score_continuations(self.params, self.config, pairs, batch_size=self.batch_size,
                                     max_len=self.max_length, progress=not disable_tqdm)
        return [(s.logprob, s.is_greedy) for s in scores]

    def loglikelihood_rolling(self, requests: Sequence, disable_tqdm: bool = False) -> list[float]:
        """args = (text,) -> log p(text | prefix token), in disjoint max_length windows, every
        document on its own; the windows of all documents are batched together."""
        windows, owner = [], []
        for i, req in enumerate(requests):
            tokens = self.tokenizer.encode(req.args[0])
            for w in rolling_windows(tokens, self.prefix_token_id, self.max_length):
                windows.append(w)
                owner.append(i)
        scores = score_continuations(self.params, self.config, windows, batch_size=self.batch_size,
                                     max_len=self.max_length, progress=not disable_tqdm, desc="rolling")
        totals = [0.0] * len(requests)
        for i, s in zip(owner, scores):
            totals[i] += s.logprob
        return totals

    def generate_until(self, requests: Sequence, disable_tqdm: bool = False) -> list[str]:
        """args = (context, gen_kwargs) -> greedy text cut at the first `until` string."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}  # requests with the same stop strings and budget batch together
        for i, req in enumerate(requests):
            groups.setdefault(self._generation_key(req.args[1] if len(req.args) > 1 else {}), []).append(i)
        for (until, max_new), idx in groups.items():
            prompts = [self._encode_context(requests[i].args[0]) for i in idx]
            texts = greedy_generate(self.params, self.config, self.tokenizer, prompts, max_new_tokens=max_new,
                                    stop=until, batch_size=self.batch_size, progress=not disable_tqdm)
            for i, t in zip(idx, texts):
                out[i] = t
        return out  # type: ignore[return-value]

    # --- helpers
    def _encode_context(self, context: str) -> list[int]:
        ids = self.tokenizer.encode(context)
        if self.add_bos_token and self.tokenizer.bos_id is not None:
            ids = [self.tokenizer.bos_id] + ids
        return ids or [self.prefix_token_id]

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        ctx, cont = encode_pair(self.tokenizer, context, continuation, add_bos=self.add_bos_token)
        if not ctx:  # empty context and no BOS wanted: condition on the prefix token, as the harness does
            ctx = [self.prefix_token_id]
        return ctx, cont

    def _generation_key(self, kwargs: dict) -> tuple[tuple[str, ...], int]:
        kwargs = dict(kwargs or {})
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)  # EOS ends decoding by id anyway
        if _as_bool(kwargs.get("do_sample", False)) and float(kwargs.get("temperature", 1.0) or 0) > 0:
            warnings.warn("AquilaEvalModel decodes greedily; do_sample is ignored", stacklevel=3)
        max_new = int(kwargs.get("max_gen_toks", kwargs.get("max_new_tokens", self.max_gen_toks)))
        return tuple(u for u in until if u), max_new


_LM_CLASS = None


def lm_class() -> type:
    """`AquilaEvalModel` with lm_eval's `LM` base mixed in (imports lm_eval; raises ImportError
    with the install hint when it is missing)."""
    global _LM_CLASS
    if _LM_CLASS is None:
        try:
            from lm_eval.api.model import LM
        except ImportError as e:
            raise ImportError("the lm-eval harness is not installed: pip install 'aquila-fn[eval]' "
                              "(or pip install lm_eval)") from e
        _LM_CLASS = type("AquilaLM", (AquilaEvalModel, LM), {"__module__": __name__,
                                                             "__doc__": AquilaEvalModel.__doc__})
    return _LM_CLASS


def register(name: str = REGISTERED_NAME) -> type:
    """Register the harness model class under `name` (for `--model aquila_fn`); returns it."""
    cls = lm_class()  # first, so a missing harness gives the install hint
    from lm_eval.api.registry import register_model
    try:
        register_model(name)(cls)
    except (ValueError, AssertionError):
        pass  # already registered (importing twice)
    return cls


def __getattr__(name: str):
    if name == "AquilaLM":
        return register()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
