"""`LLM`: the offline API, shaped like vLLM's `vllm.LLM` (generate over a list of prompts)."""

from __future__ import annotations

from parity.engine.args import EngineArgs
from parity.engine.llm_engine import LLMEngine
from parity.engine.outputs import RequestOutput
from parity.engine.sampling_params import SamplingParams
from parity.errors import RequestError


class LLM:
    """Offline batch generation.

    Args:
        model: checkpoint dir, preset name, or None (bundled default miniature).
        device: "auto" | "cpu" | "cuda" | "npu" | ...; dtype: torch dtype or name (None = per device).
        **engine_args: any other EngineArgs field (max_num_seqs, cache_memory, ...); also `model_obj=`
            an already built model and `tokenizer=` a tokenizer object.
    Raises:
        RequestError: an unknown or invalid engine argument (named).
    """

    def __init__(self, model: str | None = None, device: str = "auto", dtype=None, **engine_args):
        model_obj = engine_args.pop("model_obj", None)
        tokenizer = engine_args.pop("tokenizer", "auto")
        args = EngineArgs.from_kwargs(model=model, device=device, dtype=dtype, **engine_args)
        self.engine = LLMEngine(args, model=model_obj, tokenizer=tokenizer)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def config(self):
        return self.engine.config

    def generate(self, prompts: str | list[str] | None = None,
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 prompt_token_ids: list[int] | list[list[int]] | None = None) -> list[RequestOutput]:
        """Generate completions for every prompt, all batched together; outputs in input order.

        Args:
            prompts: a text prompt or a list of them (tokenized with the model's tokenizer).
            sampling_params: one SamplingParams for all, or one per prompt (default SamplingParams()).
            prompt_token_ids: instead of prompts: one list of ids or a list of lists.
        Returns:
            list[RequestOutput], one per prompt, finished.
        Raises:
            RequestError: naming the bad parameter (and the prompt index); nothing is run then.
        """
        if prompts is None and prompt_token_ids is None:
            raise RequestError("parameter 'prompts' is missing: give prompts or prompt_token_ids")
        items: list[tuple[str | None, list[int] | None]] = []
        if prompt_token_ids is not None:
            if prompt_token_ids and isinstance(prompt_token_ids[0], int):
                prompt_token_ids = [prompt_token_ids]  # type: ignore[list-item]
            items = [(None, list(p)) for p in prompt_token_ids]  # type: ignore[arg-type]
        else:
            if isinstance(prompts, str):
                prompts = [prompts]
            items = [(p, None) for p in prompts]  # type: ignore[union-attr]
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(items):
                raise RequestError(f"parameter 'sampling_params' has {len(sampling_params)} entries for "
                                   f"{len(items)} prompts: expected one or {len(items)}")
            plist = list(sampling_params)
        else:
            plist = [sampling_params or SamplingParams()] * len(items)
        eng = self.engine
        reqs = []
        try:
            for i, ((text, ids), sp) in enumerate(zip(items, plist)):
                try:
                    reqs.append(eng.add_request(ids, sp.clone() if sp is not None else None, prompt=text,
                                                enforce_queue_limit=False))
                except RequestError as e:
                    raise type(e)(f"prompt {i}: {e}") from None
        except RequestError:
            for r in reqs:
                eng.abort(r.request_id)
            eng.step()  # flush the abort deltas
            raise
        while eng.has_unfinished():
            eng.step()
        eng._pending.clear()
        return [r.output() for r in reqs]
