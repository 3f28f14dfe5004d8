"""A deterministic synthetic data set written in the MIntRec layout.

``write_synthetic_mintrec(out_dir, seed=0)`` writes ``train.tsv``, ``dev.tsv``,
``test.tsv`` (columns season, episode, clip, text, label; keys
``season_episode_clip``; the 20 real MIntRec intents) and ``video_feats.pkl`` /
``audio_feats.pkl`` (dict key -> float32 array (T, 256) / (T, 768), some stored
(T, 1, D) as in the real pickles, variable numbers of real frames, some longer
than the padded length, some already zero-padded). ``mvcl_fast.intent.data.load_split``
reads it exactly as it reads the real benchmark.

What makes it a test of multimodal fusion:
- Text: real English utterances, 10-12 templates per intent with slot fillers.
  A share (``ambiguous_fraction``) of utterances is replaced by a short
  ambiguous reply ("Oh, really.", "Okay.", "Fine." ...) that several intents
  share, so their intent is only recoverable from video and audio.
- Video / audio: each real frame is ``amplitude * envelope_t * u_c + noise``
  (u_c a fixed random unit direction per class and modality, the amplitude
  random per utterance, the envelope rising and falling over the clip), plus a
  per-utterance nuisance offset. A modality carries the signal only in a share
  of utterances (``INFORMATIVE``: the face is off screen, the voice flat); in
  those it identifies the intent reliably.
- Class mix: long-tailed (Zipf-like, head/tail ratio about 11 for 20 classes)
  when ``long_tail=True``, the same mix in every split.

Linear probes on the default set (seeds 0-2, 400 test utterances; logistic
regression on frame-mean-pooled features and on frozen all-MiniLM-L6-v2
sentence embeddings) are right on: text alone 70-74% (the ambiguous replies
cap it), video alone 69-74%, audio alone 71-74%, video+audio 87-89%,
text+video+audio 91-93%. (How MVCL-DAF++ itself, with a fine-tuned text
encoder, scores on it is measured by the trainer, not here.)

``write_synthetic_mintrec2(out_dir, seed=0)`` writes the same kind of set in
the MIntRec2.0 release layout (``in-scope/`` with the 30 intents, keys
``dia{d}_utt{u}``, ``video_data/swin_roi_binary.pkl`` and
``audio_data/wavlm_feats_binary.pkl``; ``out-of-scope/MIntRec2.0-OOD/`` with
utterances labelled UNK: off-topic talk whose informative frames lie along
directions of their own), for the open-intent protocol's tests and demos.

Same seed and arguments -> the same bytes (numpy's PCG64 streams, pickle
protocol 4, fixed key order).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np

from mvcl_fast.intent.data import DATASETS, MINTREC2_OOS_FOLDER, OOS_LABEL, SYNTHETIC_META

FORMAT_VERSION = 1
# where the trainer writes the set when no --data-dir is given (relative to the working folder)
DEFAULT_CACHE = Path(".cache") / "synthetic-mintrec"
LABELS = DATASETS["mintrec"].labels
# thuiar/MIntRec's feature widths (ResNet ROI video, wav2vec 2.0 audio).
VIDEO_DIM = 256
AUDIO_DIM = 768

DEFAULTS = dict(
    seed=0, n_train=1000, n_dev=250, n_test=400, video_len=32, audio_len=48,
    ambiguous_fraction=0.35, long_tail=True,
)
# A tiny version for tests (writes in well under a second).
TINY = dict(n_train=60, n_dev=20, n_test=20, video_len=8, audio_len=12)
# The MIntRec2.0 layout's out-of-scope part (write_synthetic_mintrec2): utterances per split,
# about the release's share (5,736 OOS beside 9,304 in-scope utterances).
MINTREC2_DEFAULTS = dict(n_oos_train=600, n_oos_dev=150, n_oos_test=250)
TINY2 = dict(TINY, n_oos_train=24, n_oos_dev=10, n_oos_test=10)

# Feature signal (see the module docstring): the share of utterances in which a
# modality carries the intent, the per-frame signal along the class direction
# (in units of the per-dimension noise), and the per-utterance offset.
INFORMATIVE = 0.7
AMPLITUDE = (2.0, 6.0)
FRAME_NOISE = 1.0
NUISANCE = 0.3

SLOTS = {
    "name": ["Sarah", "Mike", "Dina", "Jonah", "Amy", "Glenn", "Cheyenne", "Garrett", "Mateo",
             "Sandra", "Jeff", "Carol", "Marcus", "Kelly", "Justine", "Bo", "Nico", "Adam"],
    "thing": ["the report", "the schedule", "the new display", "the price tags", "the inventory list",
              "the cake", "the car", "the photos", "the presentation", "the flyers", "the coupons",
              "the cash register", "the delivery", "the spreadsheet", "the signs"],
    "place": ["the break room", "the stockroom", "the parking lot", "aisle five", "the pharmacy",
              "the garden center", "the front desk", "the cafe", "the office", "the loading dock",
              "the electronics section", "the checkout"],
    "time": ["tonight", "tomorrow morning", "this afternoon", "on Friday", "next week", "at noon",
             "after lunch", "before closing", "on Monday", "in ten minutes"],
    "task": ["restock the shelves", "clean the floor", "count the registers", "fold the towels",
             "unload the truck", "fix the printer", "cover my shift", "call the supplier",
             "finish the paperwork", "set up the display", "check the prices", "water the plants"],
    "food": ["pizza", "tacos", "donuts", "sandwiches", "coffee", "pancakes", "sushi", "cookies"],
}

TEMPLATES = {
    "Complain": [
        "I can't believe I have to {task} again, this is so unfair.",
        "Why am I always the one who gets stuck in {place}?",
        "This is the third time {thing} broke this week, I'm sick of it.",
        "Nobody ever listens to me around here.",
        "Ugh, my feet are killing me and we still have to {task}.",
        "It's freezing in {place} and nobody will fix the heater.",
        "I've been waiting forever and {name} still hasn't shown up.",
        "Seriously, who keeps leaving a mess in {place}?",
        "I'm so tired of doing everyone else's work.",
        "The {food} in the break room is always gone before I get any.",
        "This job is exhausting and the pay is terrible.",
    ],
    "Praise": [
        "{name}, you did an amazing job on {thing}.",
        "Wow, this looks fantastic, great work!",
        "You are honestly the best manager we've ever had.",
        "That was brilliant, {name}, really well done.",
        "I love what you did with {thing}, it's perfect.",
        "You handled that customer so gracefully.",
        "Your idea saved us a ton of time, thank goodness for you.",
        "Nice job on {thing}, it looks really professional.",
        "You're a natural at this, {name}.",
        "That presentation was incredible, everyone loved it.",
        "You always know exactly what to say.",
    ],
    "Apologise": [
        "I'm so sorry, {name}, I didn't mean to do that.",
        "Sorry I'm late, the bus broke down.",
        "I apologize for messing up {thing}.",
        "Sorry, that was completely my fault.",
        "I'm really sorry about what I said earlier.",
        "Forgive me, I forgot to {task}.",
        "My bad, I thought you were someone else.",
        "I owe you an apology for yesterday.",
        "Sorry for yelling at you in {place}.",
        "I'm sorry, I should have told you sooner.",
    ],
    "Thank": [
        "Thank you so much for helping me {task}, {name}.",
        "Thanks for covering for me {time}.",
        "I really appreciate you bringing {food}.",
        "Thank you, that means a lot to me.",
        "Thanks a lot for fixing {thing}.",
        "I can't thank you enough, {name}.",
        "Thanks for the ride, I owe you one.",
        "Thank you for listening to me.",
        "Thanks for saving me a seat in {place}.",
        "I'm so grateful you came, thank you.",
    ],
    "Criticize": [
        "{name}, you did {thing} completely wrong.",
        "That's a terrible idea and you know it.",
        "You never finish anything you start.",
        "This is sloppy work, you need to redo {thing}.",
        "You were rude to that customer and it was unacceptable.",
        "Honestly, your plan makes no sense at all.",
        "You should have checked {thing} before sending it.",
        "You left {place} a disaster again.",
        "That was a really selfish thing to do, {name}.",
        "Your attitude is dragging the whole team down.",
    ],
    "Care": [
        "Are you feeling okay, {name}? You look pale.",
        "Did you get any sleep last night?",
        "Make sure you eat something before your shift.",
        "How is your mom doing after the surgery?",
        "Be careful, the floor in {place} is wet.",
        "Do you need me to drive you home {time}?",
        "You should sit down and rest for a minute.",
        "Is everything alright at home, {name}?",
        "Put on a jacket, it's cold outside.",
        "Drink some water, you've been working all day.",
    ],
    "Agree": [
        "Yes, I totally agree with you, {name}.",
        "You're absolutely right about {thing}.",
        "That's exactly what I was thinking.",
        "Sure, let's do it your way.",
        "I couldn't agree more.",
        "Yeah, that makes a lot of sense.",
        "Definitely, we should {task} first.",
        "Good point, I'm with you on that.",
        "Sounds good to me, count me in.",
        "Yes, that's the right call.",
    ],
    "Taunt": [
        "Oh, look who finally decided to show up.",
        "Nice try, {name}, maybe next time.",
        "Wow, you really outdid yourself breaking {thing}.",
        "Did you get lost on the way to {place} again?",
        "Bet you can't {task} without asking for help.",
        "Cute outfit, did your grandma pick it out?",
        "Congratulations on being the slowest cashier in the store.",
        "Aw, is the big boss upset?",
        "Go ahead, cry about it.",
        "I guess some people just aren't cut out for this.",
    ],
    "Flaunt": [
        "I sold more than anyone else this month, obviously.",
        "Check out my new car, it cost a fortune.",
        "I got employee of the month again, no big deal.",
        "My boyfriend is taking me to Paris {time}.",
        "I finished {thing} in ten minutes, beat that.",
        "I'm basically the smartest person in this store.",
        "Everyone says I have the best taste in {place}.",
        "I just got promoted, so I'm kind of your boss now.",
        "I can {task} with my eyes closed.",
        "My new watch is real gold, by the way.",
    ],
    "Joke": [
        "Why did the shopping cart go to therapy? It had too many issues.",
        "I'd tell you a joke about {food}, but it's too cheesy.",
        "If I had a dollar for every time {name} was late, I could retire.",
        "My plan for {time} is to become a professional napper.",
        "I'm not lazy, I'm in energy saving mode.",
        "The printer and I have an understanding, we both hate Mondays.",
        "I'm on a seafood diet, I see food and I eat it.",
        "Maybe {thing} is just shy and doesn't want to work.",
        "I told {name} a joke about the stockroom, it was a bit dusty.",
        "Knock knock, it's the manager, nobody panic.",
    ],
    "Oppose": [
        "No way, I'm not going to {task}.",
        "I don't think that's a good idea, {name}.",
        "Absolutely not, we can't change {thing} now.",
        "I disagree, that won't work at all.",
        "No, we should not move everything to {place}.",
        "I'm against it, it's way too risky.",
        "That's not fair and I won't accept it.",
        "No, I refuse to work {time}.",
        "I don't agree with your decision.",
        "We are not doing it like that.",
    ],
    "Comfort": [
        "Don't worry, {name}, everything will be fine.",
        "It's not your fault, you did your best.",
        "Hey, it's okay to cry, I'm here for you.",
        "You'll get through this, I promise.",
        "Don't be so hard on yourself.",
        "It's going to be alright, take a deep breath.",
        "Everyone makes mistakes, forget about {thing}.",
        "I'm sure you'll find another job soon.",
        "Cheer up, tomorrow will be better.",
        "We're all on your side, {name}.",
    ],
    "Inform": [
        "The meeting has been moved to {time}.",
        "{name} called in sick today.",
        "The delivery truck is waiting in {place}.",
        "We're out of {food} in the break room.",
        "The store closes early {time}.",
        "Corporate is sending an inspector {time}.",
        "{thing} is on the desk in {place}.",
        "The registers were short twenty dollars last night.",
        "There's a customer waiting at {place}.",
        "I just heard that {name} is getting transferred.",
        "The new uniforms arrived this morning.",
    ],
    "Advise": [
        "You should talk to {name} before you decide.",
        "If I were you, I'd {task} first.",
        "Maybe try being nicer to the customers.",
        "You'd better double check {thing}.",
        "I think you should ask for a raise.",
        "Take a break, you'll think more clearly.",
        "My advice is to stay away from {place} today.",
        "You should write everything down so you don't forget.",
        "It might help to apologize to {name}.",
        "Try turning {thing} off and on again.",
    ],
    "Arrange": [
        "Let's meet in {place} {time}.",
        "{name}, you take the register and I'll {task}.",
        "I'll put you on the schedule for {time}.",
        "Can we set up the meeting for {time}?",
        "You two handle {place}, the rest of us will {task}.",
        "Let's split the work, I'll do {thing} and you do the rest.",
        "We'll have the party in {place} {time}.",
        "Put the boxes in {place} and we'll sort them later.",
        "I booked a table for six {time}.",
        "Everybody meet at the front {time} for the briefing.",
    ],
    "Introduce": [
        "Everyone, this is {name}, our new team member.",
        "Hi, I'm {name}, I just started here.",
        "Let me introduce you to my friend {name}.",
        "This is my sister, she's visiting from Chicago.",
        "Meet {name}, the new assistant manager.",
        "I'd like you all to welcome {name} to the store.",
        "{name}, this is the guy I told you about.",
        "Hello, my name is {name} and I'll be your trainer.",
        "Guys, meet my boyfriend.",
        "This is {name}, he works in {place}.",
    ],
    "Leave": [
        "I have to go now, see you {time}.",
        "I'm heading out, bye everyone.",
        "Okay, I'm leaving, don't wait for me.",
        "I gotta run, {name}, talk later.",
        "My shift is over, I'm out of here.",
        "I'm going home, goodnight.",
        "I'll be in {place} if anyone needs me, bye.",
        "Time for me to go, see you around.",
        "I'm off to lunch, back in an hour.",
        "Well, I should get going.",
    ],
    "Prevent": [
        "Stop, don't touch {thing}!",
        "Wait, don't go into {place}.",
        "No no no, put that down right now.",
        "Don't tell {name} about this.",
        "Hold on, don't open that door.",
        "Don't even think about leaving early.",
        "Stop right there, you can't {task} like that.",
        "Don't eat the {food}, it's for the party.",
        "Careful, don't drop {thing}!",
        "Stop him before he talks to the manager.",
    ],
    "Greet": [
        "Hi {name}, good morning!",
        "Hey everyone, how's it going?",
        "Hello, welcome to the store.",
        "Good morning, {name}, nice to see you.",
        "Hey, long time no see!",
        "Hi there, how are you doing today?",
        "Morning, everybody.",
        "Hey {name}, what's up?",
        "Good afternoon, how can I help you?",
        "Hello again, {name}.",
    ],
    "Ask for help": [
        "Can you help me {task}, {name}?",
        "Could someone give me a hand with {thing}?",
        "I need help carrying these boxes to {place}.",
        "{name}, can you show me how {thing} works?",
        "Please help me, I don't know what to do.",
        "Would you mind covering my shift {time}?",
        "Can anybody help me find {thing}?",
        "I'm stuck, could you help me out?",
        "Can you help me {task} before the manager comes?",
        "Could you lend me a hand in {place}?",
    ],
}

# Short replies whose intent lies in the voice and face, not the words. Each
# intent uses a fixed subset, so every reply is shared by several intents.
AMBIGUOUS = [
    "Oh, really.", "Okay.", "Look at that.", "Fine.", "Well, well.", "Right.", "Yeah.",
    "Hmm.", "Is that so?", "Wow.", "Sure.", "Oh.", "Alright then.", "Whatever you say.",
    "Here we go.", "Uh-huh.", "No.", "Seriously?", "Come on.", "Huh.",
]
AMBIGUOUS_PER_INTENT = 10

# The MIntRec2.0 intents MIntRec lacks (the other 20 share MIntRec's templates).
TEMPLATES2 = {
    "Acknowledge": [
        "Okay, got it, {name}.", "Right, I hear you.", "Alright, noted, I'll keep that in mind.",
        "I see what you mean about {thing}.", "Yes, I understand.", "Fair enough, thanks for telling me.",
    ],
    "Asking for opinions": [
        "What do you think about {thing}, {name}?", "Do you like how {place} looks now?",
        "Should we {task} first or later?", "Be honest, is this a good idea?",
        "Which one would you pick?", "How do you feel about working {time}?",
    ],
    "Confirm": [
        "So we're meeting in {place} {time}, right?", "Just to be sure, you said {thing}?",
        "Yes, that's correct.", "Did you already {task}?", "You mean the one in {place}?",
        "So it's settled, then?",
    ],
    "Doubt": [
        "Are you sure that's going to work?", "I don't know, {name}, that sounds off.",
        "Really? I'm not convinced.", "I doubt {thing} will be ready {time}.",
        "That can't be right, can it?", "Hmm, I'm not so sure about that.",
    ],
    "Emphasize": [
        "I really mean it, {name}, this is important.", "Listen, we have to {task} {time}.",
        "I'm telling you, {thing} is the problem.", "This is the most important part, trust me.",
        "No, I mean it, absolutely nobody goes into {place}.", "I cannot stress this enough.",
    ],
    "Explain": [
        "The reason {thing} broke is that nobody checked it.",
        "It's because the truck came late, so we couldn't {task}.",
        "Let me explain how {thing} works.", "I was late because the bus broke down.",
        "See, the manager changed the schedule, that's why.",
        "The problem is that {place} is too small.",
    ],
    "Invite": [
        "Do you want to grab {food} with us {time}?", "Come to my party {time}, {name}!",
        "You should join us in {place} after work.", "Would you like to come over for dinner?",
        "We're going bowling {time}, want to come?", "Why don't you sit with us?",
    ],
    "Plan": [
        "Tomorrow we'll {task} first and then clean {place}.",
        "Let's plan to meet in {place} {time}.", "Here's the plan: I {task}, you handle {thing}.",
        "Next week I'm going to ask for a raise.", "We should figure out the schedule for {time}.",
        "First we finish {thing}, then we leave.",
    ],
    "Refuse": [
        "No, I'm not going to {task}.", "Sorry, I can't help you {time}.",
        "No way, I won't do it.", "I'd rather not, {name}.", "Absolutely not, forget it.",
        "I'm not lending you {thing} again.",
    ],
    "Warn": [
        "Watch out, the floor in {place} is slippery!", "Careful, {thing} is about to fall.",
        "If you do that again, you're fired.", "Don't touch that, it's hot!",
        "Be careful, the manager is in a bad mood {time}.", "Look out behind you!",
    ],
}

# Out-of-scope utterances of the MIntRec2.0 layout: talk with none of the 30 intents.
OOS_TEMPLATES = [
    "My cousin collects old stamps from {place}.", "The weather channel said it might snow {time}.",
    "I read somewhere that octopuses have three hearts.", "There was a documentary about bees on last night.",
    "My neighbor's dog barks at the mailman every day.", "The train was packed this morning.",
    "I once saw a movie about a talking car.", "My grandmother grew up on a farm.",
    "Some people put pineapple on {food}.", "The radio was playing old songs all day.",
    "There's a new bakery near {place}.", "I've been watching a show about space.",
]
OOS_DIRECTIONS = 3   # feature directions of the out-of-scope clips (none an intent's)
MINTREC2_HEADER = ["dialogue_id", "utterance_id", "text", "label", "start", "end", "season",
                   "speaker"]
SPEAKERS = ("Amy", "Jonah", "Glenn", "Dina", "Cheyenne", "Garrett", "Sandra", "Mateo")
# An assumed head-to-tail order of the 30 intents for the long tail (not the release's counts).
MINTREC2_FREQUENCY_ORDER = (
    "Inform", "Explain", "Acknowledge", "Doubt", "Agree", "Confirm", "Complain",
    "Asking for opinions", "Emphasize", "Oppose", "Praise", "Criticize", "Refuse", "Advise",
    "Apologise", "Taunt", "Thank", "Ask for help", "Joke", "Arrange", "Plan", "Care", "Invite",
    "Greet", "Comfort", "Leave", "Warn", "Introduce", "Prevent", "Flaunt",
)

# MIntRec-like frequency order (head first) used for the long tail.
FREQUENCY_ORDER = (
    "Inform", "Complain", "Praise", "Agree", "Apologise", "Thank", "Advise", "Arrange",
    "Criticize", "Care", "Oppose", "Taunt", "Comfort", "Joke", "Leave", "Ask for help",
    "Greet", "Prevent", "Flaunt", "Introduce",
)
ZIPF_EXPONENT = 0.8


def class_shares(long_tail: bool, labels=LABELS, order=FREQUENCY_ORDER) -> np.ndarray:
    """Share of each label (in labels' order); long_tail: Zipf-like by its rank in order."""
    if not long_tail:
        return np.full(len(labels), 1.0 / len(labels))
    rank = np.array([order.index(name) for name in labels])
    w = (rank + 1.0) ** -ZIPF_EXPONENT
    return w / w.sum()


def _split_counts(n: int, shares: np.ndarray) -> np.ndarray:
    """Exact per-class counts summing to n (largest remainder), every class >= 1 when n allows."""
    raw = shares * n
    counts = np.floor(raw).astype(int)
    if n >= len(shares):
        counts = np.maximum(counts, 1)
    while counts.sum() > n:
        counts[np.argmax(counts)] -= 1
    order = np.argsort(-(raw - np.floor(raw)), kind="stable")
    i = 0
    while counts.sum() < n:
        counts[order[i % len(order)]] += 1
        i += 1
    return counts


def _fill(template: str, rng: np.random.Generator) -> str:
    slots = {k: v[rng.integers(len(v))] for k, v in SLOTS.items() if "{" + k + "}" in template}
    text = template.format(**slots)
    return text[0].upper() + text[1:]


def _frames(rng, n_frames: int, stored_len: int, direction: np.ndarray, amplitude: float,
            nuisance: np.ndarray) -> np.ndarray:
    dim = direction.shape[0]
    x = rng.standard_normal((n_frames, dim), dtype=np.float32) * FRAME_NOISE
    # Class signal rises and falls over the clip (as an expression or an intonation does).
    envelope = 0.5 + np.sin(np.linspace(0.0, np.pi, n_frames, dtype=np.float32))
    x += (amplitude * envelope)[:, None] * direction[None, :]
    x += nuisance[None, :]
    if stored_len > n_frames:  # stored already zero-padded, as some real pickles are
        x = np.concatenate([x, np.zeros((stored_len - n_frames, dim), np.float32)])
    return x.astype(np.float32)


def _unit_directions(rng, n: int, dim: int) -> np.ndarray:
    d = rng.standard_normal((n, dim))
    return (d / np.linalg.norm(d, axis=1, keepdims=True)).astype(np.float32)


def _utterance(rng, templates: list[str], replies) -> str:
    """A templated utterance, or (replies: the intent's ambiguous reply ids) an ambiguous reply."""
    if replies is not None:
        return AMBIGUOUS[replies[rng.integers(AMBIGUOUS_PER_INTENT)]]
    return _fill(templates[rng.integers(len(templates))], rng)


def _clip_frames(rng, direction: np.ndarray, max_len: int, clip: int) -> np.ndarray:
    """One clip's frames of a modality, its signal (if informative) along direction."""
    dim = direction.shape[0]
    # Mostly shorter than the padded length; 1 in 10 longer (truncated on load).
    if rng.random() < 0.1:
        n_frames = int(rng.integers(max_len + 1, max_len + max(2, max_len // 4) + 1))
    else:
        n_frames = int(rng.integers(max(1, max_len // 4), max_len + 1))
    stored = n_frames
    if n_frames < max_len and rng.random() < 0.2:
        stored = max_len
    informative = rng.random() < INFORMATIVE
    amplitude = float(rng.uniform(*AMPLITUDE)) if informative else 0.0
    nuisance = (rng.standard_normal(dim, dtype=np.float32) * NUISANCE).astype(np.float32)
    x = _frames(rng, n_frames, stored, direction, amplitude, nuisance)
    # Both real pickle layouts occur: (T, D) and (T, 1, D).
    return x[:, None, :] if clip % 3 == 0 else x


def _write_tsv(path: Path, header: list[str], rows: list[tuple]) -> None:
    buf = io.StringIO()
    # Written as the loader reads it: no quoting (a tab in a text would be an error).
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_NONE,
                        quotechar=None)
    writer.writerow(header)
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(buf.getvalue(), encoding="utf-8")


def _write_pickles(folder: Path, *named_feats: tuple[str, dict]) -> None:
    for name, feats in named_feats:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        with open(folder / name, "wb") as f:
            pickle.dump(feats, f, protocol=4)


def write_synthetic_mintrec(out_dir: str | os.PathLike, *, seed: int = DEFAULTS["seed"],
                            n_train: int = DEFAULTS["n_train"], n_dev: int = DEFAULTS["n_dev"],
                            n_test: int = DEFAULTS["n_test"],
                            video_len: int = DEFAULTS["video_len"],
                            audio_len: int = DEFAULTS["audio_len"],
                            ambiguous_fraction: float = DEFAULTS["ambiguous_fraction"],
                            long_tail: bool = DEFAULTS["long_tail"]) -> Path:
    """Write the synthetic set into ``out_dir`` (created if needed) and return it."""
    for name, v in (("n_train", n_train), ("n_dev", n_dev), ("n_test", n_test),
                    ("video_len", video_len), ("audio_len", audio_len)):
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if not 0.0 <= ambiguous_fraction <= 1.0:
        raise ValueError(f"ambiguous_fraction must be in [0, 1], got {ambiguous_fraction}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # Fixed structure from the seed: feature directions and each intent's ambiguous replies.
    structure = np.random.default_rng([seed, 0])
    video_dirs = _unit_directions(structure, len(LABELS), VIDEO_DIM)
    audio_dirs = _unit_directions(structure, len(LABELS), AUDIO_DIM)
    replies = [structure.choice(len(AMBIGUOUS), AMBIGUOUS_PER_INTENT, replace=False)
               for _ in LABELS]

    shares = class_shares(long_tail)
    video_feats: dict[str, np.ndarray] = {}
    audio_feats: dict[str, np.ndarray] = {}
    clip = 0
    for split_id, (split, n) in enumerate((("train", n_train), ("dev", n_dev), ("test", n_test))):
        rng = np.random.default_rng([seed, 1 + split_id])
        labels = np.repeat(np.arange(len(LABELS)), _split_counts(n, shares))
        rng.shuffle(labels)
        ambiguous = np.zeros(n, dtype=bool)
        ambiguous[rng.permutation(n)[:int(round(ambiguous_fraction * n))]] = True
        rows = []
        for i, label in enumerate(labels):
            name = LABELS[label]
            text = _utterance(rng, TEMPLATES[name], replies[label] if ambiguous[i] else None)
            clip += 1
            season, episode = 1 + clip % 6, 1 + (clip // 6) % 22
            key_parts = (f"S{season:02d}", f"E{episode:02d}", str(clip))
            key = "_".join(key_parts)
            rows.append((*key_parts, text, name))
            video_feats[key] = _clip_frames(rng, video_dirs[label], video_len, clip)
            audio_feats[key] = _clip_frames(rng, audio_dirs[label], audio_len, clip)
        _write_tsv(out / f"{split}.tsv", ["season", "episode", "clip", "text", "label"], rows)

    _write_pickles(out, ("video_feats.pkl", video_feats), ("audio_feats.pkl", audio_feats))
    meta = dict(format_version=FORMAT_VERSION, seed=seed, n_train=n_train, n_dev=n_dev,
                n_test=n_test, video_len=video_len, audio_len=audio_len,
                ambiguous_fraction=ambiguous_fraction, long_tail=long_tail)
    (out / SYNTHETIC_META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return out


def write_synthetic_mintrec2(out_dir: str | os.PathLike, *, seed: int = DEFAULTS["seed"],
                             n_train: int = DEFAULTS["n_train"], n_dev: int = DEFAULTS["n_dev"],
                             n_test: int = DEFAULTS["n_test"],
                             n_oos_train: int = MINTREC2_DEFAULTS["n_oos_train"],
                             n_oos_dev: int = MINTREC2_DEFAULTS["n_oos_dev"],
                             n_oos_test: int = MINTREC2_DEFAULTS["n_oos_test"],
                             video_len: int = DEFAULTS["video_len"],
                             audio_len: int = DEFAULTS["audio_len"],
                             ambiguous_fraction: float = DEFAULTS["ambiguous_fraction"],
                             long_tail: bool = DEFAULTS["long_tail"]) -> Path:
    """Write a synthetic set in the MIntRec2.0 release layout into ``out_dir``: ``in-scope/``
    (30 intents) and ``out-of-scope/MIntRec2.0-OOD/`` (label UNK), each with its TSVs, its
    ``video_data/swin_roi_binary.pkl``, ``audio_data/wavlm_feats_binary.pkl`` and
    synthetic.json. Out-of-scope clips are off-topic talk (their own templates, and the
    ambiguous replies at the same share) whose informative frames lie along directions of
    their own, so the features tell them apart from every intent. Not a benchmark: a
    test bed for the open-intent protocol's code."""
    counts = dict(n_train=n_train, n_dev=n_dev, n_test=n_test, n_oos_train=n_oos_train,
                  n_oos_dev=n_oos_dev, n_oos_test=n_oos_test, video_len=video_len,
                  audio_len=audio_len)
    for name, v in counts.items():
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if not 0.0 <= ambiguous_fraction <= 1.0:
        raise ValueError(f"ambiguous_fraction must be in [0, 1], got {ambiguous_fraction}")
    out = Path(out_dir)
    labels = DATASETS["mintrec2"].labels
    templates = [{**TEMPLATES, **TEMPLATES2}[name] for name in labels] + [OOS_TEMPLATES]
    structure = np.random.default_rng([seed, 0])
    # Rows 0-29 the intents', 30.. the out-of-scope clips' directions.
    video_dirs = _unit_directions(structure, len(labels) + OOS_DIRECTIONS, VIDEO_DIM)
    audio_dirs = _unit_directions(structure, len(labels) + OOS_DIRECTIONS, AUDIO_DIM)
    replies = [structure.choice(len(AMBIGUOUS), AMBIGUOUS_PER_INTENT, replace=False)
               for _ in range(len(labels) + 1)]
    shares = class_shares(long_tail, labels, MINTREC2_FREQUENCY_ORDER)
    meta = dict(format_version=FORMAT_VERSION, dataset="mintrec2", seed=seed,
                ambiguous_fraction=ambiguous_fraction, long_tail=long_tail, **counts)
    clip = 0
    for part, folder in enumerate(("in-scope", MINTREC2_OOS_FOLDER)):
        video_feats: dict[str, np.ndarray] = {}
        audio_feats: dict[str, np.ndarray] = {}
        for split_id, split in enumerate(("train", "dev", "test")):
            n = counts[("n_oos_" if part else "n_") + split]
            rng = np.random.default_rng([seed, 1 + split_id + 3 * part])
            if part:   # UNK: one of the out-of-scope directions per clip
                ids = np.full(n, len(labels))
                directions = len(labels) + rng.integers(OOS_DIRECTIONS, size=n)
            else:
                ids = np.repeat(np.arange(len(labels)), _split_counts(n, shares))
                rng.shuffle(ids)
                directions = ids
            ambiguous = np.zeros(n, dtype=bool)
            ambiguous[rng.permutation(n)[:int(round(ambiguous_fraction * n))]] = True
            rows = []
            for i, (label, direction) in enumerate(zip(ids, directions)):
                text = _utterance(rng, templates[label], replies[label] if ambiguous[i] else None)
                dialogue, utterance = divmod(clip, 5)
                clip += 1
                key = f"dia{dialogue}_utt{utterance}"
                rows.append((dialogue, utterance, text, OOS_LABEL if part else labels[label],
                             f"0:00:{utterance:02d}", f"0:00:{utterance + 1:02d}",
                             f"S{1 + dialogue % 4}", SPEAKERS[dialogue % len(SPEAKERS)]))
                video_feats[key] = _clip_frames(rng, video_dirs[direction], video_len, clip)
                audio_feats[key] = _clip_frames(rng, audio_dirs[direction], audio_len, clip)
            _write_tsv(out / folder / f"{split}.tsv", MINTREC2_HEADER, rows)
        _write_pickles(out / folder, ("video_data/swin_roi_binary.pkl", video_feats),
                       ("audio_data/wavlm_feats_binary.pkl", audio_feats))
        # The loader reads the frame lengths from the synthetic.json beside the TSVs.
        (out / folder / SYNTHETIC_META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    (out / SYNTHETIC_META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return out


def ensure_synthetic(cache_dir: str | os.PathLike, dataset: str = "mintrec", **kw) -> Path:
    """The synthetic set of dataset (mintrec: write_synthetic_mintrec; mintrec2:
    write_synthetic_mintrec2) for these arguments, written once into ``cache_dir``.

    The folder name is a hash of the full argument set; it is written in a
    temporary folder and renamed into place, so a crashed or concurrent write
    never leaves a half-written set where a later run would use it.
    """
    if dataset not in ("mintrec", "mintrec2"):
        raise ValueError(f"no synthetic set of dataset {dataset!r}; known: mintrec, mintrec2")
    defaults = DEFAULTS if dataset == "mintrec" else {**DEFAULTS, **MINTREC2_DEFAULTS}
    unknown = set(kw) - set(defaults)
    if unknown:
        raise TypeError(f"unknown synthetic data argument(s) {sorted(unknown)}; "
                        f"known: {sorted(defaults)}")
    # mintrec's hash keeps its earlier argument set (its cached sets stay valid)
    params = {**defaults, **kw, "format_version": FORMAT_VERSION,
              **({"dataset": dataset} if dataset != "mintrec" else {})}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    cache = Path(cache_dir)
    target = cache / f"synthetic-{dataset}-{digest}"
    if (target / SYNTHETIC_META).is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-synthetic-", dir=cache))
    try:
        if dataset == "mintrec":
            write_synthetic_mintrec(tmp, **kw)
        else:
            write_synthetic_mintrec2(tmp, **kw)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / SYNTHETIC_META).is_file():  # not a concurrent writer's success
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write the synthetic MIntRec-layout data set "
                                                 "(--dataset mintrec2: the MIntRec2.0 release "
                                                 "layout, in-scope and out-of-scope).")
    parser.add_argument("out_dir")
    parser.add_argument("--dataset", choices=("mintrec", "mintrec2"), default="mintrec")
    for name, value in {**DEFAULTS, **MINTREC2_DEFAULTS}.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=type(value), default=None if name in MINTREC2_DEFAULTS
                                else value, help="mintrec2 only" if name in MINTREC2_DEFAULTS else None)
    args = vars(parser.parse_args(argv))
    dataset, out_dir = args.pop("dataset"), args.pop("out_dir")
    oos = {k: args.pop(k) for k in MINTREC2_DEFAULTS}
    if dataset == "mintrec":
        if any(v is not None for v in oos.values()):
            parser.error("--n-oos-train/--n-oos-dev/--n-oos-test: the out-of-scope part is "
                         "MIntRec2.0's (--dataset mintrec2)")
        out = write_synthetic_mintrec(out_dir, **args)
    else:
        out = write_synthetic_mintrec2(out_dir, **args, **{k: v for k, v in oos.items() if v is not None})
    print(out)


if __name__ == "__main__":
    main()
