"""Task Fetching Unit + executor: start every task as soon as its inputs exist, several at once.

    tfu = TaskFetchingUnit(toolbox, max_concurrency=4, timeline=tl)
    tfu.submit(task)             # as soon as the parser emits it; it waits for its dependencies
    records = await tfu.wait()   # {id: TaskRecord(status, observation, inputs, start, end)}

    plan = await execute_stream(pieces, PlanParser(toolbox), tfu)   # parse while it streams

The original LLMCompiler polls its task list every 10 ms; here each task is an asyncio task that
awaits its dependencies' completion events, which is the same schedule without the polling delay.
A task starts only when every task it references finished ok: if one failed or was dropped, the
task is skipped with an observation that says why, so nothing runs with a wrong input.
Substitution replaces `$N` references by results (whole values keep their type; inside strings
their text). A semaphore bounds how many tools run at once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from workbench.compiler.parser import Plan, PlanParser, Task, substitute
from workbench.compiler.timeline import Timeline
from workbench.compiler.tools import Observation, ToolArgumentError, Toolbox


@dataclass
class TaskRecord:
    """The life of one task: when it was planned, started, ended, and what it returned."""

    task: Task
    status: str = "waiting"          # waiting | running | done | error | skipped | cancelled
    observation: Observation | None = None
    inputs: dict | None = None       # arguments after substitution
    planned: float | None = None     # when its line was parsed (timeline seconds)
    start: float | None = None
    end: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "done"

    @property
    def result(self):
        return self.observation.value if self.observation and self.observation.ok else None

    def observation_text(self, limit: int = 300) -> str:
        if self.observation is None:
            return f"({self.status})"
        text = self.observation.text
        return text if len(text) <= limit else text[:limit] + "..."


class TaskFetchingUnit:
    """Holds submitted tasks and runs each once its dependencies are done (bounded concurrency)."""

    def __init__(self, toolbox: Toolbox, max_concurrency: int = 8, timeline: Timeline | None = None,
                 timeout: float | None = None, lane: str = "tasks"):
        self.toolbox = toolbox
        self.timeline = timeline or Timeline()
        self.timeout, self.lane = timeout, lane
        self.records: dict[int, TaskRecord] = {}
        self._done: dict[int, asyncio.Event] = {}
        self._jobs: dict[int, asyncio.Task] = {}
        self._sem = asyncio.Semaphore(max(1, int(max_concurrency)))

    @property
    def results(self) -> dict[int, object]:
        return {i: r.result for i, r in self.records.items() if r.ok}

    def submit(self, task: Task) -> TaskRecord:
        """Schedule a task (call from inside the event loop). The join pseudo-task is recorded only."""
        rec = TaskRecord(task, planned=self.timeline.now())
        self.records[task.idx] = rec
        self._done[task.idx] = asyncio.Event()
        if task.is_join:
            rec.status = "done"
            self._done[task.idx].set()
            return rec
        self._jobs[task.idx] = asyncio.ensure_future(self._run(rec))
        return rec

    async def _run(self, rec: TaskRecord) -> None:
        task = rec.task
        try:
            for d in task.deps:
                if d not in self._done:
                    self._finish(rec, "skipped", f"input task {d} was never planned")
                    return
                await self._done[d].wait()
                if not self.records[d].ok:
                    self._finish(rec, "skipped", f"input task {d} did not succeed "
                                 f"({self.records[d].status})")
                    return
            async with self._sem:
                rec.status, rec.start = "running", self.timeline.now()
                results = self.results
                tool = self.toolbox[task.tool]
                try:
                    args = substitute(task.args, results)
                    kwargs = substitute(task.kwargs, results)
                    rec.inputs = tool.bind(args, kwargs) if args else dict(kwargs)
                except ToolArgumentError as err:
                    rec.observation = Observation(False, None, str(err))
                except (KeyError, IndexError, TypeError, AttributeError) as err:
                    rec.observation = Observation(False, None, f"cannot read {err} from an "
                                                  "input task's result")
                else:
                    rec.observation = await tool.acall(rec.inputs, self.timeout)
                rec.end = self.timeline.now()
                rec.status = "done" if rec.observation.ok else "error"
                self.timeline.add(self.lane, str(task), rec.start, rec.end, "tool",
                                  idx=task.idx, status=rec.status, tool=task.tool,
                                  planned=rec.planned, deps=list(task.deps))
        except asyncio.CancelledError:
            rec.status = "cancelled"
            raise
        finally:
            self._done[task.idx].set()

    def _finish(self, rec: TaskRecord, status: str, why: str) -> None:
        rec.status, rec.observation = status, Observation(False, None, why)

    def cancel_pending(self) -> None:
        """Cancel tasks that have not started (a rejected plan); running ones finish."""
        for idx, job in self._jobs.items():
            if self.records[idx].status == "waiting":
                job.cancel()

    async def wait(self) -> dict[int, TaskRecord]:
        """Wait for every submitted task; return the records by id."""
        if self._jobs:
            await asyncio.gather(*self._jobs.values(), return_exceptions=True)
        for rec in self.records.values():
            if rec.status == "waiting":
                rec.status = "cancelled"
        return self.records


async def execute_stream(pieces: AsyncIterator[str] | Iterable[str], parser: PlanParser,
                         tfu: TaskFetchingUnit) -> Plan:
    """Parse streamed plan text and submit each task the moment its line completes."""
    async def consume(piece: str) -> bool:
        for event in parser.feed(piece):
            if isinstance(event, Task):
                tfu.submit(event)
        if parser.plan.rejected:
            tfu.cancel_pending()
            return False
        return not parser.plan.ended

    if hasattr(pieces, "__aiter__"):
        async for piece in pieces:
            if not await consume(piece):
                break
    else:
        for piece in pieces:
            if not await consume(piece):
                break
            await asyncio.sleep(0)
    for event in parser.close():
        if isinstance(event, Task):
            tfu.submit(event)
    await tfu.wait()
    return parser.plan


async def iterate_in_thread(make_stream, stop: threading.Event | None = None
                            ) -> AsyncIterator[str]:
    """Run a blocking text stream (e.g. a LocalChat reply) in a thread; yield its pieces here.

    `make_stream()` is called in the thread and must return an iterable of str (anything with a
    `close()` is closed when `stop` is set or the consumer stops early).
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = stop or threading.Event()
    DONE = object()

    def work():
        stream = None
        try:
            stream = make_stream()
            for piece in stream:
                loop.call_soon_threadsafe(queue.put_nowait, piece)
                if stop.is_set():
                    break
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            loop.call_soon_threadsafe(queue.put_nowait, err)
        finally:
            if stop.is_set() and hasattr(stream, "close"):
                stream.close()
            loop.call_soon_threadsafe(queue.put_nowait, DONE)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item = await queue.get()
            if item is DONE:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        await asyncio.to_thread(thread.join)
