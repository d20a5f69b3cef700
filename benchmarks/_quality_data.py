"""The merge-quality benchmark's data: synthetic skills with exact answers, and a general text.

Each skill turns a seeded ``random.Random`` into (input, answer) pairs. The items of a skill are
drawn once as a stream of distinct inputs; the first ``report`` of them are the held-out split,
the next ``search`` the split the evolutionary search scores on, the rest the training split, so
the three never share an input.

Prompt format (plain text, no chat template; the same in training, search and report)::

    Task: add the two numbers.
    Input: 347 + 268
    Output: 615<|im_end|>

The prompt ends at ``Output:``; the answer is `` 615`` (with its leading space), tokenized on its
own and appended, as :mod:`engine.evolve.evaluate` does.
"""

from __future__ import annotations

import calendar
import json
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

WORDS = (
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "paper",
    "green",
    "window",
    "silver",
    "music",
    "garden",
    "bread",
    "candle",
    "ocean",
    "forest",
    "pencil",
    "rabbit",
    "mirror",
    "winter",
    "summer",
    "bottle",
    "castle",
    "dragon",
    "engine",
    "flower",
    "guitar",
    "hammer",
    "island",
    "jacket",
    "kettle",
    "ladder",
    "monkey",
    "needle",
    "orange",
    "pillow",
    "rocket",
    "saddle",
    "tunnel",
    "violin",
    "wallet",
    "yellow",
    "basket",
    "button",
    "cotton",
    "doctor",
    "farmer",
    "honey",
    "lemon",
    "marble",
    "pepper",
    "planet",
    "sugar",
    "throne",
    "velvet",
    "wagon",
    "anchor",
)


@dataclass(frozen=True)
class Item:
    """One prompt/answer pair; ``prompt`` ends before the answer's leading space."""

    prompt: str
    answer: str

    def as_json(self) -> str:
        return json.dumps({"prompt": self.prompt, "answer": self.answer})


@dataclass(frozen=True)
class Skill:
    """A synthetic task: an instruction and a generator of (input, answer) pairs."""

    name: str
    instruction: str
    draw: Callable[[random.Random], tuple[str, str]]

    def item(self, question: str, answer: str) -> Item:
        return Item(f"Task: {self.instruction}\nInput: {question}\nOutput:", f" {answer}")


def _addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    return f"{a} + {b}", str(a + b)


def _reversal(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return " ".join(words), " ".join(reversed(words))


def _date(rng: random.Random) -> tuple[str, str]:
    year, month = rng.randint(1950, 2049), rng.randint(1, 12)
    day = rng.randint(1, calendar.monthrange(year, month)[1])
    return f"{year:04d}-{month:02d}-{day:02d}", f"{calendar.month_name[month]} {day}, {year}"


SKILLS: dict[str, Skill] = {
    s.name: s
    for s in (
        Skill("add", "add the two numbers.", _addition),
        Skill("reverse", "write the words in reverse order.", _reversal),
        Skill("date", "write the date in words.", _date),
    )
}


@dataclass(frozen=True)
class Splits:
    """A skill's three disjoint splits."""

    train: tuple[Item, ...]
    search: tuple[Item, ...]
    report: tuple[Item, ...]
    validation: tuple[Item, ...] = ()  # from the search pool, after the search items


POOL = 400  # items reserved for each of the report and search splits, whatever sizes are asked for


def make_splits(
    skill: Skill, *, train: int, search: int, report: int, seed: int, validation: int = 0
) -> Splits:
    """Distinct items of a skill, deterministically from ``seed``: report, then search, then train.

    The first ``POOL`` items of the stream are the report pool and the next ``POOL`` the search
    pool (its validation items follow its search items), so the training items do not change when
    the evaluation sizes do (cached experts stay valid), and no input is in two splits.
    """
    if search + validation > POOL or report > POOL:
        raise ValueError(f"search + validation and report sizes are at most {POOL} items per skill")
    rng = random.Random(seed * 1_000_003 + zlib.crc32(skill.name.encode()))
    seen: set[str] = set()
    items: list[Item] = []
    need = 2 * POOL + train
    attempts = 0
    while len(items) < need:
        attempts += 1
        if attempts > 50 * need:
            raise ValueError(f"skill {skill.name!r} cannot give {need} distinct items")
        question, answer = skill.draw(rng)
        if question in seen:
            continue
        seen.add(question)
        items.append(skill.item(question, answer))
    return Splits(
        report=tuple(items[:report]),
        search=tuple(items[POOL : POOL + search]),
        validation=tuple(items[POOL + search : POOL + search + validation]),
        train=tuple(items[2 * POOL :]),
    )


def write_jsonl(path: Path, items: list[Item]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(item.as_json() + "\n" for item in items), encoding="utf-8")


# General text for perplexity: paragraphs written for this benchmark (plain encyclopedic prose
# on everyday topics, no skill items), so no download is needed and nothing is copied. It is
# small (about 1.9k tokens): enough to see a merge damage the model's language, not a corpus.
GENERAL_TEXT = """\
The river begins as a series of small streams high in the mountains, where snow melts slowly during the spring. As the water moves downhill it gathers into a single channel, cutting a narrow valley through the rock. By the time it reaches the plain, the river is wide and slow, and farmers along its banks use it to water their fields.

Bread is one of the oldest prepared foods. Early bakers mixed ground grain with water and cooked the paste on hot stones. Later, people learned that dough left to rest would rise, because wild yeasts in the air produced gas inside it. Today most bakeries use cultivated yeast, but many still keep a sourdough starter that has been fed every day for years.

A library is more than a room full of books. It keeps records of the past, offers a quiet place to study, and lends materials that many people could not afford to buy. In many towns the library also runs reading groups for children, classes for adults who want to learn new skills, and free access to computers.

The heart is a muscle about the size of a closed fist. It pumps blood through two separate loops: one carries blood to the lungs, where it picks up oxygen, and the other carries that oxygen to the rest of the body. A healthy adult heart beats roughly seventy times a minute while resting, and faster during exercise.

Trains changed the way people thought about distance. Before the railway, a journey between two cities could take several days by coach. Once the lines were built, the same trip took a few hours, and towns along the route grew quickly as new shops and factories opened near the stations.

Honeybees live in colonies that can hold tens of thousands of workers. Each worker has a job that changes as she grows older: young bees clean the cells and feed the larvae, while older bees leave the hive to collect nectar and pollen. When a forager finds a good patch of flowers, she returns and performs a dance that tells the others where to go.

Learning a musical instrument takes patience. At first the fingers feel clumsy and the sounds are uneven, but regular practice slowly builds the small movements into habits. Many teachers suggest short daily sessions rather than long ones once a week, since the memory of a new skill is strengthened by repetition and rest.

The weather in coastal regions is usually milder than it is inland. Water warms and cools more slowly than land, so the sea keeps summers cooler and winters warmer along the shore. This is why some cities near the ocean rarely see snow, even though places at the same latitude further from the coast have cold winters.

Maps are simplified pictures of the world. A map maker must choose what to show and what to leave out, because no sheet of paper can hold every road, house and tree. A map for hikers shows paths, streams and the shape of the hills, while a map for drivers shows highways, exits and the distances between towns.

In the morning the market square fills with stalls selling fruit, vegetables, cheese and flowers. Farmers arrive before sunrise to set up their tables, and the first customers come soon after, hoping to find the freshest produce. By noon most of the bread is gone, and by the middle of the afternoon the square is empty again.

Glass is made by heating sand with a few other minerals until the mixture melts into a thick liquid. While it is still hot, the glass can be blown into bottles, pressed into plates or drawn into long thin sheets for windows. As it cools it becomes hard and clear, but it remains fragile and can break if it is struck or heated unevenly.

Good sleep matters for health at every age. During the night the body repairs tissues, the brain sorts the memories of the day, and hormones that control growth and appetite are released. People who sleep too little for many nights in a row often find it harder to concentrate, and they are more likely to catch colds.

A lighthouse stands on a rocky point to warn ships of danger. Its lamp turns slowly, and each lighthouse along a coast flashes in its own pattern, so that sailors at night can tell which one they are looking at. Although satellites now guide most ships, many lighthouses are still kept working as a simple and reliable backup.

Volcanoes form where hot rock from deep inside the earth rises to the surface. Some erupt with great force, throwing ash high into the sky, while others release slow rivers of lava that flow for weeks. The soil around an old volcano is often very fertile, which is why people have farmed the slopes of active mountains for thousands of years.

Children learn their first language without formal lessons. They listen to the people around them, try out sounds, and slowly work out the rules of grammar from the examples they hear. By the age of four most children can form long sentences, ask questions and tell simple stories about things that happened to them.

A bridge must carry its own weight as well as the traffic that crosses it. Engineers choose a design based on the distance to be spanned, the ground at each end, and the loads it will face. Short bridges are often simple beams, while long ones hang from cables strung between tall towers.
"""
