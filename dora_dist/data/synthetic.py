"""The embedded corpus: synthetic text with learnable structure, generated deterministically (no download).

Five kinds of lines, mixed: small additions ("17 + 5 = 22 ."), counting runs ("count from 4 : 4 5 6 7 8 ."),
copy tasks ("copy : red fox blue -> red fox blue ."), fixed facts ("the capital of norway is oslo .") and templated
sentences ("the small cat sees the old tree ."). A small model learns most of it within a few hundred steps, so the
loss falls clearly from ln(vocab). The same generator gives prompt/completion and chat variants for tests.
"""

from __future__ import annotations

import random

CORPUS_VERSION = 1

ADJECTIVES = ["small", "old", "red", "quiet", "bright", "green", "tall", "happy", "cold", "dark", "soft", "fast"]
NOUNS = ["cat", "dog", "tree", "river", "house", "bird", "child", "stone", "car", "boat", "garden", "lamp"]
VERBS = ["sees", "likes", "finds", "follows", "watches", "paints", "moves", "hears"]
CAPITALS = {
    "norway": "oslo",
    "france": "paris",
    "japan": "tokyo",
    "italy": "rome",
    "spain": "madrid",
    "egypt": "cairo",
    "peru": "lima",
    "kenya": "nairobi",
    "chile": "santiago",
    "greece": "athens",
    "canada": "ottawa",
    "poland": "warsaw",
    "cuba": "havana",
    "india": "delhi",
    "china": "beijing",
    "ireland": "dublin",
}
COLORS = ["red", "blue", "green", "black", "white", "gold", "pink", "gray"]


def _addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return f"{a} + {b} =", f" {a + b} ."


def _count(rng: random.Random) -> tuple[str, str]:
    start = rng.randint(0, 90)
    n = rng.randint(4, 8)
    return f"count from {start} :", " " + " ".join(str(start + i) for i in range(n)) + " ."


def _copy(rng: random.Random) -> tuple[str, str]:
    words = [rng.choice(COLORS + NOUNS) for _ in range(rng.randint(2, 5))]
    return f"copy : {' '.join(words)} ->", f" {' '.join(words)} ."


def _fact(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(sorted(CAPITALS))
    return f"the capital of {country} is", f" {CAPITALS[country]} ."


def _sentence(rng: random.Random) -> tuple[str, str]:
    a1, n1, v = rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(VERBS)
    a2, n2 = rng.choice(ADJECTIVES), rng.choice(NOUNS)
    return f"the {a1} {n1} {v}", f" the {a2} {n2} ."


GENERATORS = [_addition, _count, _copy, _fact, _sentence]


def prompt_completion_pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(f"dora_dist-synthetic-{CORPUS_VERSION}-{seed}")
    return [dict(zip(("prompt", "completion"), GENERATORS[i % len(GENERATORS)](rng), strict=True)) for i in range(n)]


def text_examples(n: int, seed: int = 0, lines_per_example: int = 4) -> list[dict]:
    """Each example is a few lines of mixed kinds (so packed blocks mix tasks)."""
    pairs = prompt_completion_pairs(n * lines_per_example, seed)
    rng = random.Random(f"dora_dist-shuffle-{seed}")
    rng.shuffle(pairs)
    out = []
    for i in range(n):
        chunk = pairs[i * lines_per_example : (i + 1) * lines_per_example]
        out.append({"text": "\n".join(p["prompt"] + p["completion"] for p in chunk)})
    return out


def chat_examples(n: int, seed: int = 0) -> list[dict]:
    pairs = prompt_completion_pairs(n, seed)
    out = []
    for i, p in enumerate(pairs):
        messages = [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["completion"].strip()}]
        if i % 3 == 0:
            messages = [{"role": "system", "content": "answer briefly ."}] + messages
        out.append({"messages": messages})
    return out


def tokenizer_training_texts(seed: int = 0) -> list[str]:
    """Text the built-in BPE tokenizer is trained on (covers every word and number of the corpus)."""
    texts = [e["text"] for e in text_examples(3000, seed)]
    texts.append(" ".join(str(i) for i in range(200)))
    texts.append(" ".join(ADJECTIVES + NOUNS + VERBS + COLORS + list(CAPITALS) + list(CAPITALS.values())))
    texts.append("answer briefly . copy count from the capital of is")
    return texts
