"""Greedy decoding of many prompts through one batch of bounded size, each answered as `model.generate` answers it
alone (greedy, no logits processors, cut at its own EOS or its own token budget):

- finished rows leave: a row is dropped from the batch (and its KV cache) at the step that gave its EOS or its
  last budgeted token, and waiting rows take the free places (continuous batching), so the batch never decodes
  for rows whose answer is already final and stays full while rows wait;
- shared prefixes are computed once: the leading tokens that a run of admitted prompts share (a chat template's
  system prompt, a cohort's instructions) go through the model once and their KV cache is repeated for the run;
  the last few prefixes' caches are kept, and a new prefix extends the one it shares most with;
- the longest budgets are admitted first (fewer steps at the end with a nearly empty batch), then in token order
  (shared prefixes together);
- rows in the cache are left-padded under an attention mask, each with its own position ids, so a row's tokens
  see exactly its own prompt and answer at the positions it would have alone; each step writes its keys and
  values in place (transformers' cache copies itself whole to append a token).

Each row's numbers are computed from its own tokens only; batch composition can move a logit only by float
rounding, as any batching can. Only models whose answers this reproduces take this path (`supports`): every
cache layer full attention, and a generation config that asks for no logits processor; `evaluate.local` runs
any other model through `model.generate`.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

# generation_config.json keys that leave greedy decoding as it is: token ids, bookkeeping, what generate returns,
# and sampling settings (ignored without sampling). Any other key may add a logits processor (a repetition
# penalty, a minimum length, suppressed tokens, ...): such a model goes through `model.generate`.
NEUTRAL_GENERATION_KEYS = frozenset({
    "_from_model_config", "transformers_version", "bos_token_id", "eos_token_id", "pad_token_id",
    "decoder_start_token_id", "max_length", "max_new_tokens", "do_sample", "num_beams", "use_cache",
    "output_attentions", "output_hidden_states", "output_scores", "output_logits", "return_dict_in_generate",
    "temperature", "top_k", "top_p", "typical_p", "min_p", "epsilon_cutoff", "eta_cutoff"})
# Free places in the batch before waiting rows are admitted (as a fraction of its size): admitting them together
# fills the batch in one prefill pass, instead of one pass for each row that finishes.
REFILL_FRACTION = 0.25
# What one forward pass costs besides its tokens, in prompt tokens (SmolLM2-135M on one CPU core: a pass reads
# every weight, about as long as prefilling this many more tokens): whether a prompt joins a run or gets its own.
PASS_COST = 24
# Shared prefixes whose KV cache is kept for the next groups (a few MB each for a small model).
KEPT_PREFIXES = 8
# Places a cache layer keeps free after its tokens (`_roomy_layer`), so most steps write in place.
ROOM = 64


@dataclass
class Answer:
    """One row's greedy answer: `tokens` are the new tokens (its EOS last, where it said one); `started` is when
    it entered the batch and `done` when the step that gave its last token ended (readings of the given clock)."""

    index: int
    tokens: list[int]
    started: float
    done: float


def supports(model, prompts: list[list[int]], eos: int | None) -> bool:
    """Whether `greedy_answers` answers `prompts` as `model.generate` does: an end-of-sequence token, no empty
    prompt, a decoder whose cache layers are all full attention (no sliding window), a forward that takes a cache,
    and no logits processor from the model's generation config."""
    from transformers import DynamicCache

    if eos is None or not prompts or not all(prompts) or _cache_keyword(model) is None:
        return False
    if set(model.generation_config.to_diff_dict()) - NEUTRAL_GENERATION_KEYS:
        return False
    try:
        from transformers.cache_utils import DynamicLayer

        layers = DynamicCache(config=model.config).layers
    except (ImportError, TypeError, AttributeError):  # an older transformers: no cache layers to hold rows in
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _cache_keyword(model) -> str | None:
    """The name the model's forward takes its KV cache by (transformers renamed it)."""
    parameters = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


class _Batch:
    """The rows being decoded: their KV cache (rows left-padded to one length), attention mask, next positions,
    last tokens and answers so far."""

    def __init__(self, model):
        self.model = model
        self.cache_keyword = _cache_keyword(model)
        self.logits_kwargs = ({"logits_to_keep": 1}
                              if "logits_to_keep" in inspect.signature(model.forward).parameters else {})
        self.rows: list[Answer] = []
        self.cache: Any = None
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=model.device)
        self.positions = torch.zeros((0, 1), dtype=torch.long, device=model.device)
        self.last = torch.zeros((0,), dtype=torch.long, device=model.device)

    def forward(self, input_ids, mask, positions, cache) -> torch.Tensor:
        """The next greedy token of each row (argmax over float32 logits, as generate takes it)."""
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{self.cache_keyword: cache}, **self.logits_kwargs)
        return out.logits[:, -1].to(torch.float32).argmax(-1)

    def step(self) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        self.positions = self.positions + 1
        self.last = self.forward(self.last[:, None], self.mask, self.positions, self.cache)
        return self.last

    def keep(self, kept: list[int]) -> None:
        if len(kept) == len(self.rows):
            return
        index = torch.tensor(kept, dtype=torch.long, device=self.mask.device)
        self.rows = [self.rows[i] for i in kept]
        self.mask, self.positions, self.last = self.mask[index], self.positions[index], self.last[index]
        if self.rows:
            self.cache.batch_select_indices(index)
            self._trim()

    def _trim(self) -> None:
        """Drop the leading cache columns no remaining row attends to (they were padding for rows that left): a
        view of each layer's room from there, nothing copied."""
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0, 0]) if len(used) else 0
        if start:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.drop_front(start)

    def join(self, other: _Batch) -> None:
        """Take `other`'s rows in (their cache left-padded, or this one's, to the longer of the two)."""
        if not other.rows:
            return
        if not self.rows:
            self.rows, self.cache, self.mask, self.positions, self.last = (
                other.rows, other.cache, other.mask, other.positions, other.last)
            return
        width = max(self.mask.shape[1], other.mask.shape[1])
        for layer, joining in zip(self.cache.layers, other.cache.layers):  # one copy into a room for both
            layer.stack(joining, width)
        self.mask = _left_pad_cat(self.mask, other.mask, width)
        self.rows += other.rows
        self.positions = torch.cat([self.positions, other.positions])
        self.last = torch.cat([self.last, other.last])


class _Prefixes:
    """The KV caches of the last few shared prefixes computed (batch of one each): a new prefix extends the one it
    shares most with (groups of rows alternate between a few cohorts' prompts)."""

    def __init__(self, model):
        self.model = model
        self.kept: list[tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]] = []  # the latest last

    def known(self, prompt: list[int]) -> int:
        """How much of `prompt`'s start a kept prefix holds."""
        return self._closest(prompt)[0]

    def _closest(self, prompt: list[int]):
        return max(((_common_length([ids, prompt]), layers) for ids, layers in self.kept),
                   key=lambda found: found[0], default=(0, []))

    def cache_for(self, prefix: list[int], rows: int):
        """A cache holding `prefix` (not empty) for `rows` rows."""
        same, layers = self._closest(prefix)
        if same < len(prefix):
            cache = _cache_of(self.model, [(k[:, :, :same], v[:, :, :same]) for k, v in layers] if same else [])
            batch = _Batch(self.model)
            ids = torch.tensor([prefix[same:]], dtype=torch.long, device=self.model.device)
            positions = torch.arange(same, len(prefix), device=self.model.device)[None]
            mask = torch.ones((1, len(prefix)), dtype=torch.long, device=self.model.device)
            batch.forward(ids, mask, positions, cache)
            layers = list(_tensors(cache))
            self.kept = self.kept[-(KEPT_PREFIXES - 1):] + [(list(prefix), layers)]
        return _cache_of(self.model, [(k[:, :, :len(prefix)].expand(rows, -1, -1, -1),
                                       v[:, :, :len(prefix)].expand(rows, -1, -1, -1)) for k, v in layers])


def greedy_answers(model, prompts: list[list[int]], budgets: list[int], *, eos: int, slots: int,
                   clock: Callable[[], float]) -> Iterator[list[Answer]]:
    """Each prompt's greedy answer (at most its budget of new tokens, ending at its first `eos`), at most `slots`
    rows decoded together. Yields the answers each step completed, as they complete; `clock` stamps when each row
    entered the batch and when its answer was complete."""
    # popped from the end: the longest budgets first, then token order (see the module docstring)
    waiting = sorted(range(len(prompts)), key=lambda i: (-budgets[i], prompts[i], i))[::-1]
    prefixes = _Prefixes(model)
    batch = _Batch(model)
    refill = max(1, int(slots * REFILL_FRACTION))
    with torch.no_grad():
        while waiting or batch.rows:
            free = slots - len(batch.rows)
            if waiting and (free >= min(refill, len(waiting)) or not batch.rows):
                group = [waiting.pop() for _ in range(min(free, len(waiting)))]
                started = clock()
                admitted = _Batch(model)
                for run in _runs([prompts[i] for i in group]):
                    admitted.join(_prefill(model, prefixes, [group[j] for j in run], prompts, started))
                finished = _settle(admitted, budgets, eos, clock())
                batch.join(admitted)
            else:
                batch.step()
                finished = _settle(batch, budgets, eos, clock())
            if finished:
                yield finished


def _prefill(model, prefixes: _Prefixes, indices: list[int], all_prompts: list[list[int]], started: float) -> _Batch:
    """A batch of rows `indices` with their first new tokens: their prompts' shared prefix from `prefixes`, the
    rest of each prompt left-padded after it."""
    prompts = [all_prompts[i] for i in indices]
    # a row on its own computes no prefix pass of its own: it takes what a kept prefix has of its prompt
    shared = _shared(prompts) if len(prompts) > 1 else min(prefixes.known(prompts[0]), len(prompts[0]) - 1)
    cache = prefixes.cache_for(prompts[0][:shared], len(prompts)) if shared else _cache_of(model, [])
    rests = [ids[shared:] for ids in prompts]
    width = max(map(len, rests))
    device = model.device
    input_ids = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), shared + width), dtype=torch.long, device=device)
    mask[:, :shared] = 1
    for i, rest in enumerate(rests):
        input_ids[i, width - len(rest):] = torch.tensor(rest, dtype=torch.long, device=device)
        mask[i, shared + width - len(rest):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
    batch = _Batch(model)
    batch.rows = [Answer(i, [], started, started) for i in indices]
    batch.cache, batch.mask, batch.positions = cache, mask, positions[:, -1:]
    batch.last = batch.forward(input_ids, mask, positions, cache)
    return batch


def _runs(prompts: list[list[int]]) -> list[list[int]]:
    """`prompts` (in the order they are admitted) cut into consecutive runs, each prefilled in one pass after its shared prefix: a
    prompt joins the current run unless running it on its own costs fewer token passes (a run pads every
    prompt's rest to its longest, after the prefix that all of them share)."""
    runs = [[0]]
    for i in range(1, len(prompts)):
        run = [prompts[j] for j in runs[-1]]
        alone = len(prompts[i]) - min(_common_length([run[0], prompts[i]]), _shared(run)) + PASS_COST
        if _run_cost(run + [prompts[i]]) <= _run_cost(run) + alone:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _shared(prompts: list[list[int]]) -> int:
    """The prefix that a run's prompts share and compute once: each keeps at least its last token of its own."""
    return min(_common_length(prompts), min(map(len, prompts)) - 1)


def _run_cost(prompts: list[list[int]]) -> int:
    """Token passes of one run: its shared prefix once, every prompt's rest padded to the longest, two passes."""
    shared = _shared(prompts)
    return shared + len(prompts) * (max(map(len, prompts)) - shared) + 2 * PASS_COST


def _settle(batch: _Batch, budgets: list[int], eos: int, now: float) -> list[Answer]:
    """Append each row's new token; the rows whose answer it completed leave the batch and are returned."""
    kept, finished = [], []
    for position, (row, token) in enumerate(zip(batch.rows, batch.last.tolist())):
        row.tokens.append(token)
        if token == eos or len(row.tokens) >= budgets[row.index]:
            row.done = now
            finished.append(row)
        else:
            kept.append(position)
    batch.keep(kept)
    return finished


def _common_length(sequences: list[list[int]]) -> int:
    shortest = min(map(len, sequences))
    for position in range(shortest):
        if any(ids[position] != sequences[0][position] for ids in sequences):
            return position
    return shortest


def _tensors(cache) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for layer in cache:
        yield layer[0], layer[1]


def _cache_of(model, layers: list[tuple[torch.Tensor, torch.Tensor]]):
    """A cache of roomy layers (`_roomy_layer`) holding `layers`' keys and values (none: empty, filled by the
    next pass)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    cache.layers = [_roomy_layer()() for _ in cache.layers]
    for index, (keys, values) in enumerate(layers):
        cache.update(keys, values, index)
    return cache


@functools.cache
def _roomy_layer() -> type:
    """A full-attention cache layer with room to grow: a step writes its token's keys and values in place, where
    transformers' DynamicLayer copies the whole cache to append one token (a tenth of a step's time on a CPU).
    Only what this module calls is kept in step: update and batch_select_indices."""
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        rooms: tuple[torch.Tensor, torch.Tensor] | None = None

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            length = self.get_seq_length()
            end = length + key_states.shape[-2]
            if self.rooms is None or end > self.rooms[0].shape[-2]:
                self.rooms = (_with_room(self.keys if length else None, key_states, end + ROOM),
                              _with_room(self.values if length else None, value_states, end + ROOM))
            self.rooms[0][:, :, length:end] = key_states
            self.rooms[1][:, :, length:end] = value_states
            self._hold(self.rooms[0], self.rooms[1], end)
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            length = self.get_seq_length()
            if length and self.rooms is not None:
                self._hold(self.rooms[0][indices], self.rooms[1][indices], length)

        def drop_front(self, start: int) -> None:
            """Forget the first `start` positions (a view: the room after the tokens stays)."""
            length = self.get_seq_length()
            if length and self.rooms is not None:
                self._hold(self.rooms[0][:, :, start:], self.rooms[1][:, :, start:], length - start)

        def stack(self, other: RoomyLayer, width: int) -> None:
            """`other`'s rows after this layer's, both left-padded to `width` positions, in a new room."""
            assert self.keys is not None and self.values is not None and other.keys is not None \
                and other.values is not None  # both batches hold rows
            rooms = []
            for mine, theirs in ((self.keys, other.keys), (self.values, other.values)):
                shape = list(mine.shape)
                shape[0] += theirs.shape[0]
                shape[-2] = width + ROOM
                room = mine.new_zeros(shape)
                room[:mine.shape[0], :, width - mine.shape[-2]:width] = mine
                room[mine.shape[0]:, :, width - theirs.shape[-2]:width] = theirs
                rooms.append(room)
            self._hold(rooms[0], rooms[1], width)

        def _hold(self, keys_room: torch.Tensor, values_room: torch.Tensor, length: int) -> None:
            self.rooms = (keys_room, values_room)
            self.keys, self.values = keys_room[:, :, :length], values_room[:, :, :length]

    return RoomyLayer


def _with_room(current: torch.Tensor | None, like: torch.Tensor, size: int) -> torch.Tensor:
    """A tensor shaped like `like` with `size` places on its sequence dim, `current` copied to its start."""
    shape = list(like.shape)
    shape[-2] = size
    room = like.new_zeros(shape)
    if current is not None:
        room[:, :, :current.shape[-2]] = current
    return room


def _left_pad_cat(first: torch.Tensor, second: torch.Tensor, width: int) -> torch.Tensor:
    """Two attention masks stacked, each left-padded with zeros to `width` columns."""
    return torch.cat([torch.nn.functional.pad(mask, (width - mask.shape[1], 0)) for mask in (first, second)])
