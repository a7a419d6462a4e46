"""The demo's task: write a target word, letter by letter, from a masked action space.

Actions are restricted to 16 letters with ``allowed_token_ids`` (an environment's action mask,
as RL rollouts use it), so a random policy scores 1/16 per position. The reward is the fraction
of positions that match the target: verifiable, dense, and learnable by the tiny model in
minutes on a CPU. The prompt is fixed ("spell:"), so every group asks the same question and the
policy must put the right letter at each position (a single repeated letter scores at most 1/8).
"""

from __future__ import annotations

import random

TARGET = "wireband"
ALPHABET = "abcdefghilmnorwz"  # 16 letters, including every letter of TARGET


class Task:
    def __init__(self, tokenizer: object, seed: int = 0) -> None:
        vocab = tokenizer.get_vocab()  # type: ignore[attr-defined]
        self.letter_ids = [vocab[c] for c in ALPHABET]
        self.target_ids = [vocab[c] for c in TARGET]
        self.bos = tokenizer.bos_token_id  # type: ignore[attr-defined]
        self.prompt_ids = [self.bos, *(vocab[c] for c in "spell:")]
        self.rng = random.Random(seed)
        self.id_to_letter = {vocab[c]: c for c in ALPHABET}

    @property
    def max_new_tokens(self) -> int:
        return len(self.target_ids)

    def prompt(self) -> list[int]:
        return list(self.prompt_ids)

    def reward(self, output_ids: list[int]) -> float:
        hits = sum(1 for a, b in zip(output_ids, self.target_ids, strict=False) if a == b)
        return hits / len(self.target_ids)

    def text(self, ids: list[int]) -> str:
        return "".join(self.id_to_letter.get(i, "?") for i in ids)
