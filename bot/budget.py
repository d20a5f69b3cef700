"""How many times a job may write its status comment: the Hub sends a webhook delivery for every
comment created or edited, and a webhook gets 1,000 deliveries a day, so a job reports at
milestones, never on a timer.

A job's comment writes, at most :data:`COMMENTS_PER_JOB`::

    queued (1)  ->  queue positions (rationed)  ->  started (1)  ->  25/50/75 % (3)
                ->  publishing (1)  ->  done / failed / cancelled (1)

Every write but the last holds back a reserve for the milestones still to come, so the final
word always fits; queue positions get what is left (at most 3), shown only when the place has at
least halved since it was last shown, or the job is next. Counts live in memory: a restarted
bot starts its jobs' counts again (the job itself restarts from scratch too).
"""

from __future__ import annotations

import threading

COMMENTS_PER_JOB = 10
PROGRESS_MILESTONES = (0.25, 0.5, 0.75)
# writes still to come once a job leaves the queue: started, milestones, publishing, final
AFTER_QUEUE = 1 + len(PROGRESS_MILESTONES) + 1 + 1


class CommentBudget:
    """Counts the status-comment writes of each job in this process."""

    def __init__(self, per_job: int = COMMENTS_PER_JOB) -> None:
        self.per_job = per_job
        self._lock = threading.Lock()
        self._spent: dict[str, int] = {}
        self._shown_position: dict[str, int] = {}

    def spent(self, job_id: str) -> int:
        with self._lock:
            return self._spent.get(job_id, 0)

    def take(self, job_id: str, reserve: int = 0) -> bool:
        """Spend one write if ``reserve`` more would still fit after it; False (nothing spent) if not."""
        with self._lock:
            spent = self._spent.get(job_id, 0)
            if spent + 1 + reserve > self.per_job:
                return False
            self._spent[job_id] = spent + 1
            return True

    def queued(self, job_id: str, position: int | None) -> None:
        """The job's first comment (its place in the queue) was posted."""
        with self._lock:
            self._spent[job_id] = self._spent.get(job_id, 0) + 1
            if position:
                self._shown_position[job_id] = position

    def take_position(self, job_id: str, position: int) -> bool:
        """Whether to show a waiting job's new place: next in line, or at most half the last shown."""
        with self._lock:
            last = self._shown_position.get(job_id)
        worth = position == 1 or last is None or position <= last // 2
        if last == position or not worth or not self.take(job_id, reserve=AFTER_QUEUE):
            return False
        with self._lock:
            self._shown_position[job_id] = position
        return True

    def forget(self, job_id: str) -> None:
        """The job has ended: its counts are no longer needed."""
        with self._lock:
            self._spent.pop(job_id, None)
            self._shown_position.pop(job_id, None)
