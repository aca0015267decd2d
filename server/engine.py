"""The continuous-batching engine: a background thread that, at every step, admits waiting
sequences into free KV-cache slots, prefills prompt chunks within a token budget, runs one
batched decode forward for every other running sequence, samples, detokenizes, checks stop
conditions and pushes each sequence's new text to its consumer."""

from __future__ import annotations

import codecs
import itertools
import json
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from bitserve.server.metrics import Metrics
from bitserve.server.runner import LlamaRunner
from bitserve.server.sampling import SamplingParams, TokenLogprobs, make_generator, sample
from bitserve.server.structured import allowed_tokens

log = logging.getLogger("bitserve.engine")


class Overloaded(Exception):
    """The waiting queue is full: the client should retry later (HTTP 429)."""


class TooManySequences(Exception):
    """A request has more sequences than the engine could ever hold at once (every KV-cache
    slot plus the whole waiting queue): retrying cannot help (HTTP 400)."""


@dataclass
class StepOutput:
    """What one engine step produced for one sequence (a streaming delta)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class Detokenizer:
    """Incremental text of a sequence's output: only complete UTF-8 characters are released, and
    text that could still become a stop string is held back until it cannot."""

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.prefix = self.read = 0  # ids[prefix:read] gave the end of text already

    def add(self, token: int) -> bool:
        """Append a token; return True if a stop string now appears (text is cut before it).

        Only the ids since the last released text are decoded, with the tokens just before
        them for context (their own text is cut off the front): a whole-sequence decode per
        token would cost time quadratic in the output's length."""
        self.ids.append(token)
        seen = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        window = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if window.endswith("\ufffd") or len(window) <= len(seen):
            return False  # an incomplete multi-byte character, or no new text yet
        self.text += window[len(seen) :]
        self.prefix, self.read = self.read, len(self.ids)
        start = max(0, self.sent - self.hold)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False

    def take(self, final: bool) -> str:
        """New text that is safe to send (everything that is left when `final`)."""
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        delta = self.text[self.sent : end]
        self.sent = end
        return delta


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte (transformers' own table)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def tokenizer_kind(tokenizer: Any) -> str:
    """How a tokenizer's tokens map to bytes: "byte_level" (GPT-2-style byte-level BPE),
    "sentencepiece" ('▁' for a space, <0xNN> byte-fallback tokens) or "text" (unknown:
    each token decoded on its own)."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    try:
        state: Any = decoder.__getstate__()  # the decoder's JSON (tokenizers)
        spec = json.dumps(json.loads(state), ensure_ascii=False)
    except Exception:
        spec = ""
    if "ByteLevel" in spec:
        return "byte_level"
    if any(k in spec for k in ("ByteFallback", "Metaspace", "\u2581")) or hasattr(
        tokenizer, "sp_model"
    ):
        return "sentencepiece"
    return "text"


class TokenBytes:
    """The UTF-8 bytes a token id stands for, as logprobs report them: a token can hold part
    of a character (byte-level BPE splits CJK and emoji), which decoding it on its own turns
    into U+FFFD. Byte-level tokens go through GPT-2's byte decoder, SentencePiece tokens map
    '▁' to a space and <0xNN> to its byte; other tokenizers decode each token."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.kind = tokenizer_kind(tokenizer)
        self.byte_of = _byte_decoder() if self.kind == "byte_level" else {}
        # what the detokenizer's skip_special_tokens drops: the named special tokens and every
        # added token marked special (SmolLM2's <filename>, <jupyter_code>, ... are not named)
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self.special = set(getattr(tokenizer, "all_special_ids", None) or [])
        self.special |= {i for i, t in added.items() if getattr(t, "special", False)}
        self.cache: dict[int, bytes] = {}

    def __call__(self, token: int) -> bytes:
        if token not in self.cache:
            self.cache[token] = self._bytes(token)
        return self.cache[token]

    def _bytes(self, token: int) -> bytes:
        piece = None
        if self.kind != "text":
            try:
                piece = self.tokenizer.convert_ids_to_tokens(token)
            except Exception:
                piece = None
        if not isinstance(piece, str):
            return str(self.tokenizer.decode([token])).encode()
        if self.kind == "byte_level":  # characters outside the alphabet (added tokens) as-is
            return b"".join(
                bytes([self.byte_of[c]]) if c in self.byte_of else c.encode() for c in piece
            )
        if m := _BYTE_TOKEN.fullmatch(piece):
            return bytes([int(m.group(1), 16)])
        return piece.replace("▁", " ").encode()

    def text(self, token: int) -> str:
        """The token as a string: its bytes decoded, U+FFFD where they are not whole UTF-8."""
        return self(token).decode("utf-8", errors="replace")


class TextOffsets:
    """Character offsets of a sequence's tokens in the text they decode to, fed one token at
    a time: a token's offset is the index of the character that its first byte belongs to, so
    the tokens of one multi-byte character share that character's offset. Bytes that are not
    UTF-8 count as U+FFFD, one per maximal invalid run, as the detokenizer's text has them.
    Special tokens (skipped by the detokenizer) add no text."""

    def __init__(self, token_bytes: TokenBytes) -> None:
        self.token_bytes = token_bytes
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.chars = 0  # characters the decoder has released

    def add(self, token: int) -> int:
        """The offset of `token`, which is then appended."""
        if token in self.token_bytes.special:
            return self.chars
        data = self.token_bytes(token)
        offset = self.chars
        pending = self.decoder.getstate()[0]  # the start of a character not yet complete
        if pending and data:
            try:  # does this token go on with that character?
                codecs.getincrementaldecoder("utf-8")().decode(pending + data[:1])
            except UnicodeDecodeError:
                offset += 1  # no: the held bytes end here, as one U+FFFD before this token
        self.chars += len(self.decoder.decode(data))
        return offset


@dataclass
class Sequence:
    """One generated choice: its prompt, parameters, slot and progress."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[StepOutput], None]
    detok: Detokenizer
    arrival: float = field(default_factory=time.perf_counter)  # the request's, before tokenizing
    queued: float = field(default_factory=time.perf_counter)  # handed to the engine
    output_ids: list[int] = field(default_factory=list)
    slot: int = -1
    computed: int = 0  # tokens whose K/V are in the cache
    cached: int = 0  # prompt tokens found in the slot at admission (the prefix cache)
    # Names how the K/V of positions [0, computed) were computed: sequences with the same
    # history and `computed` hold the same values there (0: nothing computed yet), so they may
    # share a chunk.
    history: int = 0
    # Leading positions computed as whole prefill chunks from position 0: their K/V depend on
    # the tokens alone (a whole chunk always fills a prefill step alone), so any sequence whose
    # prompt starts with those tokens may reuse them and compute what it computes without them.
    exact: int = 0
    generator: torch.Generator | None = None
    counts: torch.Tensor | None = None
    matcher: Any = None  # a structured output's llguidance matcher (server/structured.py)
    aborted: bool = False
    last_token_at: float = 0.0

    def prefilled(self) -> bool:
        """True once every prompt token's K/V is in the cache."""
        return self.computed >= len(self.prompt_ids)


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many first tokens a and b share."""
    n, i = min(len(a), len(b)), 0
    while i < n and a[i : i + 64] == b[i : i + 64]:  # compared in C, 64 at a time
        i += 64
    return next((j for j in range(i, n) if a[j] != b[j]), n)


class Engine:
    """Owns the runner and the scheduling state; all model work happens on its own thread."""

    def __init__(
        self,
        runner: LlamaRunner,
        tokenizer: Any,
        metrics: Metrics,
        model_name: str,
        eos_ids: set[int],
        prefill_chunk: int,
        max_waiting: int,
        prefix_cache: bool = False,
    ) -> None:
        self.runner, self.tokenizer, self.eos_ids = runner, tokenizer, eos_ids
        self.prefill_chunk, self.max_waiting = prefill_chunk, max_waiting
        # A free slot keeps the K/V its last sequence left: the tokens they hold and how many
        # lead as whole chunks (`Sequence.exact`). A new prompt reuses whole chunks it starts
        # with from any slot; with prefix_cache, any prefix (other rounding, see _take_slot).
        self.prefix_cache = prefix_cache
        self.slot_tokens: list[list[int]] = [[] for _ in range(runner.num_slots)]
        self.slot_exact = [0] * runner.num_slots
        self.max_len = runner.max_len
        self.m, self.label = metrics, {"model": model_name}
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_slots = list(range(runner.num_slots))
        self.histories = itertools.count(1)  # fresh Sequence.history ids
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = False
        self.cutting = False  # shutdown deadline passed: end every sequence at the next step
        self.thread = threading.Thread(target=self._loop, name="bitserve-engine", daemon=True)

    def new_sequence(
        self,
        index: int,
        prompt_ids: list[int],
        params: SamplingParams,
        emit: Callable,
        arrival: float | None = None,
        matcher: Any = None,
    ) -> Sequence:
        """A sequence ready to submit, with its own generator and detokenizer. arrival: when its
        request came in (time.perf_counter(), before tokenization; default now), where its
        time-to-first-token and end-to-end latency start. matcher: its own llguidance matcher
        if its output must follow a grammar (server/structured.py)."""
        seq = Sequence(index, prompt_ids, params, emit, Detokenizer(self.tokenizer, params.stop))
        seq.matcher = matcher
        if arrival is not None:
            seq.arrival = arrival
        if params.temperature > 0:
            seq.generator = make_generator(params.seed)
        return seq

    def capacity(self) -> int:
        """The most sequences one request may have: all KV-cache slots plus the waiting queue
        (what `submit` accepts when the engine is idle)."""
        return self.runner.num_slots + self.max_waiting

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences for admission; raise TooManySequences if they could never fit, or
        Overloaded if the waiting queue is full now."""
        if len(seqs) > self.capacity():
            raise TooManySequences(
                f"{len(seqs)} sequences, but this server holds at most {self.capacity()} "
                f"({self.runner.num_slots} KV-cache slots + --max-waiting {self.max_waiting})"
            )
        with self.lock:
            if len(self.waiting) + len(seqs) > self.max_waiting + len(self.free_slots):
                raise Overloaded(f"{len(self.waiting)} requests are already waiting")
            self.waiting.extend(seqs)
            self.wake.set()

    def abort(self, seqs: list[Sequence]) -> None:
        """Mark sequences as abandoned (client gone); the loop frees their slots next step."""
        for s in seqs:
            s.aborted = True
        self.wake.set()

    def cut_off(self) -> None:
        """End every running and queued sequence with finish_reason "abort" at the next step,
        so that their streams close cleanly, and accept no more work (shutdown deadline)."""
        self.cutting = True
        self.wake.set()

    def start(self) -> None:
        """Start the engine thread (the app's lifespan calls this)."""
        self.thread.start()

    def stop(self) -> None:
        """Ask the engine thread to exit and wait for it (bounded)."""
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=10)

    def alive(self) -> bool:
        """Whether the engine thread runs and accepts work (/ready)."""
        return self.thread.is_alive() and not self.stopping and not self.cutting

    def _loop(self) -> None:
        """Sleep until there is work, then step; a failed step fails its sequences, not the server."""
        while not self.stopping:
            self.wake.wait(timeout=1.0)
            with self.lock:
                if not self.waiting and not self.running:
                    self.wake.clear()
                    continue
            try:
                self.step()
            except Exception:
                log.exception("engine step failed; failing the running sequences")
                for seq in list(self.running):
                    self._finish(seq, "error")
            self._update_gauges()

    def step(self) -> None:
        """One iteration: drop aborted, admit, prefill a batch of prompt chunks, decode the rest."""
        if self.cutting:
            self._end_all("abort")
            return
        for seq in [s for s in self.running if s.aborted]:
            self._finish(seq, "abort")
        with self.lock:
            for seq in [s for s in self.waiting if s.aborted]:
                self.waiting.remove(seq)
                self._count_finished(seq, "abort")
            while self.waiting and self.free_slots:
                seq = self.waiting.popleft()
                try:
                    seq.slot, seq.cached, seq.history, seq.exact = self._take_slot(seq.prompt_ids)
                except Exception:  # it is in no queue now: answer it, then fail the step
                    seq.emit(self._output(seq, [], [], "error"))
                    self._count_finished(seq, "error")
                    raise
                seq.computed = seq.cached
                self.running.append(seq)
                self.m.queue.labels(**self.label).observe(time.perf_counter() - seq.queued)
        decoding = [s for s in self.running if s.prefilled()]
        self._prefill([s for s in self.running if not s.prefilled()])
        if decoding:
            t0 = time.perf_counter()
            logits = self.runner.forward(
                torch.tensor([[s.output_ids[-1]] for s in decoding]),
                torch.tensor([s.slot for s in decoding]),
                torch.tensor([s.computed for s in decoding]),
            )
            for s in decoding:
                s.computed += 1
                s.history = next(self.histories)  # its own token now: no other holds that
            self._sample(decoding, logits)
            self.m.decode_step.labels(**self.label).observe(time.perf_counter() - t0)

    def _take_slot(self, prompt: list[int]) -> tuple[int, int, int, int]:
        """A free slot for `prompt`; how many of its first tokens that slot's cache then holds
        (never the last, whose logits are needed), their history (`Sequence.history`) and how
        many of them are whole chunks (`Sequence.exact`). By default only whole chunks that a
        slot holds (free, or a running sequence's) are reused: the prompt then computes what it
        computes alone, bit for bit on the CPU (docs/serving.md, `--prefix-cache`). With the
        prefix cache, any prefix is: a prefix ending mid-chunk shifts the rest's chunks, which
        rounds differently (docs/serving.md, "Batch invariance"), except where prompts
        prefill in the CPU's one-call C step, whose K/V depend on the tokens alone. The slot
        taken is the free one holding the longest reusable prefix (with
        the prefix cache, only if that is at least half of what it holds: a chat's next turn,
        a repeated system prompt, while a few shared template tokens do not evict another
        conversation), else the slot freed longest ago (never-used slots first). If another
        slot holds a longer reusable prefix, its K/V are copied in."""
        chunk, most = self.prefill_chunk, max(0, len(prompt) - 1)
        free = self.free_slots
        holders: list[tuple[list[int], int, int, Sequence | None]]
        holders = [(self.slot_tokens[s], self.slot_exact[s], s, None) for s in free]
        for q in self.running:  # without the cache only whole chunks count (prompt tokens)
            if self.prefix_cache:
                holders.append(((q.prompt_ids + q.output_ids)[: q.computed], q.exact, q.slot, q))
            else:
                holders.append((q.prompt_ids[: q.exact], q.exact, q.slot, q))
        reach = [min(_common_prefix(t, prompt), most) for t, _, _, _ in holders]
        if not self.prefix_cache:  # whole chunks only
            reach = [
                min(r, e) // chunk * chunk for r, (_, e, _, _) in zip(reach, holders, strict=True)
            ]
        best = max(range(len(free)), key=reach.__getitem__)
        if self.prefix_cache:
            if 2 * reach[best] < len(self.slot_tokens[free[best]]):
                best = 0  # free_slots is oldest first
        elif reach[best] < self.slot_exact[free[best]]:
            best = 0  # keep the slot's other chunks: take the oldest and copy what is reused
        slot, reused, exact = free[best], reach[best], holders[best][1]
        history = next(self.histories) if reused else 0  # a free slot's K/V: their own history
        source = max(range(len(holders)), key=reach.__getitem__)
        if reach[source] > reused:
            _, exact, src_slot, holder = holders[source]
            reused = reach[source]
            self.runner.copy_positions(src_slot, slot, 0, reused)
            # A running sequence's first positions keep its history; a free slot's, a new one.
            history = holder.history if holder is not None else next(self.histories)
        free.pop(best)  # only now: a failed copy leaves the slot free
        self.m.prefix_queries.labels(**self.label).inc(len(prompt))
        self.m.prefix_hits.labels(**self.label).inc(reused)
        return slot, reused, history, min(reused, exact) // chunk * chunk

    def _end_all(self, reason: str) -> None:
        """Finish every queued and running sequence now, each with a last output."""
        with self.lock:
            queued, self.waiting = list(self.waiting), deque()
        for seq in queued:
            seq.emit(self._output(seq, [], [], reason))
            self._count_finished(seq, reason)
        for seq in list(self.running):
            self._finish(seq, reason)

    def _prefill(self, waiting: list[Sequence]) -> None:
        """Prefill the next prompt chunk of as many sequences as fit in one right-padded
        [B, T] forward of at most `prefill_chunk` tokens; sample the first token of those whose
        prompt is then complete. Sequences with the same K/V so far (`Sequence.history`) and
        the same tokens in their next chunk (a request's `n` choices, or prompts opening with
        the same long system prompt) share that chunk: one computes it, the others get its K/V
        copied into their slots (and, where it ends their prompt, sample from its logits row):
        what their own prefill would have given wherever a row does not depend on its batch
        (docs/serving.md, "Batch invariance")."""
        leaders: dict[tuple[int, int, tuple[int, ...]], Sequence] = {}
        followers: dict[int, list[Sequence]] = {}
        for seq in waiting:
            end = seq.computed + min(self.prefill_chunk, len(seq.prompt_ids) - seq.computed)
            key = (seq.history, seq.computed, tuple(seq.prompt_ids[seq.computed : end]))
            leader = leaders.setdefault(key, seq)
            followers.setdefault(id(leader), []).extend([seq] if leader is not seq else [])
        waiting = list(leaders.values())
        batch: list[tuple[Sequence, int]] = []
        width = 0
        for seq in waiting:
            n = min(self.prefill_chunk, len(seq.prompt_ids) - seq.computed)
            if batch and (len(batch) + 1) * max(width, n) > self.prefill_chunk:
                break
            batch.append((seq, n))
            width = max(width, n)
        if not batch:
            return
        t0 = time.perf_counter()
        ids = [s.prompt_ids[s.computed : s.computed + n] + [0] * (width - n) for s, n in batch]
        logits = self.runner.forward(
            torch.tensor(ids),
            torch.tensor([s.slot for s, _ in batch]),
            torch.tensor([s.computed for s, _ in batch]),
            torch.tensor([n - 1 for _, n in batch]),
        )
        rows: list[tuple[Sequence, int]] = []  # every sequence this step advanced, its row
        for row, (seq, n) in enumerate(batch):
            self.m.prompt_tokens.labels(**self.label).inc(n)
            history = next(self.histories)
            for s in [seq, *followers.get(id(seq), [])]:
                if s is not seq:
                    self.runner.copy_positions(seq.slot, s.slot, s.computed, s.computed + n)
                    self.m.shared_prompt_tokens.labels(**self.label).inc(n)
                if s.exact == s.computed and n == self.prefill_chunk:
                    s.exact += n
                s.computed += n
                s.history = history
                rows.append((s, row))
        done = [(s, row) for s, row in rows if s.prefilled()]
        if done:
            picked = [row for _, row in done]
            same = picked == list(range(len(batch)))
            self._sample([s for s, _ in done], logits if same else logits[picked])
        else:  # nothing read the logits back: wait for the GPU, so the metric times the chunk
            self.runner.synchronize()
        self.m.prefill_step.labels(**self.label).observe(time.perf_counter() - t0)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Sample one token per sequence from its logits row and append it. A row that cannot be
        sampled (NaN logits) fails its own sequence only: the batch is retried row by row.
        Sequences with a grammar choose among the tokens their matcher allows."""
        allowed = None
        if any(s.matcher is not None for s in seqs):
            vocab = logits.shape[-1]
            allowed = allowed_tokens([s.matcher for s in seqs], vocab, logits.device)
        try:
            tokens, logprobs = sample(
                logits,
                [s.params for s in seqs],
                [s.generator or torch.default_generator for s in seqs],
                [s.counts for s in seqs],
                allowed,
            )
        except ValueError as e:
            if len(seqs) > 1:
                for i, seq in enumerate(seqs):
                    self._sample([seq], logits[i : i + 1])
                return
            log.error("sequence %d failed: %s", seqs[0].index, e)
            self._finish(seqs[0], "error")
            return
        now = time.perf_counter()
        for seq, token, lp in zip(seqs, tokens, logprobs, strict=True):
            self._append(seq, token, lp, now)

    def _append(self, seq: Sequence, token: int, lp: TokenLogprobs | None, now: float) -> None:
        """Record one new token, stream its text, finish the sequence if a stop rule fires."""
        p = seq.params
        if not seq.output_ids:
            self.m.ttft.labels(**self.label).observe(now - seq.arrival)
        else:
            self.m.itl.labels(**self.label).observe(now - seq.last_token_at)
        seq.last_token_at = now
        seq.output_ids.append(token)
        self.m.generation_tokens.labels(**self.label).inc()
        if p.presence_penalty or p.frequency_penalty:
            if seq.counts is None:
                vocab = self.runner.lm_head.out_features
                seq.counts = torch.zeros(vocab, device=self.runner.device)  # where logits are
            seq.counts[token] += 1
        if seq.matcher is not None and not seq.matcher.consume_token(token):
            log.error("sequence %d left its grammar: %s", seq.index, seq.matcher.get_error())
            self._finish(seq, "error")
            return
        reason = None
        if (
            token in p.stop_token_ids
            or (token in self.eos_ids and not p.ignore_eos)
            or seq.detok.add(token)
            or (seq.matcher is not None and seq.matcher.is_stopped())  # the grammar is complete
        ):
            reason = "stop"
        elif len(seq.output_ids) >= p.max_tokens or seq.computed + 1 >= self.max_len:
            reason = "length"
        seq.emit(self._output(seq, [token], [lp], reason))
        if reason is not None:
            self._finish(seq, reason, emitted=True)

    def _output(
        self, seq: Sequence, ids: list[int], lps: list[TokenLogprobs | None], reason: str | None
    ) -> StepOutput:
        """The streaming delta of `seq` for the tokens just added."""
        text = seq.detok.take(final=reason is not None)
        return StepOutput(
            seq.index, text, ids, lps, reason, len(seq.prompt_ids), len(seq.output_ids)
        )

    def _finish(self, seq: Sequence, reason: str, emitted: bool = False) -> None:
        """Free the sequence's slot and account for it. A failed sequence's slot is cleared: its
        cache may hold NaN/inf, which masked attention does not hide from the next occupant."""
        if not emitted:
            seq.emit(self._output(seq, [], [], reason))
        if reason == "error":
            self.runner.clear_slot(seq.slot)
        # the tokens whose K/V the slot holds (not the last sampled one)
        kept = [] if reason == "error" else (seq.prompt_ids + seq.output_ids)[: seq.computed]
        self.slot_tokens[seq.slot], self.slot_exact[seq.slot] = kept, min(seq.exact, len(kept))
        self.running.remove(seq)
        with self.lock:
            self.free_slots.append(seq.slot)
        self._count_finished(seq, reason)

    def _count_finished(self, seq: Sequence, reason: str) -> None:
        """Count a finished sequence by reason and observe its end-to-end latency: every
        finished sequence, one abandoned in the queue too, so the two counts agree."""
        self.m.finished.labels(finish_reason=reason, **self.label).inc()
        self.m.e2e.labels(**self.label).observe(time.perf_counter() - seq.arrival)

    def _update_gauges(self) -> None:
        """Running/waiting counts and KV-slot usage, after every step."""
        self.m.running.labels(**self.label).set(len(self.running))
        self.m.waiting.labels(**self.label).set(len(self.waiting))
        used = self.runner.num_slots - len(self.free_slots)
        self.m.kv_usage.labels(**self.label).set(used / self.runner.num_slots)
