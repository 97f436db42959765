"""The scheduler: advances every active turn step by step on the thread that owns the model.

Each `step()` reads prompt chunks (sized by measured speed to a time budget, so a cancel or a
newcomer never waits long; several prompts may share one step's budget), then runs one decode step
for every decoding turn: those with plain caches as one batched forward, the others (quantized or
rotating caches, speculative decoding) on their own. Turns join and leave between steps.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Any

import mlx.core as mx

from .assembler import TurnAssembler
from .chat_format import assistant_message
from .constraints import Constraint
from .decode import DecodeBatch, Sampled, batchable, sample, speculative_step
from .errors import ApertusError, TurnError
from .events import Done, PrefillProgress, Stats, TokenLogprobs, ToolCall
from .sampling import TokenSampler, new_key
from .turn import Turn

# Target time of one prefill chunk: it bounds how long a cancel, or the other turns' next tokens, wait.
PREFILL_SECONDS = 0.2
PREFILL_SECONDS_ALONE = 0.5  # with no other turn active, only a cancel waits
_prefill_rates: dict[int, float] = {}  # tokens/s learnt per model (by id), the next scheduler's first guess
MAX_ACTIVE = 32  # turns advanced at once; later ones wait their turn


class Run:
    """The engine-side state of one turn while it is being computed."""

    def __init__(self, turn: Turn):
        self.turn, self.session = turn, turn.session
        self.prompt = turn.prompt
        self.options = turn.options
        self.reused = self.session.reuse_prefix(self.prompt)
        # Speculative decoding reads the last prompt token in its first pass, with the draft's proposals.
        self.prefill_end = len(self.prompt) - (1 if self.session.draft_model is not None else 0)
        self.pos = self.reused
        self.cache = self.session.cache
        self.sampler = TokenSampler(self.options, new_key(self.options.seed))  # fresh entropy unless seeded
        self.assembler = TurnAssembler(self.session.tokenizer, self.options.stop, turn.start_channel)
        self.top_logprobs = self.options.logprobs
        self.constraint: Constraint | None = None
        if self.options.grammar is not None:
            self.constraint = Constraint(
                self.options.grammar,
                self.session.tokenizer,
                self.session.model.args.vocab_size,
                think=self.session.think,
                start_channel=turn.start_channel,
            )
        # Ids the head cannot produce (Apertus 1.5's image and audio ids) have no logit to penalise.
        head_rows = self.session.model.args.vocab_size
        self.recent = [t for t in self.prompt[-20:] if t < head_rows]
        self.pending: Sampled | None = None
        self.upcoming: Sampled | None = None
        self.group: DecodeBatch | None = None
        self.accepted = 0  # draft tokens accepted
        self.draft_unseen: list[int] = []
        self.started = time.perf_counter()
        self.first_token: float | None = None

    @property
    def generated(self) -> list[int]:
        return self.assembler.tokens

    @property
    def final(self) -> bool:
        """Whether the pending token is the last one `max_tokens` allows."""
        return len(self.generated) + 1 >= self.options.max_tokens

    def stats(self) -> Stats:
        end = time.perf_counter()
        first = self.first_token or end
        prefill_time = first - self.started  # the prompt is read once its first token is out, as mlx-lm counts
        prefilled, n = len(self.prompt) - self.reused, len(self.generated)
        return Stats(
            prompt_tokens=len(self.prompt),
            prefilled_tokens=prefilled,
            generated_tokens=n,
            time_to_first_token=first - self.turn.submitted,
            prompt_tps=prefilled / prefill_time if prefill_time > 0 else 0.0,
            generation_tps=(n - 1) / (end - first) if n > 1 and end > first else 0.0,
            peak_memory_gb=mx.get_peak_memory() / 1e9,
            draft_accepted=self.accepted if self.session.draft_model is not None else None,
            queued_seconds=self.started - self.turn.submitted,
        )


class Scheduler:
    """Owns the turns of one model; call `step()` on the model's thread while `busy`."""

    def __init__(self, model: Any):
        self.model = model
        self.waiting: deque[Turn] = deque()
        self.prefilling: list[Run] = []
        self.batch = DecodeBatch(model)
        self.solo: list[Run] = []  # decoding on their own: quantized or rotating caches
        self.speculative: list[Run] = []
        # Tokens/s, learnt from each chunk; a cautious first guess (a 32-token chunk) for a new model.
        self.prefill_rate = _prefill_rates.get(id(model), 160.0)
        self._runs: dict[int, Run] = {}  # by turn id

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self._runs)

    def submit(self, turn: Turn) -> None:
        self.waiting.append(turn)

    def step(self) -> None:
        """One round: admit, honour cancels, read prompt chunks, one decode step for each decoding turn."""
        self._admit()
        for run in list(self._runs.values()):
            if run.turn.cancelled.is_set():
                self._finish(run, "cancelled")
        self._prefill()
        groups = [self.batch] if self.batch.members else []
        groups += [run.group for run in self.solo]
        for group in groups:
            # No step when every member is about to emit its last allowed token.
            if not all(run.final for run in group.members):
                self._guard(list(group.members), group.dispatch)
        for group in groups:
            if group.members:
                self._emit_all(group)
        for run in list(self.speculative):
            self._guard([run], self._speculate, run)

    def settle(self, turn: Turn) -> None:
        """The consumer stopped reading: end the turn if it runs, and keep only what it received."""
        run = self._runs.get(turn.id)
        if run is not None:
            self._finish(run, "cancelled")
        elif turn in self.waiting:
            self.waiting.remove(turn)
            turn.commit()
        else:
            turn.recommit()
        turn.settled.set()

    def cancel_all(self, error: BaseException) -> None:
        """End every turn (engine shutdown): running ones are cancelled, waiting ones get `error`."""
        for run in list(self._runs.values()):
            self._guard([run], self._finish, run, "cancelled")
        while self.waiting:
            self.waiting.popleft().fail(error)

    def fail_all(self, error: BaseException) -> None:
        """End every turn with `error`, each chat left as it was before its turn."""
        for run in list(self._runs.values()):
            self._fail(run, error)
        while self.waiting:
            self.waiting.popleft().fail(error)

    # ---- admission and prefill ------------------------------------------------------------------

    def _admit(self) -> None:
        for turn in [t for t in self.waiting if t.cancelled.is_set()]:  # however long the queue
            self.waiting.remove(turn)
            turn.commit()
            turn.put(Done("cancelled", turn.empty_stats()))
        while self.waiting and len(self._runs) < MAX_ACTIVE:
            turn = self.waiting.popleft()
            try:
                run = Run(turn)
            except Exception as e:
                turn.fail(e)
                continue
            self._runs[turn.id] = run
            self.prefilling.append(run)

    def _prefill(self) -> None:
        """Read prompt chunks, each turn's in turn, until this step's time budget is spent.

        Several short prompts that arrive together are all read before the next decode step, so
        they start decoding in the same batch.
        """
        decoding = len(self._runs) - len(self.prefilling)
        budget = PREFILL_SECONDS if len(self._runs) > 1 else PREFILL_SECONDS_ALONE
        deadline = time.perf_counter() + budget
        seen: set[int] = set()
        while self.prefilling:
            left = deadline - time.perf_counter()
            run = self.prefilling[0]
            # The first chunk always runs; later ones only while the budget lasts, and a turn
            # reads one chunk per step while others decode, so their next tokens are not held up.
            if seen and (left * self.prefill_rate < 16 or (decoding and run.turn.id in seen)):
                return
            seen.add(run.turn.id)
            self.prefilling.pop(0)
            self._guard([run], self._prefill_chunk, run, max(left, 0.0))

    def _prefill_chunk(self, run: Run, seconds: float) -> None:
        size = max(16, min(int(self.prefill_rate * seconds), run.session.prefill_step_size))
        end = min(run.pos + size, run.prefill_end)
        chunk = run.prompt[run.pos : end]
        last = end == len(run.prompt)
        if chunk:
            # Time this chunk alone: the decode step still in flight is waited for first (its tokens are
            # read this step anyway), and the chunk's own work is waited for at its end.
            mx.synchronize()
            start = time.perf_counter()
            logits = self.model(mx.array(chunk)[None], cache=run.cache)
            if run.session.kv_quant:
                run.session.kv_quant.apply(run.cache)
            if run.session.draft_model is not None:
                run.session.draft_model(mx.array(chunk)[None], cache=run.session.draft_cache)
            if last:
                logits = logits[:, -1, :]
                mask = run.constraint.mask() if run.constraint is not None else None
                run.pending = sample(run, logits if mask is None else logits + mask.astype(logits.dtype))
                mx.eval(run.pending.arrays())
            else:
                mx.eval([c.state for c in run.cache])
            elapsed = time.perf_counter() - start
            # Grow at most 4x a chunk, so one slow chunk never overshoots the time target by much; a short
            # tail chunk, where fixed costs dominate, may raise the rate but not lower it.
            rate = min(len(chunk) / max(elapsed, 1e-6), 4 * self.prefill_rate)
            if len(chunk) == size or rate > self.prefill_rate:
                self.prefill_rate = _prefill_rates[id(self.model)] = rate
        run.pos = end
        if end > run.reused:
            run.turn.put(PrefillProgress(end - run.reused, len(run.prompt) - run.reused))
        if run.pos < run.prefill_end or (run.pending is None and run.session.draft_model is None):
            self.prefilling.append(run)  # more to read: back of the line, after the others' chunks
            return
        if run.session.draft_model is not None:
            run.draft_unseen = [run.prompt[-1]]
            self.speculative.append(run)
        elif batchable(run.cache):
            run.group = self.batch
            self.batch.add(run)
        else:
            run.group = DecodeBatch(self.model, run.session.kv_quant)
            run.group.add(run)
            self.solo.append(run)

    # ---- decoding ---------------------------------------------------------------------------------

    def _emit_all(self, group: DecodeBatch) -> None:
        members = list(group.members)
        tokens: list[int] = []
        self._guard(members, lambda: tokens.extend(group.read()))
        for run, token in zip(members, tokens, strict=False):
            self._guard([run], self._emit, run, token)
        group.advance()

    def _emit(self, run: Run, token: int) -> None:
        """Stream the events of one sampled token, and end the turn if it is over."""
        if run.first_token is None:
            run.first_token = time.perf_counter()
        sampled = run.pending
        if sampled is not None and sampled.logprob is not None:
            top = ()
            if sampled.top is not None:
                pairs = zip(sampled.top[0].tolist(), sampled.top[1].tolist(), strict=True)
                top = tuple((i, p) for i, p in pairs if p > -math.inf)  # a grammar's masked tokens are not alternatives
            run.turn.put(TokenLogprobs(token, sampled.logprob.item(), top))
        self._feed(run, token)

    def _feed(self, run: Run, token: int) -> bool:
        for event in run.assembler.feed(token):
            run.turn.put(event)
        run.recent.append(token)
        del run.recent[:-20]
        if run.assembler.finish:
            self._finish(run, run.assembler.finish)
        elif len(run.generated) >= run.options.max_tokens:
            self._finish(run, "length")
        else:
            return False
        return True

    def _speculate(self, run: Run) -> None:
        left = run.options.max_tokens - len(run.generated)
        tokens, run.draft_unseen, accepted = speculative_step(
            self.model,
            run.session.draft_model,
            run.cache,
            run.session.draft_cache,
            lambda logits: run.sampler(logits)[0],
            run.prompt[-1] if not run.generated else run.generated[-1],
            run.draft_unseen,
            min(run.session.num_draft_tokens, left - 1),
            run.session.kv_quant,
        )
        run.accepted += accepted
        if run.first_token is None:
            run.first_token = time.perf_counter()
        for token in tokens:
            if self._feed(run, token):
                break

    # ---- the end of a turn -----------------------------------------------------------------------

    def _leave(self, run: Run) -> None:
        """Take the run out of whatever list or batch it is in; its session gets its cache back."""
        self._runs.pop(run.turn.id, None)
        if run in self.prefilling:
            self.prefilling.remove(run)
        if run in self.speculative:
            self.speculative.remove(run)
        if run.group is not None:
            run.group.remove(run)
            if run in self.solo:
                self.solo.remove(run)
            run.group = None

    def _finish(self, run: Run, reason: str) -> None:
        self._leave(run)
        for event in run.assembler.close():
            run.turn.put(event)
        run.session.record_cached(run.prompt + run.generated)
        run.turn.commit()
        said = assistant_message(run.turn.events)  # everything produced: a consumer that reads on gets it all
        calls = [e for e in run.turn.events if isinstance(e, ToolCall)]
        answer, reasoning = said["content"], said.get("reasoning_content", "")
        run.turn.put(Done(reason, run.stats(), answer, reasoning, calls, list(run.generated)))

    def _guard(self, runs: list[Run], fn: Any, *args: Any) -> None:
        """Run `fn`; if it raises, fail those turns and leave their sessions as they were."""
        try:
            fn(*args)
        except Exception as e:
            error = e if isinstance(e, ApertusError) else TurnError.wrap(e)
            for run in runs:
                self._fail(run, error)

    def _fail(self, run: Run, error: BaseException) -> None:
        if run.turn.id not in self._runs:
            return
        try:
            self._leave(run)
        except Exception:
            run.session.reset_cache()  # the batch is broken: the next turn re-reads the chat
        run.session.rollback(run.prompt, run.reused)
        run.turn.fail(error)
