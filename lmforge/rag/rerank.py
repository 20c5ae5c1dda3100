"""An LM reranker: UPR (Sachan et al. 2022, "Improving Passage Retrieval with Zero-Shot Question Generation").

A passage is scored by how likely the language model finds the question after reading it: the mean
log-probability of the question's tokens given "Passage: ...  Please write a question based on this passage.
Question:". No training and no other model — the model that answers ranks the passages it will read.
`evidence(..., model=, tokenizer=)` ranks the sentences of the retrieved chunks so (`rag ask/eval --rerank`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lmforge.data.labels import IGNORE
from lmforge.train.losses import sequence_logprobs

UPR_PROMPT = "Passage: {passage}\nPlease write a question based on this passage.\nQuestion:"


@torch.inference_mode()
def question_logprobs(model: Any, tokenizer: Any, question: str, passages: Sequence[str], template: bool = False,
                      batch_size: int = 16) -> list[float]:
    """Per passage, the mean log p(question tokens | `UPR_PROMPT` with the passage) under `model`. `template`:
    the prompt is a user turn of the model's chat template and the question its reply; otherwise plain text.
    The question's tokens are the same for every passage (encoded apart); a long passage is cut from the left
    to fit the model's context. Batches of `batch_size` passages, right-padded (a causal model's logits at a
    position do not depend on what follows it)."""
    if model.cache_len is not None:
        raise ValueError("the model has a KV cache set up; call model.clear_cache() before reranking")
    prompts = [UPR_PROMPT.format(passage=p) for p in passages]
    if template:
        contexts = [list(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                       tokenize=True)) for p in prompts]
        asked = tokenizer.encode(question, add_bos=False)
    else:
        contexts = [tokenizer.encode(p) for p in prompts]
        asked = tokenizer.encode(" " + question, add_bos=False)
    limit = model.config.max_seq_len
    if not asked or len(asked) >= limit:
        raise ValueError(f"the question is {len(asked)} tokens: it must be 1 to {limit - 1} (the model's context)")
    seqs = [(c + asked)[-limit:] for c in contexts]
    scores: list[float] = []
    for i in range(0, len(seqs), batch_size):
        part = seqs[i:i + batch_size]
        T = max(map(len, part))
        x = torch.tensor([s + [0] * (T - len(s)) for s in part], device=model.device)  # (b, T), right-padded
        y = torch.full_like(x, IGNORE)  # (b, T): y[:, t] the token after t where it is a question token
        for j, s in enumerate(part):
            y[j, len(s) - len(asked) - 1:len(s) - 1] = x[j, len(s) - len(asked):len(s)]
        at = y != IGNORE  # (b, T): len(asked) positions a row, so the LM head runs only there
        logits = model(x, logits_at=at).view(len(part), len(asked), -1)  # (b, Q, vocab)
        total, count = sequence_logprobs(logits, y[at].view(len(part), len(asked)))  # (b,), (b,)
        scores += (total / count).tolist()
    return scores
