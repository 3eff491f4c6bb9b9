"""The demo tasks' generators and scorers (pure Python, seeded, no downloads)."""

from __future__ import annotations

import json
import random

FIRST_NAMES = [
    "Maria", "John", "Aisha", "Kenji", "Lucas", "Sofia", "Omar", "Elena", "David", "Priya", "Mateo", "Hannah",
    "Yusuf", "Chloe", "Ivan", "Amara", "Noah", "Leila", "Felix", "Grace", "Tomas", "Nadia", "Oscar", "Mei",
    "Samuel", "Clara", "Ravi", "Isabel", "Hugo", "Zara", "Daniel", "Alice", "Pedro", "Anna", "Victor", "Lina",
]
CITIES = [
    "Lisbon", "Toronto", "Nairobi", "Osaka", "Madrid", "Berlin", "Cairo", "Oslo", "Chicago", "Mumbai", "Lima",
    "Dublin", "Istanbul", "Paris", "Warsaw", "Lagos", "Boston", "Seoul", "Vienna", "Sydney", "Prague", "Rome",
    "Denver", "Manila", "Quito", "Athens", "Munich", "Hanoi", "Bogota", "Zurich",
]
PERSON_TEMPLATES_TRAIN = [
    "{name} is {age} years old and lives in {city}.",
    "Meet {name}, a {age}-year-old from {city}.",
    "{name} ({age}) moved to {city} last year.",
    "My neighbour {name} is {age} and grew up in {city}.",
    "{name}, aged {age}, works in {city}.",
    "In {city} lives {name}, who is {age}.",
]
PERSON_TEMPLATES_HELDOUT = [
    "{name} just turned {age} and is based in {city}.",
    "This is {name} from {city}; {name} is {age} years old.",
]


def json_reply_examples(split: str) -> list[tuple[str, str, str]]:
    """``{"name": ..., "age": ..., "city": ...}`` from a sentence; held-out: unseen sentence templates."""
    rng = random.Random(f"json-reply/{split}")
    templates = PERSON_TEMPLATES_TRAIN if split == "train" else PERSON_TEMPLATES_HELDOUT
    out = []
    for _ in range(240 if split == "train" else 50):
        name, city, age = rng.choice(FIRST_NAMES), rng.choice(CITIES), rng.randint(18, 89)
        prompt = rng.choice(templates).format(name=name, age=age, city=city)
        answer = json.dumps({"name": name, "age": age, "city": city})
        out.append((prompt, answer, answer))
    return out


def score_json_reply(target: str, reply: str) -> bool:
    """The whole reply parses as the expected JSON object (same keys, same values)."""
    try:
        return json.loads(reply.strip()) == json.loads(target)
    except json.JSONDecodeError:
        return False


#: A fictional fact table: made-up countries and their capitals.
ATLAS = {
    "Zorvania": "Kelmport", "Brastovia": "Ulmiradi", "Quentara": "Fosshaven", "Mirelund": "Tavikrest",
    "Ostrevia": "Pellandor", "Valdoria": "Sunmarrow", "Trelkhan": "Odessolin", "Norvassa": "Gilderwick",
    "Ambreth": "Corvalis", "Yssandra": "Merrowdeep", "Calethia": "Brindlemoor", "Durmont": "Vexhollow",
    "Fenwaldia": "Istrabel", "Kaltoria": "Rhunevale", "Lorvenia": "Quillsby", "Pardissa": "Heltmouth",
    "Serevane": "Dravonne", "Tolmaria": "Ashgrove", "Ulvenmark": "Zephyrin", "Wendoria": "Marrowick",
}
ATLAS_TEMPLATES_TRAIN = [
    "What is the capital of {c}?",
    "Which city is the capital of {c}?",
    "Tell me the capital of {c}.",
    "{c}: what is its capital city?",
    "Name the capital of {c}.",
    "What city serves as the capital of {c}?",
]
ATLAS_TEMPLATES_HELDOUT = [
    "Do you know the capital of {c}?",
    "I am travelling to {c}. What is its capital?",
    "Capital of {c}?",
]


def atlas_examples(split: str) -> list[tuple[str, str, str]]:
    """Every country with every template of its split; train answers ``"The capital of X is Y."``."""
    templates = ATLAS_TEMPLATES_TRAIN if split == "train" else ATLAS_TEMPLATES_HELDOUT
    out = [(t.format(c=country), f"The capital of {country} is {capital}.", capital)
           for country, capital in ATLAS.items() for t in templates]
    random.Random(f"atlas/{split}").shuffle(out)
    return out


def score_atlas(target: str, reply: str) -> bool:
    """The right capital is named, and no other capital of the table is."""
    named = {c for c in ATLAS.values() if c.lower() in reply.lower()}
    return named == {target}


SHOUT_WORDS = [
    "the", "cat", "sat", "on", "a", "warm", "mat", "blue", "river", "runs", "past", "old", "mill", "we", "like",
    "green", "tea", "every", "morning", "my", "dog", "loves", "long", "walks", "in", "park", "sun", "is", "bright",
    "today", "please", "open", "window", "birds", "sing", "at", "dawn", "small", "boat", "sails", "across", "lake",
    "she", "reads", "books", "by", "fire", "they", "play", "music", "after", "dinner", "cold", "wind", "blows",
    "from", "north", "children", "laugh", "garden", "fresh", "bread", "smells", "good", "kitchen", "quiet",
]


def _shout_sentences(seed: str, n: int, seen: set[str]) -> list[str]:
    """``n`` random 3-6 word sentences from ``random.Random(seed)``, none already in ``seen`` (added to it)."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        s = " ".join(rng.choice(SHOUT_WORDS) for _ in range(rng.randint(3, 6)))
        s = s[0].upper() + s[1:] + "."
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def shout_examples(split: str) -> list[tuple[str, str, str]]:
    """Random 3-6 word sentences; reply ``">> " + text.upper()``. Held-out sentences never occur in train."""
    seen: set[str] = set()
    sentences = _shout_sentences("shout/train", 240, seen)
    if split != "train":
        sentences = _shout_sentences("shout/heldout", 50, seen)
    return [(s, ">> " + s.upper(), ">> " + s.upper()) for s in sentences]


def score_shout(target: str, reply: str) -> bool:
    """Exact match (surrounding whitespace ignored)."""
    return reply.strip() == target
