"""The tiny task of the real-NeMo-RL harness, built in code: tokenizer, causal LM, prompts, reward environment.

Nothing is downloaded. The task is the engine's verifiable one (:mod:`nemo_entropy.engine.task`, 1-digit
addition with an exact-match reward); the tokenizer is a transformers ``PreTrainedTokenizerFast`` over the task's
15 symbols; the policy is a transformers ``Qwen2ForCausalLM`` (2 layers, hidden 32, fp32) given a short
supervised warm start so that sampled answers are right about half of the time (GRPO then has reward variance
in every prompt group, so advantages and covariance scores are not all zero).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from nemo_entropy.engine import task as addition  # noqa: E402

TASK = addition.AdditionTask(digits=1)
TASK_NAME = "addition"
MODEL_NAME = "nemo-entropy/tiny-qwen2-addition"
"""What ``policy.model_name`` says; never looked up (the model is built by :func:`build_model`)."""


# ----------------------------------------------------------------------------------------------- tokenizer
def build_tokenizer():
    """A ``PreTrainedTokenizerFast`` whose ids are the task's token ids (``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2,
    ``+``, ``=``, digits); text in and out is the task's readable form (``decode`` of the engine task)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {**addition.SPECIAL_TOKENS, **{str(d): addition.DIGIT0 + d for d in range(10)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"<[a-z]+>|."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>",
                                        eos_token="<eos>")
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        addition.PAD, addition.BOS, addition.EOS)
    return tokenizer


# ----------------------------------------------------------------------------------------------- model
def model_config():
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=TASK.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
        attn_implementation="sdpa", pad_token_id=addition.PAD, bos_token_id=addition.BOS,
        eos_token_id=addition.EOS, torch_dtype=torch.float32,
    )


def build_model(seed: int = 0):
    """The policy: a fresh ``Qwen2ForCausalLM`` initialised from ``seed`` (fp32)."""
    from transformers import Qwen2ForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(model_config())
    return model.float()


def _sft_batch(operands: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + reference answer + EOS, and the mask of the answer positions (targets shifted by one)."""
    prompts, answers = TASK.prompts(operands), TASK.answers(operands)
    ids = torch.cat([prompts, answers], dim=1)
    answer_mask = torch.cat([torch.zeros_like(prompts, dtype=torch.bool), addition.response_mask(answers)], 1)
    return ids, answer_mask


def warm_start(path: Path, *, seed: int = 0, steps: int = 120, lr: float = 3e-3) -> Path:
    """Train the policy supervised on the task for ``steps`` Adam steps and save its state dict at ``path``
    (kept when it exists). This is the "pretrained model" every run starts from."""
    path = Path(path)
    if path.is_file():
        return path
    model = build_model(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        operands = torch.randint(0, 10, (64, 2), generator=generator)
        ids, answer_mask = _sft_batch(operands)
        logits = model(input_ids=ids).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        loss = (nll * answer_mask[:, 1:]).sum() / answer_mask[:, 1:].sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.rename(path)
    return path


# ----------------------------------------------------------------------------------------------- data
class AdditionPrompts(torch.utils.data.Dataset):
    """``count`` generated prompts as NeMo-RL ``DatumSpec`` items (one user message of token ids)."""

    def __init__(self, count: int, seed: int):
        self.operands = TASK.sample_operands(count, seed)
        self.prompt_ids = TASK.prompts(self.operands)

    def __len__(self) -> int:
        return len(self.operands)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ids = self.prompt_ids[index].clone()
        a, b = (int(v) for v in self.operands[index])
        return {
            "message_log": [{"role": "user", "content": addition.decode(ids.tolist()), "token_ids": ids}],
            "length": int(ids.numel()),
            "extra_env_info": {"a": a, "b": b},
            "loss_multiplier": 1.0,
            "idx": index,
            "task_name": TASK_NAME,
        }


def reward_of(text: str, a: int, b: int) -> float:
    """The engine task's exact-match reward of one response, from the text NeMo-RL hands the environment
    (decoded with special tokens removed, so the answer is judged as if it ended with ``<eos>``)."""
    if not text or not text.isdigit() or len(text) >= TASK.max_response_length:
        return 0.0
    tokens = [addition.DIGIT0 + int(ch) for ch in text] + [addition.EOS]
    response = torch.full((1, TASK.max_response_length), addition.PAD, dtype=torch.long)
    response[0, : len(tokens)] = torch.tensor(tokens)
    return float(TASK.rewards(torch.tensor([[a, b]]), response)[0])


def make_environment_class():
    """NeMo-RL's ``EnvironmentInterface`` for the task, as a Ray actor class (environments are Ray actors in
    NeMo-RL: ``run_multi_turn_rollout`` calls ``env.step.remote(...)``)."""
    import ray
    from nemo_rl.environments.interfaces import EnvironmentInterface, EnvironmentReturn

    class AdditionEnvironment(EnvironmentInterface):
        def step(self, message_log_batch, metadata):
            texts, rewards = [], []
            for log, info in zip(message_log_batch, metadata):
                text = str(log[-1]["content"]) if log and log[-1]["role"] == "assistant" else ""
                texts.append(text)
                rewards.append(reward_of(text, int(info["a"]), int(info["b"])))
            n = len(message_log_batch)
            return EnvironmentReturn(
                observations=[{"role": "environment", "content": ""} for _ in range(n)],
                metadata=[None] * n, next_stop_strings=[None] * n,
                rewards=torch.tensor(rewards, dtype=torch.float32),
                terminateds=torch.ones(n, dtype=torch.bool), answers=texts,
            )

        def global_post_process_and_metrics(self, batch):
            return batch, {}

        def shutdown(self) -> bool:
            return True

    return ray.remote(AdditionEnvironment)


def sampled_accuracy(state_path: Optional[Path], *, samples: int = 400, seed: int = 1) -> float:
    """Accuracy of temperature-1 samples of the warm-started policy (a check of the warm start)."""
    model = build_model()
    if state_path is not None:
        model.load_state_dict(torch.load(state_path, weights_only=True))
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    operands = torch.randint(0, 10, (samples, 2), generator=generator)
    ids = TASK.prompts(operands)
    with torch.no_grad():
        for _ in range(TASK.max_response_length):
            probs = torch.softmax(model(input_ids=ids).logits[:, -1].float(), -1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], 1)
    responses = ids[:, TASK.prompt_length:]
    return float(TASK.rewards(operands, responses).mean())
