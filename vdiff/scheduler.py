"""Who runs in the next step: admission in arrival order, up to max_num_seqs and a canvas budget.

Requests join and leave between steps. A request is admitted when a slot is free and its canvas
fits the per-forward token budget (the first request always fits, so nothing starves); the rest
wait in FIFO order. Pure bookkeeping: no tensors, no model.
"""

from __future__ import annotations

import time
from collections import deque

from vdiff.request import Request, RequestStatus


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int | None = None) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def schedule(self) -> list[Request]:
        """The running set for the next step, after admitting whoever fits."""
        while self.waiting and self._can_admit(self.waiting[0]):
            request = self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            request.scheduled_time = time.perf_counter()
            request.state = request.strategy.start(request)
            self.running.append(request)
        return self.running

    def retire_finished(self) -> None:
        self.running = [r for r in self.running if not r.is_finished]

    def remove(self, request_id: str) -> Request | None:
        """Take a request out wherever it is; None when it is unknown or already gone."""
        for queue in (self.running, self.waiting):
            for request in queue:
                if request.request_id == request_id:
                    queue.remove(request)
                    return request
        return None

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def _can_admit(self, request: Request) -> bool:
        if len(self.running) >= self.max_num_seqs:
            return False
        if self.max_num_batched_tokens is None or not self.running:
            return True
        # a padded batch costs (B + CFG rows) x the longest canvas
        rows = sum(1 + (r.params.cfg_scale > 0) for r in (*self.running, request))
        longest = max(r.canvas_len for r in (*self.running, request))
        return rows * longest <= self.max_num_batched_tokens
