"""The capability probe's questions: general multiple choice, none of them a demo task.

Hand-written facts, word meanings and common sense, plus generated arithmetic
word problems, number sequences, calendar order and size comparisons. The
demo data asks symbolic arithmetic, list operations, conversions and one-word
facts of other kinds (capitals, opposites, plurals...), so the probe measures
what a model knew besides what preference training teaches it.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from mmpo_jax.data.probe import ProbeItem

# (question, correct option, three wrong options)
FACTS: tuple[tuple[str, str, tuple[str, str, str]], ...] = (
    ("How many legs does a spider have?", "8", ("6", "4", "10")),
    ("How many legs does an insect have?", "6", ("8", "4", "2")),
    ("What is the largest planet in our solar system?", "Jupiter", ("Mars", "Venus", "Mercury")),
    ("Which planet is known as the Red Planet?", "Mars", ("Jupiter", "Saturn", "Neptune")),
    ("What do bees make?", "honey", ("milk", "silk", "paper")),
    ("Which gas do plants take from the air to make food?", "carbon dioxide",
     ("helium", "neon", "hydrogen")),
    ("What do we call frozen water?", "ice", ("steam", "sand", "glass")),
    ("At how many degrees Celsius does water freeze?", "0", ("100", "50", "37")),
    ("At how many degrees Celsius does water boil at sea level?", "100", ("0", "50", "212")),
    ("What is the closest star to the Earth?", "the Sun", ("Polaris", "Sirius", "Vega")),
    ("Which organ pumps blood through the body?", "the heart",
     ("the lungs", "the liver", "the stomach")),
    ("Which organs do we use to breathe?", "the lungs",
     ("the kidneys", "the heart", "the bones")),
    ("What do caterpillars turn into?", "butterflies", ("spiders", "worms", "birds")),
    ("How many sides does a triangle have?", "3", ("4", "5", "6")),
    ("How many sides does a square have?", "4", ("3", "5", "8")),
    ("How many sides does a hexagon have?", "6", ("5", "8", "7")),
    ("What do you call a shape with eight sides?", "an octagon",
     ("a hexagon", "a pentagon", "a triangle")),
    ("Which is the largest ocean on Earth?", "the Pacific Ocean",
     ("the Atlantic Ocean", "the Indian Ocean", "the Arctic Ocean")),
    ("What is the tallest animal?", "the giraffe", ("the elephant", "the horse", "the camel")),
    ("What is the largest animal on Earth?", "the blue whale",
     ("the elephant", "the giraffe", "the great white shark")),
    ("Which of these birds cannot fly?", "the penguin", ("the eagle", "the sparrow", "the owl")),
    ("What language is mainly spoken in Brazil?", "Portuguese", ("Spanish", "French", "German")),
    ("How many continents are there?", "7", ("5", "9", "12")),
    ("Which metal does a magnet attract?", "iron", ("gold", "copper", "silver")),
    ("What force pulls objects toward the ground?", "gravity",
     ("friction", "electricity", "wind")),
    ("What is the hardest natural material?", "diamond", ("gold", "wood", "glass")),
    ("Which sense do you use your nose for?", "smell", ("sight", "hearing", "touch")),
    ("Which sense do you use your ears for?", "hearing", ("smell", "taste", "sight")),
    ("In which direction does the Sun rise?", "east", ("west", "north", "south")),
    ("What shape is the Earth, roughly?", "a sphere", ("a cube", "a cone", "a pyramid")),
    ("Which color do you get by mixing blue and yellow?", "green", ("purple", "orange", "red")),
    ("Which color do you get by mixing red and white?", "pink", ("green", "blue", "black")),
    ("What do fish use to breathe?", "gills", ("lungs", "fins", "scales")),
    ("How many players does a soccer team have on the field?", "11", ("5", "9", "15")),
    ("Which instrument has black and white keys?", "the piano",
     ("the drum", "the violin", "the flute")),
    ("Which animal has a trunk?", "the elephant", ("the horse", "the lion", "the rabbit")),
    ("Which animal carries its baby in a pouch?", "the kangaroo",
     ("the wolf", "the bear", "the zebra")),
    ("What is the chemical formula of water?", "H2O", ("CO2", "O2", "NaCl")),
    ("What do plants release into the air that we breathe?", "oxygen",
     ("smoke", "helium", "dust")),
    ("Which planet do we live on?", "Earth", ("Mars", "Venus", "Saturn")),
    ("What is the main food of a panda?", "bamboo", ("fish", "meat", "cheese")),
    ("How many wheels does a tricycle have?", "3", ("2", "4", "6")),
)

# (word, meaning): the other meanings of the same part of speech are the distractors.
ADJECTIVES: tuple[tuple[str, str], ...] = (
    ("enormous", "very large"), ("tiny", "very small"), ("rapid", "very fast"),
    ("ancient", "very old"), ("fragile", "easily broken"),
    ("generous", "happy to give and share"), ("timid", "shy and easily frightened"),
    ("furious", "extremely angry"), ("exhausted", "extremely tired"),
    ("delighted", "very pleased"), ("famished", "very hungry"),
    ("drenched", "completely wet"), ("silent", "making no sound"),
    ("transparent", "easy to see through"), ("fragrant", "having a pleasant smell"),
    ("brave", "not afraid of danger"), ("curious", "eager to learn or know"),
    ("arid", "having very little rain"), ("frigid", "very cold"), ("scorching", "very hot"),
    ("vacant", "not being used or lived in"), ("rigid", "stiff and hard to bend"),
    ("gloomy", "dark and sad"), ("hilarious", "extremely funny"),
    ("obvious", "easy to see or understand"), ("rare", "not found very often"),
    ("hollow", "empty inside"), ("lazy", "unwilling to work"),
    ("loyal", "faithful to others"), ("precise", "exact and accurate"),
    ("sturdy", "strong and solid"), ("filthy", "very dirty"),
)
VERBS: tuple[tuple[str, str], ...] = (
    ("whisper", "to speak very softly"), ("devour", "to eat quickly and hungrily"),
    ("gaze", "to look steadily for a long time"), ("stroll", "to walk slowly for pleasure"),
    ("sprint", "to run very fast over a short distance"),
    ("shiver", "to shake because of cold or fear"),
    ("borrow", "to take something and give it back later"),
    ("vanish", "to disappear suddenly"), ("mend", "to repair something broken"),
    ("shout", "to speak very loudly"), ("soar", "to fly high in the air"),
    ("ponder", "to think carefully about something"), ("weep", "to cry"),
    ("giggle", "to laugh in a silly way"),
)
NOUNS: tuple[tuple[str, str], ...] = (
    ("journey", "a trip from one place to another"), ("feast", "a large special meal"),
    ("puddle", "a small pool of water on the ground"),
    ("blizzard", "a heavy snowstorm with strong wind"),
    ("canyon", "a deep valley with steep sides"),
    ("orchard", "a piece of land where fruit trees grow"),
    ("harbor", "a sheltered place where ships stay"), ("author", "a person who writes books"),
    ("pilot", "a person who flies an aircraft"),
    ("surgeon", "a doctor who performs operations"),
    ("cottage", "a small house in the country"),
    ("glacier", "a huge slow-moving mass of ice"), ("recipe", "instructions for cooking a dish"),
    ("telescope", "a tool for seeing distant objects"),
)

COMMON_SENSE: tuple[tuple[str, str, tuple[str, str, str]], ...] = (
    ("Where do you keep ice cream so that it does not melt?", "in the freezer",
     ("in the oven", "on a bookshelf", "in the bathtub")),
    ("What do you use to cut paper?", "scissors", ("a spoon", "a pillow", "a towel")),
    ("It is raining. What should you take outside to stay dry?", "an umbrella",
     ("sunglasses", "a fan", "a candle")),
    ("What do you do when you are thirsty?", "drink water",
     ("go to sleep", "read a book", "put on a coat")),
    ("Where would you go to borrow a book for free?", "a library",
     ("a bakery", "a garage", "a gym")),
    ("What do you wear on your feet?", "shoes", ("gloves", "a hat", "a scarf")),
    ("What do you use to write on paper?", "a pen", ("a fork", "a plate", "a sock")),
    ("When do people usually eat breakfast?", "in the morning",
     ("at midnight", "late in the evening", "in the middle of the night")),
    ("What happens to ice left in the hot sun?", "it melts",
     ("it grows", "it turns to stone", "it gets colder")),
    ("What do you need to open a locked door?", "a key", ("a spoon", "a towel", "a cup")),
    ("Where do people usually sleep?", "in a bed", ("in a sink", "in an oven", "on a stove")),
    ("What do you do with a broom?", "sweep the floor",
     ("cook food", "wash dishes", "write letters")),
    ("A glass falls onto a stone floor. What will most likely happen?", "it will break",
     ("it will bounce", "it will melt", "it will float")),
    ("Why do people wear coats in winter?", "to stay warm",
     ("to stay cool", "to run faster", "to see better")),
    ("What can you use to talk to a friend who is far away?", "a phone",
     ("a hammer", "a pillow", "a spoon")),
    ("What should you do before crossing a busy street?", "look both ways",
     ("close your eyes", "run without looking", "lie down")),
    ("Where do fish live?", "in water", ("in trees", "in the desert", "in the clouds")),
    ("What can help you see in the dark?", "a flashlight",
     ("a spoon", "a blanket", "a book")),
    ("What do you put on an envelope before mailing it?", "a stamp",
     ("butter", "a leaf", "a feather")),
    ("Which tool is best for hitting a nail?", "a hammer",
     ("a spoon", "a feather", "a sponge")),
    ("In which room do people usually cook?", "the kitchen",
     ("the garage", "the bathroom", "the bedroom")),
    ("What should you do when you hear a fire alarm?", "leave the building",
     ("go back to sleep", "turn up the music", "open the oven")),
    ("Which machine keeps food cold?", "a refrigerator", ("an oven", "a toaster", "a lamp")),
    ("What do you use to dry yourself after a shower?", "a towel",
     ("a plate", "a newspaper", "a spoon")),
    ("Where do people go when they are very sick?", "to a hospital",
     ("to a bakery", "to a cinema", "to a zoo")),
    ("What do you need to see your own face?", "a mirror",
     ("a rock", "a carpet", "a pillow")),
    ("Why do people wear sunglasses?", "to protect their eyes from bright light",
     ("to hear better", "to keep their hands warm", "to sleep faster")),
    ("What do you do with a seed to grow a plant?", "plant it in soil",
     ("freeze it", "paint it", "put it in a book")),
    ("Someone is sleeping. How should you speak?", "quietly",
     ("loudly", "by shouting", "with a whistle")),
    ("What do people use to carry groceries home?", "a bag",
     ("a fork", "a candle", "a pillow")),
)

# Things in increasing order of a quantity, for "which is bigger/heavier/faster".
SCALES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("bigger", "smaller", ("an ant", "a mouse", "a rabbit", "a dog", "a horse", "an elephant",
                           "a whale")),
    ("heavier", "lighter", ("a feather", "a coin", "an apple", "a book", "a brick",
                            "a bicycle", "a car", "a truck")),
    ("faster", "slower", ("a snail", "a turtle", "a walking person", "a horse", "a car",
                          "an airplane")),
)

DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
SEASONS = ("spring", "summer", "autumn", "winter")

_NAMES = (("Tom", "he"), ("Anna", "she"), ("Sara", "she"), ("Ben", "he"), ("Lucy", "she"),
          ("Omar", "he"), ("Mia", "she"), ("Leo", "he"))
_THINGS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "coins", "cards")


def _word_problem(rng: random.Random) -> tuple[str, int, list[int]]:
    """(question, answer, tempting wrong answers) for one small story problem."""
    (name, pron), things = rng.choice(_NAMES), rng.choice(_THINGS)
    a, b = rng.randint(3, 20), rng.randint(2, 9)
    form = rng.randrange(6)
    if form == 0:
        q = (f"{name} has {a} {things}. {pron.capitalize()} buys {b} more. "
             f"How many {things} does {pron} have now?")
        return q, a + b, [a - b, a * b, a + b + 1]
    if form == 1:
        a = a + b  # never negative
        q = f"{name} has {a} {things} and gives {b} to a friend. How many {things} are left?"
        return q, a - b, [a + b, a - b + 1, a - b - 1]
    if form == 2:
        q = f"There are {b} boxes with {a} {things} in each box. How many {things} are there?"
        return q, a * b, [a + b, a * b + a, a * b - b]
    if form == 3:
        q = (f"{a * b} {things} are shared equally among {b} children. "
             f"How many {things} does each child get?")
        return q, a, [a * b - b, a + 1, b]
    if form == 4:
        q = f"A class has {a} girls and {b + 5} boys. How many children are in the class?"
        return q, a + b + 5, [a - 1, a + b + 4, a * 2]
    a = a + b
    q = f"A bus has {a} passengers. At the next stop, {b} get off. How many are still on the bus?"
    return q, a - b, [a + b, a, a - b + 2]


def _sequence(rng: random.Random) -> tuple[str, int, list[int]]:
    if rng.random() < 0.75:
        start, step = rng.randint(1, 20), rng.randint(2, 10)
        terms = [start + i * step for i in range(4)]
        nxt = start + 4 * step
        wrong = [nxt + step, nxt - 1, terms[-1] + 1]
    else:
        start, ratio = rng.randint(1, 5), rng.choice((2, 3))
        terms = [start * ratio**i for i in range(4)]
        nxt = start * ratio**4
        wrong = [terms[-1] + (terms[-1] - terms[-2]), nxt + ratio, nxt * ratio]
    return f"What number comes next: {', '.join(map(str, terms))}, ...?", nxt, wrong


def _distinct_numbers(answer: int, wrong: list[int]) -> list[str]:
    """Three wrong numbers, positive, unique and not the answer (topped up near it)."""
    out: list[int] = []
    for w in wrong + [answer + d for d in (2, 3, -2, -3, 4, 5)]:
        if w > 0 and w != answer and w not in out:
            out.append(w)
    return [str(w) for w in out[:3]]


def _calendar_items() -> list[tuple[str, str, list[str], str]]:
    """(key, question, options, answer) for every next/previous day, month and season."""
    items = []
    for cycle, noun in ((DAYS, "day"), (MONTHS, "month"), (SEASONS, "season")):
        n = len(cycle)
        for i, name in enumerate(cycle):
            for word, j in (("after", (i + 1) % n), ("before", (i - 1) % n)):
                wrong = [cycle[(j + k) % n] for k in (1, 2, 3) if cycle[(j + k) % n] != name]
                wrong = (wrong + [name])[:3]
                q = f"Which {noun} comes {word} {name}?"
                items.append((f"cal:{noun}:{word}:{name}", q, wrong, cycle[j]))
    return items


def _item(rng: random.Random, category: str, question: str, answer: str,
          wrong: list[str] | tuple[str, ...]) -> ProbeItem:
    options = [answer, *wrong]
    rng.shuffle(options)
    return ProbeItem(id="", category=category, question=question, options=tuple(options),
                     answer=options.index(answer))


def _meaning_items(rng: random.Random) -> list[ProbeItem]:
    items = []
    for bank in (ADJECTIVES, VERBS, NOUNS):
        meanings = [m for _, m in bank]
        for word, meaning in bank:
            wrong = rng.sample([m for m in meanings if m != meaning], 3)
            items.append(_item(rng, "word_meaning", f"What does the word '{word}' mean?",
                               meaning, wrong))
    return items


def _generated(rng: random.Random, n: int, category: str,
               draw: Callable[[random.Random], tuple[str, int, list[int]]]) -> list[ProbeItem]:
    items: list[ProbeItem] = []
    seen: set[str] = set()
    while len(items) < n:
        question, answer, wrong = draw(rng)
        if question not in seen:
            seen.add(question)
            items.append(_item(rng, category, question, str(answer),
                               _distinct_numbers(answer, wrong)))
    return items


def _comparison_items(rng: random.Random, n: int) -> list[ProbeItem]:
    """Pairs at least two steps apart on a scale, so the answer is not a matter of taste."""
    pairs = [(more, less, scale[i], scale[j])
             for more, less, scale in SCALES
             for i in range(len(scale)) for j in range(i + 2, len(scale))]
    items = []
    for more, less, small, big in rng.sample(pairs, n):
        word = rng.choice((more, less))
        first, second = (small, big) if rng.random() < 0.5 else (big, small)
        q = f"Which is {word}, {first} or {second}?"
        items.append(_item(rng, "comparison", q, big if word == more else small,
                           [small if word == more else big]))
    return items


def make_probe(seed: int, n_word_problems: int = 60, n_sequences: int = 40,
               n_comparisons: int = 40) -> list[ProbeItem]:
    """Every probe item, in a fixed order, answers placed at random positions by `seed`."""
    rng = random.Random(f"mmpo-jax probe {seed}")
    items = [_item(rng, "fact", q, a, w) for q, a, w in FACTS]
    items += _meaning_items(rng)
    items += [_item(rng, "common_sense", q, a, w) for q, a, w in COMMON_SENSE]
    items += _generated(rng, n_word_problems, "word_problem", _word_problem)
    items += _generated(rng, n_sequences, "sequence", _sequence)
    items += [_item(rng, "calendar", q, a, w) for _, q, w, a in _calendar_items()]
    items += _comparison_items(rng, n_comparisons)
    return [ProbeItem(id=f"probe-{i:04d}", category=it.category, question=it.question,
                      options=it.options, answer=it.answer) for i, it in enumerate(items)]
