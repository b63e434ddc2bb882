"""Generation on the compiled graphs: generate(...)  ==>  prefill graph + one-token decode graph, KV cache as tensors.

A decode step is the source model's own forward with a cache, captured by torch.export through the compiled model's
pipeline (its method passes: the adapters stay in the graph, unmerged, and read the one parameter table, so the
trained adapters are the ones used). The cache crosses the graph boundary as plain tensors, one (key, value) pair per
layer (encoder-decoders add the cross-attention pair): the graph rebuilds transformers' DynamicCache from them and
returns the updated tensors. A step therefore costs one token's forward plus attention over the cached keys, never a
forward over the whole prefix.

Graphs, each captured once per compiled model with dynamic batch and cache length:
    decoder LM       prefill(input_ids, attention_mask, position_ids)             -> last logits, cache
                     decode(one token, attention_mask, position_ids, cache)       -> last logits, cache
    encoder-decoder  encode(input_ids, attention_mask)                            -> encoder states
                     prefill(decoder start token, encoder states, attention_mask) -> logits, self + cross cache
                     decode(one token, encoder states, attention_mask, cache)     -> logits, self cache
An input that every graph of its role guards against (a cache of one token, where the sample had more) is captured
as well, as CompiledModel.forward does for new shapes. Prompt tuning's and P-tuning's pass runs only in the graph that
reads the prompt (prefill, or encode): later graphs find the virtual tokens in the cache or the encoder states, and
the attention mask gets ones for them, as HF PEFT's prepare_inputs_for_generation does.

The loops are transformers' greedy / multinomial-sampling loop and its beam search: same position ids from the
attention mask (left padding works), same stopping on EOS with PAD filling finished rows, same default length (20 new
tokens), transformers' own logits processors for the options it supports and its own beam ranking; other generation
options raise GenerationError.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn
from torch.fx import GraphModule

from .capture import capture
from .errors import GenerationError
from .instrument import Verify
from .lower.eager import _is_guard_failure
from .passes.insert_prompt_tuning import InsertPromptTuning
from .pipeline import PassContext, Pipeline

# Generation options that change what this loop does; others must be at their defaults.
SUPPORTED = ("max_new_tokens", "max_length", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
             "eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id", "num_beams", "length_penalty",
             "early_stopping", "num_return_sequences")
# Options that do not change the tokens (a cache is always used; outputs are always token ids).
_IGNORED = ("use_cache", "output_attentions", "output_hidden_states", "_from_model_config", "transformers_version",
            "return_dict_in_generate", "output_scores", "output_logits")


def view_with_forward(model: nn.Module, forward: Callable, role: str) -> nn.Module:
    """`model` with another forward: it shares the model's modules, parameters and attributes, so the captured graph
    has the model's own parameter names and module paths, and the passes match it as they match the model."""
    cls = type(f"{type(model).__name__}{role.title()}", (type(model),), {"forward": forward})
    view = cls.__new__(cls)
    view.__dict__.update(model.__dict__)
    return view


def _layers(cache) -> list[tuple[torch.Tensor, ...]]:
    """A transformers cache as tensors: (key, value) per layer, plus (cross key, cross value) for an
    EncoderDecoderCache."""
    if hasattr(cache, "cross_attention_cache"):
        return [(s.keys, s.values, c.keys, c.values)
                for s, c in zip(cache.self_attention_cache.layers, cache.cross_attention_cache.layers)]
    return [(layer.keys, layer.values) for layer in cache.layers]


def _decoder_forward(base_forward: Callable, extra: dict[str, Any]) -> Callable:
    from transformers import DynamicCache

    def forward(self, input_ids, attention_mask, position_ids=None, cache=None):
        if cache is None:
            _same_length(input_ids, attention_mask)
        kwargs = dict(extra) if position_ids is None else {**extra, "position_ids": position_ids}
        out = base_forward(self, input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                           cache=DynamicCache(cache, config=self.config), **kwargs)
        return out.logits[:, -1], _layers(out.cache)

    return forward


def _same_length(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """Tell capture what holds for a prompt: mask and ids have one length (one symbol), so a pass that lengthens the
    sequence (prompt tuning) lengthens both."""
    torch._check(attention_mask.shape[1] == input_ids.shape[1])


def _encoder_forward(self, input_ids, attention_mask):
    _same_length(input_ids, attention_mask)
    return self.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _seq2seq_forward(base_forward: Callable) -> Callable:
    from transformers import DynamicCache, EncoderDecoderCache

    def forward(self, decoder_input_ids, encoder_hidden_states, attention_mask, cache=None):
        # From tensors, the cross-attention cache counts as computed: the decode graph reads it, never recomputes it.
        cache = EncoderDecoderCache(DynamicCache(config=self.config), DynamicCache(config=self.config)) \
            if cache is None else EncoderDecoderCache(cache)
        out = base_forward(self, encoder_outputs=(encoder_hidden_states,), attention_mask=attention_mask,
                           decoder_input_ids=decoder_input_ids, cache=cache, use_cache=True)
        return out.logits[:, -1], _layers(out.cache)

    return forward


def _at_least_two_rows(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A capture sample whose batch is not 1 (a size-1 dim specializes): every input's batch is its dim 0."""
    def widen(x):
        return x.expand(2, *x.shape[1:]).contiguous() if isinstance(x, torch.Tensor) and x.shape[0] == 1 else x

    return torch.utils._pytree.tree_map(widen, kwargs)


class Generator:
    """The generation graphs of one CompiledModel, captured on first use and kept in its graph cache."""

    def __init__(self, cm: nn.Module):
        source = cm._source
        if not callable(getattr(source, "get_output_embeddings", None)) or source.get_output_embeddings() is None:
            raise GenerationError(f"generate() needs a language-modeling head; {type(source).__name__} has none "
                                  "(use a *ForCausalLM or *ForConditionalGeneration model)")
        self.cm = cm
        config = getattr(source, "config", None)
        self.encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        # Training passes (prune-grads, recompute) shape a training step: generation runs none.
        method = cm.pipeline.method
        prompts = [p for p in method.passes if isinstance(p, InsertPromptTuning)]
        # Prompt tuning's virtual tokens (P-tuning's too) belong to the prompt, as in HF PEFT: the graph that reads
        # the prompt prepends them (the encoder's, or a decoder's prefill); later graphs find them in the KV cache
        # or the encoder states, and only the attention mask says they are there.
        self.virtual_tokens = sum(p.rule.length for p in prompts)
        without_prompt = Pipeline(tuple(p for p in method.passes if p not in prompts))
        self.pipelines = {"encode": method, "prefill": without_prompt, "decode": without_prompt} \
            if self.encoder_decoder else {"prefill": method, "decode": without_prompt}
        base_forward = type(source).forward
        params = inspect.signature(source.forward).parameters
        if "cache" not in params:
            raise GenerationError(f"{type(source).__name__}.forward takes no `cache`: generate() needs a "
                                  "transformers model with a KV cache")
        self.positions = "position_ids" in params and not self.encoder_decoder
        if self.encoder_decoder:
            step = _seq2seq_forward(base_forward)
            self.views = {"encode": view_with_forward(source, _encoder_forward, "encode")}
        else:
            extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
            step = _decoder_forward(base_forward, extra)
            self.views = {}
        self.views["prefill"] = self.views["decode"] = view_with_forward(source, step, "step")

    def graphs(self, role: str) -> list[GraphModule]:
        # In the compiled model's graph cache, so `.to()` rebinds their buffers as it does the forward graphs'.
        return self.cm._graphs.setdefault(("generate", role), [])

    def run(self, role: str, **kwargs: Any):
        for gm in self.graphs(role):
            try:
                return gm(**kwargs)
            except Exception as e:
                if not _is_guard_failure(e):
                    raise
        first = not self.graphs(role)
        gm = self._capture(role, _at_least_two_rows(kwargs) if first else kwargs)
        try:
            return gm(**kwargs)
        except Exception as e:  # the widened sample's graph does not take these inputs: capture them as they are
            if not (first and _is_guard_failure(e)):
                raise
            return self._capture(role, kwargs)(**kwargs)

    def _capture(self, role: str, kwargs: dict[str, Any]) -> GraphModule:
        cm, source = self.cm, self.cm._source
        view = self.views[role]
        was_training = source.training
        view.eval()  # no dropout while generating, as in HF's usual `model.eval()` before generate
        try:
            # Dynamic even when cm is not: a static cache length would mean one capture per new token.
            gm = capture(view, (), kwargs, cm.params, dynamic=True)
        finally:
            source.train(was_training)
        instruments = [Verify()] if cm.verify else []
        gm = self.pipelines[role].run(gm, PassContext(cm.params, cm._info, training=False), instruments)
        self.graphs(role).append(gm)
        return gm

    # ---- the loop ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, options: dict[str, Any]):
        config = _generation_config(self.cm._source, options)
        if self.virtual_tokens and input_ids.shape[1] < 2:
            raise GenerationError("generate() with prompt tuning or P-tuning needs prompts of at least 2 tokens: the "
                                  "prompt pass lengthens a sequence whose captured length must be dynamic, and a "
                                  "one-token input specializes it. Left padding does not help (with a prompt, "
                                  "positions ignore padding); prepend the BOS token, or generate with HF PEFT")
        if attention_mask is None:
            attention_mask = _default_mask(input_ids, config)
        if self.encoder_decoder:
            states = self.run("encode", input_ids=input_ids, attention_mask=attention_mask)
            start = config.decoder_start_token_id if config.decoder_start_token_id is not None \
                else config.bos_token_id
            if start is None:
                raise GenerationError("the encoder-decoder's generation config has no decoder_start_token_id; "
                                      "pass decoder_start_token_id=... to generate()")
            sequences = torch.full((input_ids.shape[0], 1), start, dtype=torch.long, device=input_ids.device)
            inputs = {"decoder_input_ids": sequences, "encoder_hidden_states": states,
                      "attention_mask": self._with_virtual_tokens(attention_mask)}
        else:
            sequences = input_ids
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if self.positions and self.virtual_tokens:
                # HF PEFT drops position ids with a prompt: tokens count from 0 at the first virtual one, padding or
                # not (the prefill graph numbers its own positions; these say where decoding goes on from).
                inputs["position_ids"] = torch.arange(self.virtual_tokens, self.virtual_tokens + input_ids.shape[1],
                                                      device=input_ids.device).expand(input_ids.shape[0], -1)
            elif self.positions:
                inputs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        new_tokens = _new_tokens(self.cm._source, config, sequences.shape[1])
        eos = _token_tensor(config.eos_token_id, sequences.device)
        pad = config.pad_token_id if config.pad_token_id is not None else \
            (int(eos[0]) if eos is not None else None)
        if config.num_beams > 1:
            return self._beam_search(inputs, sequences, config, new_tokens, eos, pad)
        pick = _token_picker(config, sequences.shape[1])
        unfinished = torch.ones(sequences.shape[0], dtype=torch.bool, device=sequences.device)

        logits, cache = self.run("prefill", **inputs)
        if not self.encoder_decoder:
            inputs["attention_mask"] = self._with_virtual_tokens(attention_mask)
        for step in range(new_tokens):
            token = pick(sequences, logits.float())
            if eos is not None:
                token = torch.where(unfinished, token, torch.full_like(token, pad))
            sequences = torch.cat([sequences, token[:, None]], dim=-1)
            if eos is not None:
                unfinished &= ~torch.isin(token, eos)
            if step == new_tokens - 1 or not unfinished.any():
                break
            inputs = self._next_inputs(inputs, token, cache)
            logits, cache = self.run("decode", **inputs)
        return sequences

    def _beam_search(self, inputs: dict[str, Any], sequences: torch.Tensor, config, new_tokens: int,
                     eos: torch.Tensor | None, pad: int | None) -> torch.Tensor:
        """transformers' beam search on the prefill and decode graphs: each row runs as num_beams rows, and the
        cache tensors follow the surviving beams after every step. The ranking is transformers' own beam
        bookkeeping (GenerationMixin's helpers), so ties, the length penalty and early stopping rank as in HF."""
        from transformers import GenerationMixin as hf
        from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList

        source, beams, batch, device = self.cm._source, config.num_beams, sequences.shape[0], sequences.device
        inputs = {k: v.repeat_interleave(beams, dim=0) for k, v in inputs.items()}
        flat = sequences.repeat_interleave(beams, dim=0)
        prompt, max_length = flat.shape[1], flat.shape[1] + new_tokens
        criteria = StoppingCriteriaList([MaxLengthCriteria(max_length)] + ([EosTokenCriteria(eos)] if eos is not None
                                                                           else []))
        processors = _processors(config, prompt)
        keep = max(2, 1 + (len(eos) if eos is not None else 0)) * beams  # spares, when the best beams all end
        top_beams = torch.arange(keep, device=device) < beams
        fill = (pad or int(eos[0])) if eos is not None else -1  # transformers' filler after a finished beam
        running = torch.full((batch, beams, max_length), fill, dtype=torch.long, device=device)
        running[:, :, :prompt] = flat.view(batch, beams, prompt)
        finished = running.clone()
        running_scores = torch.zeros((batch, beams), device=device)
        running_scores[:, 1:] = -1e9  # one live beam at first: the others would repeat its tokens
        scores = torch.full((batch, beams), -1e9, device=device)
        done = torch.zeros((batch, beams), dtype=torch.bool, device=device)
        improvable = torch.ones((batch, 1), dtype=torch.bool, device=device)
        running_from = torch.full((batch, beams, new_tokens), -1, dtype=torch.int32, device=device)
        finished_from = running_from.clone()
        ranking = dict(num_beams=beams, decoder_prompt_len=prompt)

        logits, cache = self.run("prefill", **inputs)
        if not self.encoder_decoder:
            inputs["attention_mask"] = self._with_virtual_tokens(inputs["attention_mask"])
        for length in range(prompt, max_length):
            log_probs = processors(flat, torch.log_softmax(logits.float(), dim=-1))
            log_probs = (log_probs.view(batch, beams, -1) + running_scores[:, :, None]).view(batch, -1)
            top_scores, top_sequences, top_from = hf._get_top_k_continuations(
                source, log_probs, running, running_from, cur_len=length, do_sample=False, beams_to_keep=keep,
                batch_size=batch, **ranking)
            ended = criteria(top_sequences[:, :, :length + 1].reshape(batch * keep, -1), None).view(batch, keep)
            running, running_scores, running_from = hf._get_running_beams_for_next_iteration(
                source, top_scores, top_sequences, top_from, ended, beams)
            finished, scores, finished_from, done = hf._update_finished_beams(
                source, finished, top_sequences, scores, top_scores, finished_from, top_from, improvable, done, ended,
                top_beams, cur_len=length, length_penalty=config.length_penalty,
                early_stopping=config.early_stopping, **ranking)
            improvable = hf._check_early_stop_heuristic(
                improvable, running_scores, scores, done, cur_len=length + 1, max_length=max_length,
                decoder_prompt_len=prompt, early_stopping=config.early_stopping, length_penalty=config.length_penalty)
            if not hf._beam_search_has_unfinished_sequences(improvable, done, ended, config.early_stopping):
                break
            origin = running_from[..., length - prompt].reshape(-1)
            cache = [tuple(t.index_select(0, origin) for t in layer) for layer in cache]
            flat = running[:, :, :length + 1].reshape(batch * beams, -1)
            inputs = self._next_inputs(inputs, flat[:, -1], cache)
            logits, cache = self.run("decode", **inputs)
        returned = config.num_return_sequences
        sequences = finished[:, :returned].reshape(batch * returned, max_length)
        generated = (finished_from[:, :returned].reshape(batch * returned, -1) + 1).bool().sum(dim=1).max()
        return sequences[:, :prompt + generated]

    def _with_virtual_tokens(self, mask: torch.Tensor) -> torch.Tensor:
        """The attention mask of the prompt as the graph after the prompt's saw it: ones for the virtual tokens."""
        return torch.cat([mask.new_ones((mask.shape[0], self.virtual_tokens)), mask], dim=-1) \
            if self.virtual_tokens else mask

    def _next_inputs(self, inputs: dict[str, Any], token: torch.Tensor, cache) -> dict[str, Any]:
        inputs = dict(inputs, cache=cache)
        if self.encoder_decoder:
            inputs["decoder_input_ids"] = token[:, None]
            return inputs
        mask = inputs["attention_mask"]
        inputs["input_ids"] = token[:, None]
        inputs["attention_mask"] = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        if self.positions:
            inputs["position_ids"] = inputs["position_ids"][:, -1:] + 1
        return inputs


def _generation_config(source: nn.Module, options: dict[str, Any]):
    """The model's generation config updated with `options` (and an explicit `generation_config=`), checked to ask
    for nothing this loop does not do."""
    import copy

    from transformers import GenerationConfig

    options = dict(options)
    base = options.pop("generation_config", None)
    if base is None:
        base = getattr(source, "generation_config", None) or GenerationConfig()
    config = copy.deepcopy(base)
    unknown = [k for k in options if not hasattr(config, k)]
    if unknown:
        raise GenerationError(f"generate() got `{unknown[0]}`, which is neither a model input it takes (input_ids, "
                              f"attention_mask) nor a generation option; supported options: {', '.join(SUPPORTED)}")
    for key, value in options.items():
        setattr(config, key, value)
    defaults = GenerationConfig().to_dict()
    changed = [k for k, v in config.to_dict().items()
               if k not in SUPPORTED and k not in _IGNORED and v != defaults.get(k)]
    if config.return_dict_in_generate:
        changed.insert(0, "return_dict_in_generate")
    if changed:
        raise GenerationError(f"generate() on a compiled model does not support `{changed[0]}="
                              f"{getattr(config, changed[0])!r}`; it does greedy decoding, multinomial sampling and "
                              f"beam search with: {', '.join(SUPPORTED)}")
    defaults = GenerationConfig._get_default_generation_params()  # transformers' values for what is still unset
    for key in ("num_beams", "num_return_sequences", "length_penalty", "early_stopping", "temperature", "top_k",
                "top_p"):
        if getattr(config, key) is None:
            setattr(config, key, defaults[key])
    if config.num_beams > 1 and config.do_sample:
        raise GenerationError(f"generate() does beam search (num_beams={config.num_beams}) without sampling only; "
                              "pass do_sample=False, or num_beams=1 to sample")
    if config.num_return_sequences > 1 and config.num_beams == 1:
        raise GenerationError(f"num_return_sequences={config.num_return_sequences} needs beam search "
                              "(num_beams > 1); greedy decoding and sampling give one sequence per row")
    if config.num_return_sequences > config.num_beams:
        raise GenerationError(f"num_return_sequences={config.num_return_sequences} needs at least as many beams; "
                              f"got num_beams={config.num_beams}")
    return config


def _token_tensor(ids, device) -> torch.Tensor | None:
    if ids is None:
        return None
    return torch.tensor([ids] if isinstance(ids, int) else list(ids), dtype=torch.long, device=device)


def _default_mask(input_ids: torch.Tensor, config) -> torch.Tensor:
    """transformers' inference: mask out PAD tokens when there are some and PAD is not also EOS."""
    ones = torch.ones_like(input_ids)
    pad, eos = config.pad_token_id, _token_tensor(config.eos_token_id, input_ids.device)
    if pad is None or not (input_ids == pad).any() or (eos is not None and (eos == pad).any()):
        return ones
    return input_ids.ne(pad).long()


def _new_tokens(source: nn.Module, config, length: int) -> int:
    if config.max_new_tokens is not None:
        return config.max_new_tokens
    if config.max_length is not None:
        return max(config.max_length - length, 0)
    limit = getattr(getattr(source, "config", None), "max_position_embeddings", None)
    total = length + 20  # transformers' default: 20 new tokens, within the position table
    return (min(total, limit) if limit is not None else total) - length


def _token_picker(config, length: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """argmax, or multinomial sampling, after transformers' own processors for the options given."""
    processors = _processors(config, length)

    def pick(sequences: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        scores = processors(sequences, logits)
        if config.do_sample:
            return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        return scores.argmax(dim=-1)

    return pick


def _processors(config, length: int):
    """transformers' own logits processors for the options given, in its order."""
    from transformers import (LogitsProcessorList, MinNewTokensLengthLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    processors = LogitsProcessorList()
    eos = config.eos_token_id
    if config.min_new_tokens and eos is not None:
        processors.append(MinNewTokensLengthLogitsProcessor(length, config.min_new_tokens, eos))
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k:
            processors.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    return processors


def generate(cm: nn.Module, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
             options: dict[str, Any]) -> torch.Tensor:
    """CompiledModel.generate: the compiled model's Generator, made on first use."""
    if input_ids is None:
        raise GenerationError("generate() needs input_ids (token ids [batch, length]); inputs_embeds are not "
                              "supported")
    from .adapters import require_slots

    require_slots(cm, "cm.generate()")  # its decode graphs are the compiled slots' (one adapter of that structure)
    generator = cm.__dict__.get("_generator")
    if generator is None:
        generator = Generator(cm)
        object.__setattr__(cm, "_generator", generator)
    return generator.generate(input_ids, attention_mask, options)
