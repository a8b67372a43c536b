"""A file's bytes read by position, a page at a time, without mapping the file.

The web page reads a served model file's header in the server's process (``toolkit.model_header``). Over a
memory map, a file that its operator cuts short while it is read (``cp`` truncates before it writes) makes
the next access past its new end a SIGBUS, which ends the whole server. Read with ``pread`` instead, a file
that changed under the reader is a short read: a ``ValueError`` for this one request.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import BinaryIO, overload

PAGE_BYTES = 64 * 1024
"""What one read takes from the file."""

KEPT_PAGES = 64
"""Pages kept, the most recently read (4 MiB): a walk reads a file's header front to back, jumping over
the weights it skips."""


class FileChanged(ValueError):
    """The file ended before a position its size said was there: it changed while it was read."""


class FileBytes:
    """``file``'s bytes as ``bytes`` would give them (an index: an int; a slice: bytes), read on demand."""

    def __init__(self, file: BinaryIO) -> None:
        self._fd = file.fileno()
        self._size = os.fstat(self._fd).st_size
        self._pages: OrderedDict[int, bytes] = OrderedDict()
        self._base, self._page = 0, b""  # the page read last, and where it starts

    def __len__(self) -> int:
        return self._size

    @overload
    def __getitem__(self, index: int, /) -> int: ...

    @overload
    def __getitem__(self, index: slice, /) -> bytes: ...

    def __getitem__(self, index: int | slice, /) -> int | bytes:
        if type(index) is int:  # the walk's byte by byte reads: from the page of the last one, mostly
            offset = index - self._base
            if 0 <= offset < len(self._page):
                return self._page[offset]
        return self._slow(index)

    def _slow(self, index: int | slice) -> int | bytes:
        if isinstance(index, slice):
            start, stop, step = index.indices(self._size)
            if step != 1:
                raise ValueError("FileBytes slices are contiguous")
            return self._read(start, max(0, stop - start))
        if index < 0:
            index += self._size
        if not 0 <= index < self._size:
            raise IndexError(index)
        number, offset = divmod(index, PAGE_BYTES)
        page = self._pages.get(number)
        if page is None:
            page = self._read(number * PAGE_BYTES, min(PAGE_BYTES, self._size - number * PAGE_BYTES))
            self._pages[number] = page
            if len(self._pages) > KEPT_PAGES:
                self._pages.popitem(last=False)
        else:
            self._pages.move_to_end(number)
        self._base, self._page = number * PAGE_BYTES, page
        return page[offset]

    def _read(self, start: int, length: int) -> bytes:
        data = os.pread(self._fd, length, start)
        if len(data) != length:
            raise FileChanged(
                f"the file ended at byte {start + len(data)}, before the {self._size} bytes it had when it was "
                "opened: it changed while it was read"
            )
        return data
