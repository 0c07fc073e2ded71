"""async-rl: asynchronous off-policy RL for LLM reasoners.

The folders are the architecture. Three stages, each behind its own heavy framework:

- ``actors/``   generate: the vLLM engine adapter, one group rollout, the rollout loop;
- ``buffer/``   store: the Arrow trajectory schema (the contract), the durable store,
  samplers, the service and its client;
- ``learners/`` train: objectives as pure functions, advantages, logprobs, the DeepSpeed
  adapter, checkpoints.

``async_rl/`` has two layers:

- the library the stages may import: ``config`` and ``config_io`` (the typed tree),
  ``records`` (typed records at process boundaries), ``rewards``, ``tasks`` (prompt
  sources, the synthetic task, the prompt encoder), ``weights`` (the weight wire format and
  transport), ``model`` (the tiny local model), ``seeds``;
- the wiring, which only the user's entry points import: ``job`` (Ray placement, the
  controller and the roles it starts), ``commands`` and ``cli``, ``evaluation``,
  ``prepare``.

Stages import their own folder, the library, and the buffer's contracts
(``buffer.schema``, ``buffer.client``); learners never import vLLM or ``actors``, actors
never import DeepSpeed or ``learners``, the buffer imports neither stage nor torch. One
library part reaches into a stage: the config takes ``algorithm.loss``'s union from
``learners/objectives`` (declarations that import torch only inside their functions), so an
objective is declared once, beside its loss.
``tests/unit/test_layering.py`` fails on any import that breaks this.
"""
