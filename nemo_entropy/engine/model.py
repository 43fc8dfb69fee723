"""The tiny causal LM of the local engine: a transformers Qwen2 body and a vocab-parallel LM head.

The body (embeddings, decoder layers, final norm) is replicated on every rank. The output embedding is
split by vocabulary rows over the TP group, as in Megatron: rank ``t`` holds rows
``[t * V_local, (t + 1) * V_local)`` of the head padded to a multiple of the TP size. The hidden states
enter the head through :func:`nemo_entropy.parallel.copy_to_tp_region` (identity forward, all-reduce
backward) so the body's gradient is the sum of every shard's contribution and is identical on all TP
ranks. Weights are initialised from the full, unsharded tensors drawn from the seed, so the model is the
same function whatever the layout.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import torch
from torch import nn

from nemo_entropy.parallel import ProcessGroup, copy_to_tp_region, gather_from_tp_region

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SUPPORTED_ARCHS = ("qwen2", "llama")


def _hf_config(arch: str, model_cfg: Mapping[str, Any], vocab_size: int, max_positions: int):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=int(model_cfg.get("hidden_size", 64)),
        intermediate_size=int(model_cfg.get("intermediate_size", 256)),
        num_hidden_layers=int(model_cfg.get("num_layers", 2)),
        num_attention_heads=int(model_cfg.get("num_attention_heads", 4)),
        num_key_value_heads=int(model_cfg.get("num_key_value_heads", 2)),
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        attn_implementation=str(model_cfg.get("attn_implementation", "eager")),
        pad_token_id=0,
    )
    if arch == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**common)
    from transformers import LlamaConfig

    return LlamaConfig(**common)


def _hf_body(arch: str, config) -> nn.Module:
    if arch == "qwen2":
        from transformers import Qwen2Model

        return Qwen2Model(config)
    from transformers import LlamaModel

    return LlamaModel(config)


class TinyPolicy(nn.Module):
    """Replicated transformer body plus this rank's vocabulary slice of the LM head.

    Args:
        model_cfg: ``engine.model`` (arch, hidden_size, intermediate_size, num_layers, num_attention_heads,
            num_key_value_heads, attn_implementation, init_std).
        vocab_size: the task's vocabulary (unpadded).
        max_positions: the longest sequence (prompt + response).
        seed: initialisation seed; the same on every rank.
        tp_group: the vocab-parallel group (``None``: unsharded).
        tp_rank, tp_size: this rank's position in it.
    """

    def __init__(
        self,
        model_cfg: Mapping[str, Any],
        *,
        vocab_size: int,
        max_positions: int,
        seed: int,
        tp_group: Optional[ProcessGroup] = None,
        tp_rank: int = 0,
        tp_size: int = 1,
    ):
        super().__init__()
        arch = str(model_cfg.get("arch", "qwen2"))
        if arch not in SUPPORTED_ARCHS:
            raise ValueError(f"engine.model.arch must be one of {SUPPORTED_ARCHS}, got {arch!r}")
        self.vocab_size = vocab_size
        self.tp_group, self.tp_rank, self.tp_size = tp_group, tp_rank, tp_size
        self.padded_vocab_size = -(-vocab_size // tp_size) * tp_size
        self.vocab_per_rank = self.padded_vocab_size // tp_size
        self.vocab_start = tp_rank * self.vocab_per_rank
        config = _hf_config(arch, model_cfg, vocab_size, max_positions)
        # Draw the replicated body from the seed without touching (or depending on) the global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.body = _hf_body(arch, config)
        std = float(model_cfg.get("init_std", config.initializer_range))
        full_head = torch.randn(vocab_size, config.hidden_size, generator=torch.Generator().manual_seed(seed + 1)) * std
        padded = torch.zeros(self.padded_vocab_size, config.hidden_size)
        padded[:vocab_size] = full_head
        self.lm_head_shard = nn.Parameter(padded[self.vocab_start : self.vocab_start + self.vocab_per_rank].clone())

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final hidden states [batch, length, hidden]; causal, so later (padding) tokens never leak back."""
        return self.body(input_ids=input_ids, use_cache=False).last_hidden_state

    def hidden_states_cached(self, input_ids: torch.Tensor, cache=None):
        """Final hidden states of ``input_ids`` appended after the sequence held by ``cache`` (a transformers
        key/value cache, ``None`` to start one); returns ``(hidden [batch, length, hidden], cache)``.
        Generation feeds one token at a time instead of re-running the whole prefix."""
        out = self.body(input_ids=input_ids, past_key_values=cache, use_cache=True)
        return out.last_hidden_state, out.past_key_values

    def logits_shard(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the logits [.., V_local] (padded rows included; the entropy API masks them)."""
        return copy_to_tp_region(hidden, self.tp_group) @ self.lm_head_shard.t()

    def full_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the real vocabulary on every TP rank (sampling and the warm start)."""
        return gather_from_tp_region(self.logits_shard(hidden), self.tp_group)[..., : self.vocab_size]

    def replicated_parameters(self) -> list[nn.Parameter]:
        """Parameters every TP rank holds in full (the body)."""
        return list(self.body.parameters())

    def sharded_parameters(self) -> list[nn.Parameter]:
        """Parameters split over TP (the head slice)."""
        return [self.lm_head_shard]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded weights (call on every TP rank; the head is all-gathered). Used by the warm start."""
        state = {f"body.{k}": v.detach().clone() for k, v in self.body.state_dict().items()}
        head = gather_from_tp_region(self.lm_head_shard.detach().t().contiguous(), self.tp_group).t()
        state["lm_head"] = head[: self.vocab_size].clone()
        return state

    def load_full_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load unsharded weights (from :meth:`full_state_dict`), keeping this rank's head slice."""
        body = {k[len("body.") :]: v for k, v in state.items() if k.startswith("body.")}
        self.body.load_state_dict(body)
        padded = torch.zeros(self.padded_vocab_size, state["lm_head"].shape[1])
        padded[: self.vocab_size] = state["lm_head"]
        with torch.no_grad():
            self.lm_head_shard.copy_(padded[self.vocab_start : self.vocab_start + self.vocab_per_rank])
