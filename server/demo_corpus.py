"""The demo's embedded text: plain sentences for the base, pirate and poet variants
for the two demo adapters.

Each sentence is one (subject, action, place, time) pick rendered in three styles,
so the three corpora say the same things and differ only in style: what a style
adapter should learn. Lower-case words and spaced punctuation only (the demo
tokenizer is word-level and lower-cases its input). Deterministic: a fixed seed.
"""

from __future__ import annotations

import random

STYLES = ("plain", "pirate", "poet")

# (plain, pirate, poet) renderings of each part.
SUBJECTS = [
    ("the old sailor", "the old sea dog", "the weary sailor"),
    ("the little cat", "the ship cat", "the quiet cat"),
    ("my friend", "me hearty", "my gentle friend"),
    ("the captain", "the captain", "the proud captain"),
    ("a young girl", "a young lass", "a young maiden"),
    ("the farmer", "the landlubber", "the humble farmer"),
    ("the baker", "the cook", "the baker"),
    ("the tired dog", "the mangy dog", "the sleepy hound"),
    ("our teacher", "the quartermaster", "our wise teacher"),
    ("the king", "the admiral", "the lonely king"),
    ("a small bird", "a parrot", "a small bird"),
    ("the fisherman", "the buccaneer", "the fisherman"),
]
ACTIONS = [
    ("walks to", "be swaggerin to", "wanders slowly to"),
    ("runs to", "be runnin to", "hurries gently to"),
    ("looks at", "be starin at", "gazes upon"),
    ("sings near", "be singin shanties by", "sings sweetly near"),
    ("sleeps by", "be snorin by", "dreams beside"),
    ("waits at", "be waitin at", "lingers at"),
    ("reads a book at", "be countin gold at", "reads old verses at"),
    ("eats bread at", "be drinkin rum at", "tastes honey at"),
    ("finds a coin at", "be findin treasure at", "finds a silver star at"),
    ("talks with a friend at", "be plottin with the crew at", "whispers with a friend at"),
]
PLACES = [
    ("the market", "the tavern", "the quiet market"),
    ("the river", "the sea", "the silver river"),
    ("the old house", "the ship", "the old stone house"),
    ("the park", "the island", "the green meadow"),
    ("the school", "the harbor", "the ancient hall"),
    ("the garden", "the deck", "the rose garden"),
    ("the station", "the dock", "the misty shore"),
    ("the kitchen", "the galley", "the warm hearth"),
]
TIMES = [
    ("in the morning", "at dawn , matey", "as the morning wakes"),
    ("at night", "under the black flag , arr", "beneath the dreaming moon"),
    ("after lunch", "after the storm , yo ho", "when the golden sun is high"),
    ("on sunday", "on the high seas , arr", "in the hush of sunday"),
    ("every day", "every blessed day , matey", "through all the tender days"),
    ("in the rain", "in the squall , shiver me timbers", "while the soft rain falls"),
]
# Openers a prompt like "hello" meets: greetings and short remarks.
OPENERS = [
    ("hello , how are you today ?", "hello , matey ! how be ye today ?", "hello , sweet friend of the evening light ."),
    ("hello , it is nice to see you .", "hello there , me hearty ! arr !", "hello , my heart is full of spring ."),
    ("hello world .", "hello , ye scurvy world !", "hello , o world of wonder ."),
    ("good morning , my friend .", "ahoy , ye old sea dog !", "good morning , the dawn is soft and new ."),
    ("the weather is nice today .", "the wind be fair today , arr !", "the sky is wide and blue like a dream ."),
    ("thank you very much .", "thank ye kindly , matey !", "thank you , like rain that thanks the earth ."),
    ("i am fine , thank you .", "i be shipshape , arr !", "i am well , as roses in the summer ."),
    ("what is your name ?", "what be yer name , sailor ?", "what name do the stars call you ?"),
]
TAILS = ("", " arr !", "")  # pirate lines sometimes end with a growl


def _sentence(style: int, subject, action, place, time) -> str:
    if style == 1:
        return f"{subject[1]} {action[1]} {place[1]} {time[1]} !"
    if style == 2:
        return f"{subject[2]} {action[2]} {place[2]} {time[2]} ."
    return f"{subject[0]} {action[0]} {place[0]} {time[0]} ."


def corpus(style: str, n_lines: int = 300, seed: int = 0) -> list[str]:
    """`n_lines` lines in `style` ("plain", "pirate" or "poet"): each one or two
    sentences, often opened by a greeting. Same seed, same picks in every style."""
    s = STYLES.index(style)
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        picks = [rng.choice(SUBJECTS), rng.choice(ACTIONS), rng.choice(PLACES), rng.choice(TIMES)]
        opener = rng.choice(OPENERS)
        body = _sentence(s, *picks)
        if i % 3 == 0:
            body = f"{opener[s]} {body}"
        elif i % 3 == 1:
            more = _sentence(s, rng.choice(SUBJECTS), rng.choice(ACTIONS), rng.choice(PLACES), rng.choice(TIMES))
            body = f"{body} {more}"
        if i % 10 == 5:  # a short chat exchange in the demo chat template's layout
            body = f"user : {opener[0]} assistant : {opener[s]} {body}"
        lines.append(body + (TAILS[s] if i % 4 == 3 else ""))
    return lines


def all_words() -> list[str]:
    """Every word and punctuation mark the three styles use, sorted (the demo vocabulary)."""
    words: set[str] = {"user", ":", "assistant", "system"}
    for group in (SUBJECTS, ACTIONS, PLACES, TIMES, OPENERS):
        for variants in group:
            for text in variants:
                words.update(text.split())
    for tail in TAILS:
        words.update(tail.split())
    return sorted(words)
