"""One progress bar per command: tensors and bytes with an ETA, silent when quiet or not a terminal."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                           TimeRemainingColumn)

Advance = Callable[[int, str], None]  # (bytes done, tensor name)


class _Silent:
    def __call__(self, nbytes: int, name: str) -> None:
        pass

    def status(self, text: str) -> None:
        pass


@contextmanager
def progress_bar(description: str, total_bytes: int, total_tensors: int, *, quiet: bool = False) -> Iterator[Advance]:
    """Yields advance(nbytes, tensor name); advance.status(text) shows what a long step is doing
    (GPTQ's block and stage), in the bar's last column until the next tensor."""
    console = Console(file=sys.stderr)
    if quiet or not console.is_terminal:
        yield _Silent()
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
               TextColumn("{task.fields[tensors]}"), TimeRemainingColumn(), TextColumn("{task.fields[name]}"))
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total_bytes, tensors=f"0/{total_tensors}", name="")
        done = [0]

        class _Bar:
            def __call__(self, nbytes: int, name: str) -> None:
                if name:
                    done[0] += 1
                bar.update(task, advance=nbytes, name=name, tensors=f"{done[0]}/{total_tensors} tensors")

            def status(self, text: str) -> None:
                bar.update(task, name=text)

        yield _Bar()
