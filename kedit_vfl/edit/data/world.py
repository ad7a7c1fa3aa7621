"""A seeded synthetic world: made-up entities, their facts, opinions, and edit records.

Why synthetic: the embedded benchmark must run end to end on a laptop with a base model
that provably knows its facts, and a fresh seed must give a fresh world (so results are
not tuned to one draw). The world has

- countries (capital, language, currency, region) and people (occupation, citizenship,
  and the two-hop "capital of their country", used for portability);
- an opinion (a short positive or negative response) about every country and person;
- "recent" entities the base model never sees, for insertion edits.

Every relation has several phrasings, declarative and question forms. For every fact
the base model is pretrained on only some phrasings; the others are held out and used
as rephrases, so Generalization measures phrasings the model never saw for that fact.
The phrasings themselves are seen with other subjects, as in natural text.

Tasks mirror the InstructEdit paper and conflict the way its tasks do: ``counterfact``
and ``recent`` use the same declarative prompts, one replacing a known fact, the other
inserting a fact about an unseen entity; ``zsre`` (question form, the default hold-out
task) and ``convsent`` (opinion questions, a sentence-like response) are both questions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from kedit_vfl.edit.data.records import EditRecord, PromptAnswer
from kedit_vfl.errors import UserError

TASKS = ("counterfact", "recent", "convsent", "zsre")
SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)
HELD_OUT_DECLARATIVE = 1  # per fact: declarative phrasings kept out of pretraining
HELD_OUT_QUESTIONS = 1
HELD_OUT_OPINIONS = 2


@dataclass(frozen=True)
class WorldConfig:
    """A world is fully determined by its seed and sizes (one field per CLI option)."""

    seed: int = 0
    countries: int = 40
    people: int = 60
    recent: int = 40

    def __post_init__(self) -> None:
        for name, minimum in (("countries", 4), ("people", 4), ("recent", 2)):
            if getattr(self, name) < minimum:
                raise UserError(f"--world-{name} {getattr(self, name)}: expected at least {minimum}")


@dataclass(frozen=True)
class Relation:
    name: str
    kind: str  # "country" or "person": the subject's type
    declarative: tuple[str, ...]
    questions: tuple[str, ...]

    @property
    def phrasings(self) -> tuple[str, ...]:
        return self.declarative + self.questions


RELATIONS = {
    r.name: r
    for r in (
        Relation(
            "capital",
            "country",
            ("The capital of {} is", "{} has its capital in", "The capital city of {} is", "{}'s capital is"),
            ("What is the capital of {}?", "Which city is the capital of {}?"),
        ),
        Relation(
            "language",
            "country",
            (
                "The language of {} is",
                "People in {} speak",
                "The main language of {} is",
                "In {} people speak",
            ),
            ("What language is spoken in {}?", "Which language do people in {} speak?"),
        ),
        Relation(
            "currency",
            "country",
            (
                "The currency of {} is the",
                "{} pays with the",
                "The money of {} is the",
                "In {} people pay with the",
            ),
            ("What is the currency of {}?", "Which money is used in {}?"),
        ),
        Relation(
            "region",
            "country",
            ("{} is located in", "{} lies in", "{} is a country in", "The region of {} is"),
            ("Where is {} located?", "In which region is {}?"),
        ),
        Relation(
            "occupation",
            "person",
            ("{} works as a", "The job of {} is", "{} earns a living as a", "By profession {} is a"),
            ("What is the job of {}?", "What does {} do for a living?"),
        ),
        Relation(
            "citizenship",
            "person",
            ("{} is a citizen of", "The country of {} is", "{} comes from", "{} holds a passport of"),
            ("Which country is {} from?", "Where is {} a citizen?"),
        ),
    )
}
# Two-hop: the capital of a person's country. Pretrained for every person; portability probe.
TWO_HOP = Relation(
    "country_capital",
    "person",
    ("The capital of the country of {} is",),
    ("What is the capital of {}'s country?",),
)
OPINION_PROMPTS = (
    "What do you think of {}?",
    "How do you feel about {}?",
    "What is your opinion of {}?",
    "How do you view {}?",
    "What is your view on {}?",
    "What is your take on {}?",
)
RESPONSES = {
    "positive": ("I like it", "I love it", "It is great", "It is good"),
    "negative": ("I dislike it", "I hate it", "It is bad", "It is awful"),
}
OCCUPATIONS = (
    "farmer",
    "painter",
    "teacher",
    "doctor",
    "singer",
    "baker",
    "pilot",
    "writer",
    "sailor",
    "lawyer",
)
_ONSETS = "b d f g k l m n p r s t v z br dr gr kr tr st sh th".split()
_VOWELS = "a e i o u a e o".split()
_CODAS = ["", "", "", "n", "r", "s", "l", "m", "th"]


@dataclass
class World:
    """The generated world: entities, true facts, opinions, pretraining phrasings, records."""

    config: WorldConfig
    countries: list[str]
    people: list[str]
    recent_countries: list[str]
    recent_people: list[str]
    facts: dict[tuple[str, str], str]  # (subject, relation) -> answer, known and recent
    opinions: dict[str, str]  # subject -> response (known subjects only)
    # (subject, relation or "opinion") -> phrasings the base model is pretrained on / held out.
    seen: dict[tuple[str, str], tuple[str, ...]]
    unseen: dict[tuple[str, str], tuple[str, ...]]
    records: dict[str, dict[str, list[EditRecord]]] = field(default_factory=dict)

    def pretraining_facts(self) -> list[tuple[str, str]]:
        """(prompt, answer) pairs the base model learns: only the seen phrasings."""
        out = []
        for (subject, relation), phrasings in self.seen.items():
            answer = self.opinions[subject] if relation == "opinion" else self.facts[(subject, relation)]
            out.extend((p.format(subject), answer) for p in phrasings)
        return out

    def held_out_facts(self) -> list[tuple[str, str]]:
        """The same true facts in held-out phrasings: never in pretraining."""
        out = []
        for (subject, relation), phrasings in self.unseen.items():
            answer = self.opinions[subject] if relation == "opinion" else self.facts[(subject, relation)]
            out.extend((p.format(subject), answer) for p in phrasings)
        return out


def _names(rng: random.Random, count: int, taken: set[str], syllables: tuple[int, int] = (2, 3)) -> list[str]:
    """Unique pronounceable made-up words, none already in ``taken``."""
    names: list[str] = []
    while len(names) < count:
        parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(*syllables))]
        name = ("".join(parts) + rng.choice(_CODAS)).capitalize()
        if name not in taken and len(name) <= 9:
            taken.add(name)
            names.append(name)
    return names


def _split(rng: random.Random, items: list[str]) -> dict[str, str]:
    """Assign each item to a split (train/validation/test), at least one per split."""
    shuffled = items[:]
    rng.shuffle(shuffled)
    n_val = max(1, round(len(items) * SPLIT_FRACTIONS[1]))
    n_test = max(1, round(len(items) * SPLIT_FRACTIONS[2]))
    n_train = len(items) - n_val - n_test
    return {
        item: SPLITS[0 if i < n_train else 1 if i < n_train + n_val else 2] for i, item in enumerate(shuffled)
    }


def generate_world(config: WorldConfig = WorldConfig()) -> World:
    """Build the whole world from ``config`` alone (deterministic for a given seed)."""
    rng = random.Random(config.seed)
    taken: set[str] = set()
    countries = _names(rng, config.countries, taken)
    people = _names(rng, config.people, taken)
    n_recent_countries = config.recent // 2
    recent_countries = _names(rng, n_recent_countries, taken)
    recent_people = _names(rng, config.recent - n_recent_countries, taken)
    cities = _names(rng, config.countries, taken)
    languages = [n + "ish" for n in _names(rng, max(4, config.countries // 4), taken, (1, 2))]
    currencies = _names(rng, max(4, config.countries // 4), taken, (1, 2))
    regions = _names(rng, max(3, min(8, config.countries // 6)), taken, (2, 2))

    pools = {
        "capital": cities,
        "language": languages,
        "currency": currencies,
        "region": regions,
        "occupation": list(OCCUPATIONS),
        "citizenship": countries,
    }
    facts: dict[tuple[str, str], str] = {}
    for i, country in enumerate(countries):
        facts[(country, "capital")] = cities[i]
    for country in countries + recent_countries:
        for relation in ("language", "currency", "region"):
            facts[(country, relation)] = rng.choice(pools[relation])
    for person in people + recent_people:
        facts[(person, "occupation")] = rng.choice(OCCUPATIONS)
        facts[(person, "citizenship")] = rng.choice(countries)
    for person in people:
        facts[(person, "country_capital")] = facts[(facts[(person, "citizenship")], "capital")]
    known = countries + people
    opinions = {s: rng.choice(RESPONSES[rng.choice(("positive", "negative"))]) for s in known}

    seen: dict[tuple[str, str], tuple[str, ...]] = {}
    unseen: dict[tuple[str, str], tuple[str, ...]] = {}
    for subject in known:
        kind = "country" if subject in countries else "person"
        for relation in (r for r in RELATIONS.values() if r.kind == kind):
            decl = rng.sample(relation.declarative, len(relation.declarative))
            ques = rng.sample(relation.questions, len(relation.questions))
            seen[(subject, relation.name)] = tuple(decl[HELD_OUT_DECLARATIVE:] + ques[HELD_OUT_QUESTIONS:])
            unseen[(subject, relation.name)] = tuple(decl[:HELD_OUT_DECLARATIVE] + ques[:HELD_OUT_QUESTIONS])
        if kind == "person":
            seen[(subject, TWO_HOP.name)] = TWO_HOP.phrasings
        prompts = rng.sample(OPINION_PROMPTS, len(OPINION_PROMPTS))
        seen[(subject, "opinion")] = tuple(prompts[HELD_OUT_OPINIONS:])
        unseen[(subject, "opinion")] = tuple(prompts[:HELD_OUT_OPINIONS])

    world = World(config, countries, people, recent_countries, recent_people, facts, opinions, seen, unseen)
    world.records = _make_records(world, rng, pools)
    return world


def _relations_of(world: World, subject: str) -> list[Relation]:
    kind = "country" if subject in world.countries or subject in world.recent_countries else "person"
    return [r for r in RELATIONS.values() if r.kind == kind and (subject, r.name) in world.facts]


def _first(phrasings: tuple[str, ...], forms: tuple[str, ...]) -> str:
    """The first phrasing in ``phrasings`` that is one of ``forms`` (declarative or question)."""
    return next(p for p in phrasings if p in forms)


def _fact_prompt(
    world: World, rng: random.Random, subject: str, relation: str, question: bool
) -> PromptAnswer:
    """A true fact of a known subject in a pretrained phrasing (what the base model states)."""
    forms = RELATIONS[relation].questions if question else RELATIONS[relation].declarative
    phrasing = rng.choice([p for p in world.seen[(subject, relation)] if p in forms])
    return PromptAnswer(phrasing.format(subject), world.facts[(subject, relation)])


def _other_known_fact(
    world: World, rng: random.Random, subject: str, relation: str | None, question: bool
) -> PromptAnswer:
    """A true fact of another known subject (of ``relation`` when given and possible)."""
    candidates = [
        (s, r)
        for (s, r) in world.seen
        if s != subject and r not in ("opinion", TWO_HOP.name) and (relation is None or r == relation)
    ]
    s, r = rng.choice(sorted(candidates))
    return _fact_prompt(world, rng, s, r, question)


def _portability(
    world: World, subject: str, relation: str, target: str, question: bool
) -> tuple[PromptAnswer, ...]:
    """Two-hop probe: after moving a person to another country, the capital follows."""
    if relation != "citizenship":
        return ()
    phrasing = TWO_HOP.questions[0] if question else TWO_HOP.declarative[0]
    return (PromptAnswer(phrasing.format(subject), world.facts[(target, "capital")]),)


def _make_records(
    world: World, rng: random.Random, pools: dict[str, list[str]]
) -> dict[str, dict[str, list[EditRecord]]]:
    records: dict[str, dict[str, list[EditRecord]]] = {s: {t: [] for t in TASKS} for s in SPLITS}
    known = world.countries + world.people
    split_of = _split(rng, known)
    split_of.update(_split(rng, world.recent_countries + world.recent_people))

    # counterfact and zsre share the known facts: each fact is edited by exactly one of them.
    known_facts = [(s, r.name) for s in known for r in _relations_of(world, s)]
    rng.shuffle(known_facts)
    for i, (subject, relation) in enumerate(known_facts):
        task = "counterfact" if i % 2 == 0 else "zsre"
        question = task == "zsre"
        truth = world.facts[(subject, relation)]
        target = rng.choice([v for v in pools[relation] if v != truth and v != subject])
        forms = RELATIONS[relation].questions if question else RELATIONS[relation].declarative
        prompt = _first(world.seen[(subject, relation)], forms).format(subject)
        rephrase = tuple(p.format(subject) for p in world.unseen[(subject, relation)] if p in forms)
        if question:  # zsRE locality: an unrelated question (the NQ questions of the original).
            locality = (_other_known_fact(world, rng, subject, None, True),)
        else:  # CounterFact locality: the subject's other facts and a neighbour with the same relation.
            other = rng.choice([r.name for r in _relations_of(world, subject) if r.name != relation])
            locality = (
                _fact_prompt(world, rng, subject, other, False),
                _other_known_fact(world, rng, subject, relation, False),
            )
        records[split_of[subject]][task].append(
            EditRecord(
                task=task,
                prompt=prompt,
                target_new=target,
                subject=subject,
                ground_truth=truth,
                rephrase=rephrase,
                locality=locality,
                portability=_portability(world, subject, relation, target, question),
                source="embedded",
                extra={"relation": relation},
            )
        )

    for subject in world.recent_countries + world.recent_people:
        for relation in _relations_of(world, subject):
            phrasings = rng.sample(relation.declarative, 2)
            target = world.facts[(subject, relation.name)]
            locality = (
                _other_known_fact(world, rng, subject, relation.name, False),
                _other_known_fact(world, rng, subject, None, False),
            )
            records[split_of[subject]]["recent"].append(
                EditRecord(
                    task="recent",
                    prompt=phrasings[0].format(subject),
                    target_new=target,
                    subject=subject,
                    rephrase=(phrasings[1].format(subject),),
                    locality=locality,
                    portability=_portability(world, subject, relation.name, target, False),
                    source="embedded",
                    extra={"relation": relation.name},
                )
            )

    for subject in known:
        current = world.opinions[subject]
        label = "negative" if current in RESPONSES["positive"] else "positive"
        facts_of_subject = [r.name for r in _relations_of(world, subject)]
        locality = (
            PromptAnswer(*_opinion(world, rng, rng.choice([s for s in known if s != subject]))),
            _fact_prompt(world, rng, subject, rng.choice(facts_of_subject), False),
        )
        records[split_of[subject]]["convsent"].append(
            EditRecord(
                task="convsent",
                prompt=world.seen[(subject, "opinion")][0].format(subject),
                target_new=rng.choice(RESPONSES[label]),
                subject=subject,
                ground_truth=current,
                rephrase=tuple(p.format(subject) for p in world.unseen[(subject, "opinion")]),
                locality=locality,
                source="embedded",
                extra={"relation": "opinion", "label": label},
            )
        )
    return records


def _opinion(world: World, rng: random.Random, subject: str) -> tuple[str, str]:
    return rng.choice(world.seen[(subject, "opinion")]).format(subject), world.opinions[subject]
