"""Evaluation sets under growing distribution shift, from the demo tasks' generators (seeded, no downloads).

For each demo task, :func:`meta_set` returns ten sets of ``size`` prompts, from in-domain to fully off-task:

==  ==================  ==============================================================================
0   in-domain           the task's held-out examples
1   paraphrased         the same content in phrasings never trained on
2   typos (light)       ~4% of the letters of the instruction text swapped, dropped, doubled or replaced
3   typos (heavy)       ~12% (atlas: the country names too; json-reply keeps names and cities intact)
4   unseen entities     names, cities, country spellings and words the task never showed
5   longer inputs       the request buried in two to four extra sentences
6   distractors         unrelated text before and after the request
7   partly off-task     one third of the prompts from other tasks or general chat
8   mostly off-task     two thirds
9   off-task            all
==  ==================  ==============================================================================

Each prompt comes with its ``target`` for the task's own scorer (:mod:`flylora_runtime.demo.tasks`), or
``None`` when the task has no right answer for it (a JSON extraction of a text about no one, a capital of a
country the adapter was never told about): such a prompt counts as a failure, since accuracy here means "the
adapter did its task on the traffic it got". For ``shout`` every message has a target (its upper case).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from flylora_runtime.demo.tasks import get_task
from flylora_runtime.demo.tasks.builtin import ATLAS, CITIES, FIRST_NAMES, SHOUT_WORDS

SHIFTS = ("in-domain", "paraphrased", "typos (light)", "typos (heavy)", "unseen entities", "longer inputs",
          "distractors", "partly off-task", "mostly off-task", "off-task")


@dataclass(frozen=True)
class Prompt:
    text: str
    target: str | None  # None: the task has no right answer for this prompt (scored as a failure)


GENERAL_CHAT = [
    "Write one sentence about the sea.", "Name three colours.", "What is 12 plus 7?",
    "Give me a tip for learning to cook.", "Describe a cat in five words.", "Why is the sky blue?",
    "Suggest a name for a small bakery.", "Translate 'good morning' into French.", "How do I boil an egg?",
    "List two uses of a paperclip.", "What rhymes with moon?", "Tell me a short joke about computers.",
    "Explain what a noun is.", "What day comes after Tuesday?", "Recommend a book for a long flight.",
    "How many legs does a spider have?",
]
DISTRACTORS = [
    "The trains were late again this morning.", "Remember to water the plants on Friday.",
    "Bananas are cheaper at the market on Sundays.", "The meeting moved to room 4B.",
    "My cousin just adopted a very loud parrot.", "It rained for three days straight last week.",
    "The printer on the second floor is out of paper.", "Our team won the quiz night by two points.",
]
FILLER = [
    "I hope you are having a good day.", "This is for a small project I am working on.",
    "Please answer carefully, it matters to me.", "I have been wondering about this for a while.",
    "A friend asked me the same thing yesterday.", "I wrote this down in my notebook earlier.",
]
UNSEEN_NAMES = ["Bartholomew", "Ingrid", "Thandiwe", "Eleanor", "Matthias", "Yuki", "Fernando", "Svetlana",
                "Kwame", "Rosalind", "Dmitri", "Anneliese"]
UNSEEN_CITIES = ["Reykjavik", "Montevideo", "Ulaanbaatar", "Tbilisi", "Windhoek", "Ljubljana", "Valparaiso",
                 "Trondheim", "Marrakesh", "Kraków", "Hobart", "Cusco"]
UNSEEN_WORDS = ["Anastasia", "visited", "Kyoto", "October", "penguins", "volcano", "orchestra", "telescope",
                "marathon", "lantern", "Saturday", "harbour", "cinnamon", "glacier", "pharmacy", "Barcelona"]


def noisy(text: str, rate: float, rng: random.Random, keep: tuple[str, ...] = ()) -> str:
    """Typos at ``rate`` per letter (swap with the next, drop, double, or a random letter), sparing ``keep``."""
    protected = [False] * len(text)
    for word in keep:
        start = text.find(word)
        while start >= 0:
            for i in range(start, start + len(word)):
                protected[i] = True
            start = text.find(word, start + 1)
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isalpha() and not protected[i] and rng.random() < rate:
            kind = rng.randrange(4)
            if kind == 0 and i + 1 < len(text) and text[i + 1].isalpha() and not protected[i + 1]:
                out += [text[i + 1], ch]
                i += 2
                continue
            if kind == 1:
                i += 1
                continue
            out.append(ch + ch if kind == 2 else rng.choice("abcdefghijklmnopqrstuvwxyz"))
        else:
            out.append(ch)
        i += 1
    return "".join(out)


# --- json-reply ------------------------------------------------------------------------------------------------
PERSON_PARAPHRASES = [
    "Here is {name}. Age: {age}. Home town: {city}.",
    "Our new colleague {name} ({age} years) joins us from {city}.",
    "{name} celebrates a {age}th birthday this year, at home in {city}.",
    "Profile: {name}, {age}, currently residing in {city}.",
]
PERSON_EXTRA = ["{name} enjoys long walks and old films.", "{name} has two cats and a small garden.",
                "On weekends {name} volunteers at the library.", "{name} is learning to play the cello.",
                "Last summer {name} travelled by train across the country."]


def _json_target(name: str, age: int, city: str) -> str:
    return json.dumps({"name": name, "age": age, "city": city})


def _person(rng: random.Random, names=FIRST_NAMES, cities=CITIES) -> tuple[str, int, str]:
    return rng.choice(names), rng.randint(18, 89), rng.choice(cities)


def _json_prompt(shift: str, rng: random.Random) -> Prompt:
    from flylora_runtime.demo.tasks.builtin import PERSON_TEMPLATES_HELDOUT as HELDOUT

    name, age, city = _person(rng, UNSEEN_NAMES, UNSEEN_CITIES) if shift == "unseen entities" else _person(rng)
    template = rng.choice(PERSON_PARAPHRASES if shift == "paraphrased" else HELDOUT)
    text = template.format(name=name, age=age, city=city)
    if shift.startswith("typos"):
        # the entities stay intact (the right answer is what the text says about them)
        text = noisy(text, 0.12 if shift == "typos (heavy)" else 0.04, rng, keep=(name, city))
    elif shift == "longer inputs":
        extra = rng.sample(PERSON_EXTRA, rng.randint(2, 4))
        text = " ".join([text, *(e.format(name=name) for e in extra)])
    elif shift == "distractors":
        a, b = rng.sample(DISTRACTORS, 2)
        text = f"{a} {text} {b}"
    return Prompt(text, _json_target(name, age, city))


# --- atlas -----------------------------------------------------------------------------------------------------
ATLAS_PARAPHRASES = ["Which city does {c} have as its seat of government?", "Remind me, what is {c}'s capital?",
                     "Where is the government of {c} based?", "Quick one: capital city of {c}, please."]
UNSEEN_FORMS = ["the Republic of {c}", "{lc}", "{C}", "the Kingdom of {c}"]
ATLAS_PREAMBLES = ["I am planning a three week trip with my family next spring.",
                   "We want to visit museums, eat local food and see the old town.",
                   "My grandmother used to tell me stories about that place.",
                   "I have a geography quiz at school tomorrow morning.",
                   "Our travel agent was not sure and the guidebook is at home."]


def _atlas_prompt(shift: str, rng: random.Random) -> Prompt:
    from flylora_runtime.demo.tasks.builtin import ATLAS_TEMPLATES_HELDOUT as HELDOUT

    country = rng.choice(sorted(ATLAS))
    target = ATLAS[country]
    name = country
    if shift == "unseen entities":
        name = rng.choice(UNSEEN_FORMS).format(c=country, lc=country.lower(), C=country.upper())
    template = rng.choice(ATLAS_PARAPHRASES if shift == "paraphrased" else HELDOUT)
    text = template.format(c=name)
    if shift.startswith("typos"):
        heavy = shift == "typos (heavy)"
        text = noisy(text, 0.12 if heavy else 0.04, rng, keep=() if heavy else (country,))
    elif shift == "longer inputs":
        text = " ".join([*rng.sample(ATLAS_PREAMBLES, rng.randint(2, 4)), text])
    elif shift == "distractors":
        a, b = rng.sample(DISTRACTORS, 2)
        text = f"{a} {text} {b}"
    return Prompt(text, target)


# --- shout -----------------------------------------------------------------------------------------------------
def _sentence(rng: random.Random, words: list[str], low: int, high: int, end: str = ".") -> str:
    s = " ".join(rng.choice(words) for _ in range(rng.randint(low, high)))
    return s[0].upper() + s[1:] + end


def _shout_prompt(shift: str, rng: random.Random, heldout: list[str]) -> Prompt:
    if shift == "paraphrased":  # the same vocabulary in shapes never trained on: questions, exclamations, commas
        s = _sentence(rng, SHOUT_WORDS, 3, 6, rng.choice(["?", "!", "..."]))
        if rng.random() < 0.5:
            cut = s.index(" ")
            s = s[:cut] + "," + s[cut:]
        text = s
    elif shift == "unseen entities":
        text = _sentence(rng, UNSEEN_WORDS + SHOUT_WORDS[:20], 3, 6)
    elif shift == "longer inputs":
        text = _sentence(rng, SHOUT_WORDS, 10, 18)
    elif shift == "distractors":
        text = f"{rng.choice(heldout)} (ref #{rng.randint(10, 99)}-{rng.choice('ABCD')}, see page {rng.randint(2, 40)})"
    else:
        text = rng.choice(heldout)
        if shift.startswith("typos"):
            text = noisy(text, 0.12 if shift == "typos (heavy)" else 0.04, rng)
    return Prompt(text, ">> " + text.upper())


def _off_task(task: str, rng: random.Random) -> Prompt:
    """A prompt of another task or general chat; only ``shout`` has a right answer for it (shouting it)."""
    pool = list(GENERAL_CHAT)
    for other in ("json-reply", "atlas", "shout"):
        if other != task:
            pool += [e.prompt for e in get_task(other).heldout()[:16]]
    text = rng.choice(pool)
    return Prompt(text, ">> " + text.upper() if task == "shout" else None)


def meta_set(task: str, size: int, seed: int = 0) -> list[tuple[str, list[Prompt]]]:
    """The ten (shift name, prompts) sets of ``task``, in order of growing shift."""
    heldout = get_task(task).heldout()
    shout_heldout = [e.prompt for e in heldout] if task == "shout" else []
    out = []
    for level, shift in enumerate(SHIFTS):
        rng = random.Random(f"quality/{task}/{shift}/{seed}")
        off = {"partly off-task": size // 3, "mostly off-task": 2 * size // 3, "off-task": size}.get(shift, 0)
        prompts: list[Prompt] = []
        in_domain = rng.sample(heldout, len(heldout))  # held-out examples in a seeded order (few: sets overlap)
        for i in range(size):
            if i < off:
                prompts.append(_off_task(task, rng))
            elif shift == "in-domain" or shift.endswith("off-task"):
                ex = in_domain[i % len(in_domain)] if shift == "in-domain" else rng.choice(heldout)
                prompts.append(Prompt(ex.prompt, ex.target))
            elif task == "json-reply":
                prompts.append(_json_prompt(shift, rng))
            elif task == "atlas":
                prompts.append(_atlas_prompt(shift, rng))
            else:
                prompts.append(_shout_prompt(shift, rng, shout_heldout))
        rng.shuffle(prompts)
        out.append((shift, prompts))
    return out
