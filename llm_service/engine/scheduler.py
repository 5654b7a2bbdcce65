"""Which sequences run in the next step, and how many of their tokens: pure logic over token counts.

Every step has a token budget. Running sequences come first, oldest first: a decoding sequence needs
one token, a sequence still in prefill gets a chunk of what is left of the budget (chunked prefill:
a long prompt never stalls the decodes). Then waiting sequences are admitted in arrival order while
budget, sequence slots and KV blocks last, starting after their longest cached prefix; one whose next
block a running sequence's prefill is computing waits for it (and then takes it from the cache). When
a running sequence cannot get a block, the newest running sequence is preempted: its blocks are freed
and it goes back to the front of the queue, to be recomputed (its prompt and output so far) later.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from llm_service.engine.block_manager import BlockManager
from llm_service.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSequence:
    seq: Sequence
    start: int  # first token computed this step (== seq.num_computed_tokens when scheduled)
    num_tokens: int

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def samples(self) -> bool:
        """Whether this step reaches the sequence's last token, so its logits give a new token."""
        return self.end == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        assert max_num_seqs > 0 and max_num_batched_tokens > 0
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if not out.preempted:  # blocks ran out this step: admitting more would only thrash
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new = min(seq.num_uncomputed_tokens, budget)
            while not self.block_manager.allocate(seq, num_new):
                victim = self.running.pop()  # the newest running sequence
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    return budget
            out.scheduled.append(ScheduledSequence(seq, seq.num_computed_tokens, num_new))
            budget -= num_new
            index += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        if not self.waiting:
            return
        manager = self.block_manager
        in_prefill = self._blocks_in_prefill()
        deferred: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cached = manager.cached_prefix(seq)
            if manager.next_prompt_block(seq, len(cached)) in in_prefill:
                deferred.append(self.waiting.popleft())  # computed by then: its KV comes from the cache
                continue
            num_new = min(seq.num_tokens - len(cached) * manager.block_size, budget)
            if not manager.allocate(seq, num_new, cached):
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = seq.num_computed_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSequence(seq, seq.num_computed_tokens, num_new))
            budget -= num_new
            in_prefill.update(manager.uncomputed_prompt_blocks(seq))
        self.waiting.extendleft(reversed(deferred))

    def _blocks_in_prefill(self) -> set[bytes]:
        """The prompt blocks running sequences are computing. A waiting sequence whose next block to
        compute is one of them waits: once registered, the block comes from the prefix cache, instead
        of being computed twice (requests with the same image arriving together)."""
        pending: set[bytes] = set()
        for seq in self.running:
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                pending.update(self.block_manager.uncomputed_prompt_blocks(seq))
        return pending

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def update(self, out: SchedulerOutput) -> None:
        """After the step ran: its tokens' KV is computed; hash the blocks they filled."""
        for item in out.scheduled:
            item.seq.num_computed_tokens = item.end
            self.block_manager.register_full_blocks(item.seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence wherever it is and free its blocks now."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
