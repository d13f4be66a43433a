"""MPT with Mixture-of-Experts FFNs: the model sparse upcycling produces.

``MptMoeForCausalLM`` is transformers' native ``MptForCausalLM`` with the FFN of the blocks in
``config.moe_layer_indices`` replaced by :class:`MoeFeedForward`. It has its own ``model_type``
(``"mpt_moe"``), registered with ``AutoConfig`` / ``AutoModelForCausalLM`` when this module is
imported, so a saved upcycled checkpoint can never be loaded as a plain MPT (which would silently
re-initialise every FFN). Its outputs follow Mixtral's contract: ``output_router_logits=True``
gives ``out.router_logits`` (one (tokens, num_experts) pre-softmax tensor per MoE layer) and
``out.aux_loss``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, MptConfig, MptForCausalLM
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.models.mpt.modeling_mpt import MptModel, MptPreTrainedModel

from moetune.models.load.loading_info import check_loading_info
from moetune.models.routing.balance import load_balancing_loss, router_z_loss

MODEL_TYPE = "mpt_moe"


@strict
class MptMoeConfig(MptConfig):
    """MptConfig plus the MoE settings (Mixtral's names where Mixtral has one)."""

    model_type = MODEL_TYPE
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    moe_layer_indices: list[int] | None = None  # None = every block
    capacity_factor: float | None = None
    router_jitter_noise: float = 0.0
    router_aux_loss_coef: float = 0.001
    router_z_loss_coef: float = 0.0
    output_router_logits: bool = False

    def moe_layers(self) -> list[int]:
        """Indices of the blocks whose FFN is an MoE block."""
        return list(range(self.n_layers)) if self.moe_layer_indices is None else list(self.moe_layer_indices)


class ExpertMLP(nn.Module):
    """One expert: MPT's FFN without the dropout and residual, which the MoE block applies once."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.act = nn.GELU(approximate="none")
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(hidden_states)))


class MoeFeedForward(nn.Module):
    """Top-k routed experts with MPT's FFN contract: ``forward(hidden_states, residual)`` adds the residual.

    Routing: softmax over the router logits, the top-k probabilities renormalised to sum to 1
    (so identical experts reproduce the dense FFN exactly). Optional Switch-style router jitter
    and expert capacity apply in training only, so evaluation and generation never drop tokens.
    This is the class to pass to ``deepspeed.utils.set_z3_leaf_modules``.
    """

    def __init__(self, config: MptMoeConfig):
        super().__init__()
        hidden = config.hidden_size
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.capacity_factor = config.capacity_factor
        self.router_jitter = config.router_jitter_noise
        self.hidden_dropout = config.attn_config.attn_pdrop  # what MptMLP uses
        self.router = nn.Linear(hidden, self.num_experts, bias=False)
        # MptMLP hard-codes 4 * hidden (it ignores expansion_ratio); copies must match it.
        self.experts = nn.ModuleList(ExpertMLP(hidden, 4 * hidden) for _ in range(self.num_experts))
        # Set by MptMoeForCausalLM.forward for the duration of one forward pass; None otherwise,
        # so the recomputation of gradient checkpointing does not record logits a second time.
        self.router_logits_sink: list[torch.Tensor] | None = None

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        tokens = hidden_states.reshape(-1, shape[-1])
        router_input = tokens
        if self.training and self.router_jitter > 0:
            router_input = tokens * torch.empty_like(tokens).uniform_(1.0 - self.router_jitter, 1.0 + self.router_jitter)
        router_logits = self.router(router_input)
        if self.router_logits_sink is not None:
            self.router_logits_sink.append(router_logits)
        weights, chosen = self.route(router_logits)
        output = torch.zeros_like(tokens)
        for index, expert in enumerate(self.experts):
            # Every expert runs, on an empty batch when no token chose it: the graph then always
            # contains every parameter, so DDP needs no find_unused_parameters.
            token_index, slot = torch.where(chosen == index)
            expert_out = expert(tokens[token_index]) * weights[token_index, slot, None]
            output.index_add_(0, token_index, expert_out.to(output.dtype))
        output = F.dropout(output.reshape(shape), p=self.hidden_dropout, training=self.training)
        return output + residual

    def route(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, expert indices), each (tokens, top_k); weights of tokens over capacity are 0."""
        probs = torch.softmax(router_logits.float(), dim=-1)
        top_probs, chosen = torch.topk(probs, self.top_k, dim=-1)
        weights = top_probs / top_probs.sum(dim=-1, keepdim=True)
        if self.training and self.capacity_factor is not None:
            weights = weights * self.within_capacity(chosen)
        return weights.to(router_logits.dtype), chosen

    def within_capacity(self, chosen: torch.Tensor) -> torch.Tensor:
        """1 where an assignment fits its expert's capacity, 0 where it overflows (GShard order:
        every token's first choice is served before any second choice, earlier tokens first)."""
        tokens = chosen.shape[0]
        capacity = max(1, math.ceil(self.capacity_factor * tokens * self.top_k / self.num_experts))
        slot_major = chosen.t().reshape(-1)  # (top_k * tokens): all first choices, then all second
        one_hot = F.one_hot(slot_major, self.num_experts)
        position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1  # place in its expert's queue
        return (position < capacity).reshape(self.top_k, tokens).t().float()


class MptMoeForCausalLM(MptForCausalLM):
    """MPT causal LM whose FFNs in ``config.moe_layer_indices`` are :class:`MoeFeedForward` blocks."""

    config_class = MptMoeConfig
    config: MptMoeConfig
    _no_split_modules = ["MptBlock"]

    def __init__(self, config: MptMoeConfig):
        MptPreTrainedModel.__init__(self, config)
        self.transformer = MptModel(config)
        for index in config.moe_layers():
            self.transformer.blocks[index].ffn = MoeFeedForward(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def moe_blocks(self) -> list[nn.Module]:
        """The MoE blocks in forward order (native, or DeepSpeed after ``moe.expert_parallel.backend: deepspeed``)."""
        return [block.ffn for block in self.transformer.blocks if hasattr(block.ffn, "router_logits_sink")]

    def forward(self, input_ids=None, *, attention_mask=None, inputs_embeds=None, labels=None, use_cache=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, logits_to_keep=0,
                output_router_logits: bool | None = None, **kwargs) -> MoeCausalLMOutputWithPast:
        """MptForCausalLM.forward plus Mixtral's router outputs. As in Mixtral, ``loss`` includes
        ``router_aux_loss_coef * aux_loss`` (and ``router_z_loss_coef * z_loss``) when router logits
        are requested; moetune's trainer uses :func:`moetune.models.loss.objective.compute_losses` instead.

        The KV cache is passed through ``kwargs`` under the name the installed transformers uses
        (``cache``; ``past_key_values`` before it was renamed): naming it here would pass the
        deprecated name on every call, which MPT answers with a FutureWarning."""
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        sink: list[torch.Tensor] = []
        blocks = self.moe_blocks() if output_router_logits else []
        for block in blocks:
            block.router_logits_sink = sink
        try:
            out = super().forward(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                  labels=labels, use_cache=use_cache, output_attentions=output_attentions,
                                  output_hidden_states=output_hidden_states, return_dict=True, logits_to_keep=logits_to_keep, **kwargs)
        finally:
            for block in blocks:
                block.router_logits_sink = None
        router_logits = tuple(sink) if output_router_logits else None
        aux_loss = None
        loss = out.loss
        if router_logits:
            aux_loss = load_balancing_loss(router_logits, self.config.num_local_experts,
                                           self.config.num_experts_per_tok, attention_mask)
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss
                if self.config.router_z_loss_coef > 0:
                    loss = loss + self.config.router_z_loss_coef * router_z_loss(router_logits, attention_mask)
        # logits, the cache (under its version's field name), hidden states and attentions as MPT set them.
        passed_on = {key: value for key, value in out.items() if key != "loss"}
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, router_logits=router_logits, **passed_on)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Load strictly: a missing or unexpected weight is an error, never a silent re-initialisation."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        check_loading_info(info, args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        return (model, info) if want_info else model


def register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` know ``mpt_moe`` (idempotent)."""
    try:
        AutoConfig.register(MODEL_TYPE, MptMoeConfig)
    except ValueError:  # already registered
        pass
    try:
        AutoModelForCausalLM.register(MptMoeConfig, MptMoeForCausalLM)
    except ValueError:
        pass


register_auto_classes()
