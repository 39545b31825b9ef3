"""``fab map``'s schedule: blocks of items cut from what the store has not finished yet.

A map block is a list of items (their input sequence numbers ``seqs``), numbered in a
space of its own: the store's ``blocks`` rows of a map run carry block numbers, not item
numbers. Each coordinator session numbers its new blocks past the highest block number
committed so far, so a resumed run never reuses one (the store commits a block number
once). Items come from an iterator of pending items (in input order, the finished ones
skipped: MapJob builds it from the store), so a million items are never all in memory:
only the blocks in flight and waiting to be redone hold theirs.

What the engine's Schedule does (cluster/scheduler.py: redo first, endgame duplicates,
task bookkeeping) is inherited; on top of it:

- ``requeue(items, avoid)``: items of a committed block to try again (a retry after a
  failure, items a host left for later) go out as a new block, on another host when one
  is up;
- a block whose worker died (``split_on_death``) is cut in halves when it comes back, so
  the item that kills its worker ends up alone (the endgame never copies it: ``may_copy``);
  such an item that killed its worker ``MAX_CRASHES`` times goes out once more as a *verdict* block (no item is run: the
  host answers an empty task and the item is committed as ``crashed`` with that block,
  exactly once like any other result).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .scheduler import Block, Schedule

# An item that killed the worker running it this many times is failed as crashed.
MAX_CRASHES = 3


@dataclass(eq=False)
class MapBlock(Block):
    """A block of items: ``seqs`` (input numbers); ``items`` their ``mapinput.Item``s (None
    for --range, computed from the seq); ``verdict`` items to commit as crashed, unrun."""

    seqs: list = field(default_factory=list)
    items: Optional[list] = None
    verdict: bool = False
    split_on_death: bool = False
    final: Optional[int] = None  # items that got their final status with this block

    __eq__ = object.__eq__  # one block is one block (never compared field by field)
    __hash__ = object.__hash__

    @property
    def size(self) -> int:
        if self.final is not None:
            return self.final
        return len(self.seqs)


class MapSchedule(Schedule):
    """The schedule of a map run (see the module docstring).

    ``pending`` yields ``(seq, item)`` of the items left, in input order (``item`` None
    for --range); ``left`` is how many it will yield; ``base`` the first free block number.
    ``weight(item)`` is an item's bytes in a task (its --files file), for ``max_task_bytes``.
    """

    def __init__(self, pending, left: int, base: int, min_block: int = 1,
                 duplicates: bool = True, weight=None, max_task_bytes: int = 0):
        super().__init__(1, 0, [], min_block)
        # --range: the seqs left as [lo, hi] gaps, cut as range objects (nothing per item)
        self.seq_gaps = pending if isinstance(pending, list) else None
        self.pending = iter(()) if self.seq_gaps is not None else iter(pending)
        self.left = left
        self.remaining_at_start = left
        self.total = left
        self.next_lo = max(1, base)
        self.duplicates = duplicates
        self.weight = weight
        self.max_task_bytes = max_task_bytes
        self._peeked: Optional[tuple] = None
        # Per item seq, only for items that went wrong: attempts used so far (failures and
        # crashes both number attempts), retries used (failures), times it killed its worker.
        self.attempts: dict = {}
        self.failures: dict = {}
        self.crashes: dict = {}

    # ------------------------------------------------------------ queries

    def uncut(self) -> int:
        return self.left

    def finished(self) -> bool:
        return not self.left and not self.redo and not self.in_flight

    def waiting(self, limit: int = 5) -> str:
        blocks = list(self.redo)
        named = [f"items {_seqs_text(b.seqs)}" for b in blocks[:limit]]
        more = sum(len(b.seqs) for b in blocks[limit:]) + self.left
        return ", ".join(named) + (f" and {more} more items" if more else "")

    # ------------------------------------------------------------ handing out

    def new_block(self, seqs: list, items: Optional[list], **kwargs) -> MapBlock:
        lo = self.next_lo
        self.next_lo += max(1, len(seqs))
        return MapBlock(lo, lo + max(1, len(seqs)) - 1, seqs=seqs, items=items, **kwargs)

    def next_block(self, host: str, size: int, allow_verify: bool = True,
                   queued: bool = False) -> Optional[tuple]:
        for block in list(self.redo):
            if self.shuns(block, host):
                continue
            self.redo.remove(block)
            return self._assign(block, host)
        if not self.left:
            return None
        size = max(self.min_block, size)
        if self.seq_gaps is not None:
            return self._cut_range(host, size)
        seqs, items, weight = [], [], 0
        while len(seqs) < size:
            nxt = self._next_pending()
            if nxt is None:
                break
            if self.weight is not None and self.max_task_bytes and seqs:
                cost = self.weight(nxt[1])
                if weight + cost > self.max_task_bytes:
                    break
            self._peeked = None
            seqs.append(nxt[0])
            items.append(nxt[1])
            if self.weight is not None:
                weight += self.weight(nxt[1])
        if not seqs:
            self.left = 0
            return None
        self.left = max(0, self.left - len(seqs))
        if self.left and self._next_pending() is None:
            self.left = 0
        keep = items if any(item is not None for item in items) else None
        return self._assign(self.new_block(seqs, keep), host)

    def _cut_range(self, host: str, size: int) -> Optional[tuple]:
        if not self.seq_gaps:
            self.left = 0
            return None
        gap = self.seq_gaps[0]
        hi = min(gap[1], gap[0] + size - 1)
        seqs = range(gap[0], hi + 1)
        if hi == gap[1]:
            self.seq_gaps.pop(0)
        else:
            gap[0] = hi + 1
        self.left = max(0, self.left - len(seqs))
        return self._assign(self.new_block(seqs, None), host)

    def _next_pending(self) -> Optional[tuple]:
        if self._peeked is None:
            self._peeked = next(self.pending, None)
        return self._peeked

    def duplicate_for(self, host: str, now: Optional[float] = None, own_seconds=None):
        if not self.duplicates:
            return None
        return super().duplicate_for(host, now, own_seconds)

    def may_copy(self, block: Block) -> bool:
        """Not a block whose worker died running it (``split_on_death``: it is cut in halves once
        its last copy is back; an item alone: its deaths are counted one at a time), nor a
        verdict block: a copy of it would only die too, and each death left the other copy in
        flight, so the block was never split; two hosts took turns copying and dying on it
        hundreds of times (seen on the Dask engine's quick round trips)."""
        if getattr(block, "split_on_death", False) or getattr(block, "verdict", False):
            return False
        seqs = getattr(block, "seqs", ())
        return not (len(seqs) == 1 and seqs[0] in self.crashes)  # an item alone that killed a worker

    # ------------------------------------------------------------ outcomes

    def requeue(self, seqs: list, items: Optional[list], avoid: Optional[str] = None) -> MapBlock:
        """Items to run again as a new block (first in line), elsewhere than ``avoid`` if possible."""
        block = self.new_block(list(seqs), list(items) if items is not None else None)
        if avoid:
            block.elsewhere.add(avoid)
        self.redo.append(block)
        return block

    def give_back(self, task_id: int, failed: bool = False, invalid: bool = False,
                  avoid: bool = False, **kwargs) -> Optional[Block]:
        block = super().give_back(task_id, failed=failed, invalid=invalid, avoid=avoid)
        if block is None or block.copies or not getattr(block, "split_on_death", False):
            return block
        # Its worker died: cut it in halves (new numbers), so the culprit ends up alone.
        block.split_on_death = False
        if len(block.seqs) > 1 and block in self.redo:
            self.redo.remove(block)
            half = len(block.seqs) // 2
            for part in (slice(0, half), slice(half, None)):
                items = block.items[part] if block.items is not None else None
                new = self.requeue(block.seqs[part], items)
                new.elsewhere |= block.elsewhere
        return block

    def crashed(self, block: MapBlock, before: int = 0) -> bool:
        """Note that ``block`` (one item) killed its worker (``before``: times it did in earlier
        sessions); True when it is now failed as crashed (it comes back as a verdict block)."""
        seq = block.seqs[0]
        self.crashes[seq] = self.crashes.get(seq, 0) + 1
        self.attempts[seq] = self.attempts.get(seq, 0) + 1
        if before + self.crashes[seq] >= MAX_CRASHES:
            block.verdict = True
            return True
        return False


def _seqs_text(seqs: list) -> str:
    if len(seqs) == 1:
        return str(seqs[0])
    return f"{seqs[0]}..{seqs[-1]}" if seqs == list(range(seqs[0], seqs[-1] + 1)) else \
        ", ".join(map(str, seqs[:3])) + (" ..." if len(seqs) > 3 else "")
