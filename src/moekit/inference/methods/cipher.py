"""A cipher "language": the same math prompts under a fixed letter substitution.

"Multilingual Routing in Mixture-of-Experts" (#50) compares a model's routing on English and on
other languages over parallel data. A deterministic substitution of the letters (a seeded
permutation of a-z, applied alike to A-Z; a few letters may map to themselves) gives a second
language that is parallel by construction: every byte but the letters is kept, so numbers,
spaces and punctuation stay, and the answer of a ciphered problem is the plain problem's answer.
`decipher(cipher(t)) == t`.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from functools import lru_cache

from moekit.data.mathgen import MathProblem

CIPHER_SEED = 50  # the permutation is part of the task definition: never change it


@lru_cache(maxsize=4)
def _tables(seed: int) -> tuple[dict[int, int], dict[int, int]]:
    letters = list(string.ascii_lowercase)
    shuffled = letters[:]
    random.Random(f"moekit-cipher:{seed}").shuffle(shuffled)
    forward: dict[int, int] = {}
    for plain, coded in zip(letters, shuffled, strict=True):
        forward[ord(plain)] = ord(coded)
        forward[ord(plain.upper())] = ord(coded.upper())
    backward = {value: key for key, value in forward.items()}
    return forward, backward


def cipher(text: str, seed: int = CIPHER_SEED) -> str:
    """`text` with every ASCII letter substituted (case kept); other characters unchanged."""
    return text.translate(_tables(seed)[0])


def decipher(text: str, seed: int = CIPHER_SEED) -> str:
    """The inverse of `cipher`."""
    return text.translate(_tables(seed)[1])


@dataclass(frozen=True)
class CipheredProblem:
    """A math problem in the cipher language: prompt and text ciphered, the same exact answer;
    a generation is deciphered before it is checked (so 'k = 5' reads 'x = 5')."""

    plain: MathProblem
    seed: int = CIPHER_SEED

    @property
    def question(self) -> str:
        return cipher(self.plain.question, self.seed)

    @property
    def answer(self) -> str:
        return self.plain.answer

    @property
    def kind(self) -> str:
        return self.plain.kind

    @property
    def prompt(self) -> str:
        return cipher(self.plain.prompt, self.seed)

    @property
    def text(self) -> str:
        return cipher(self.plain.text, self.seed)

    def check(self, generation: str) -> bool:
        return self.plain.check(decipher(generation, self.seed))
