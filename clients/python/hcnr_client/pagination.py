"""Cursor pages. Iterating a page walks every item of every following page (fetched on
demand); `iter_pages()`, `has_next_page()` and `get_next_page()` step page by page."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from typing import Any, Generic, TypeVar

from hcnr_client._exceptions import HCNRError

T = TypeVar("T")


class SyncPage(Generic[T]):
    object = "list"

    def __init__(
        self,
        *,
        data: list[T],
        has_more: bool,
        next_cursor: Any,
        fetch: Callable[[Any], SyncPage[T]],
    ) -> None:
        self.data, self.has_more, self.next_cursor = data, has_more, next_cursor
        self._fetch = fetch

    def has_next_page(self) -> bool:
        return self.has_more and self.next_cursor is not None

    def get_next_page(self) -> SyncPage[T]:
        if not self.has_next_page():
            raise HCNRError("no next page; check has_next_page() first")
        return self._fetch(self.next_cursor)

    def iter_pages(self) -> Iterator[SyncPage[T]]:
        page = self
        while True:
            yield page
            if not page.has_next_page():
                return
            page = page.get_next_page()

    def __iter__(self) -> Iterator[T]:
        for page in self.iter_pages():
            yield from page.data

    def __repr__(self) -> str:
        return f"SyncPage(data=[{len(self.data)} items], has_more={self.has_more})"


class AsyncPage(Generic[T]):
    object = "list"

    def __init__(
        self,
        *,
        data: list[T],
        has_more: bool,
        next_cursor: Any,
        fetch: Callable[[Any], Awaitable[AsyncPage[T]]],
    ) -> None:
        self.data, self.has_more, self.next_cursor = data, has_more, next_cursor
        self._fetch = fetch

    def has_next_page(self) -> bool:
        return self.has_more and self.next_cursor is not None

    async def get_next_page(self) -> AsyncPage[T]:
        if not self.has_next_page():
            raise HCNRError("no next page; check has_next_page() first")
        return await self._fetch(self.next_cursor)

    async def iter_pages(self) -> AsyncIterator[AsyncPage[T]]:
        page = self
        while True:
            yield page
            if not page.has_next_page():
                return
            page = await page.get_next_page()

    async def __aiter__(self) -> AsyncIterator[T]:
        async for page in self.iter_pages():
            for item in page.data:
                yield item

    def __repr__(self) -> str:
        return f"AsyncPage(data=[{len(self.data)} items], has_more={self.has_more})"


class AsyncPaginator(Generic[T]):
    """What an async `list()` returns: `await` it for the first page, or `async for` over
    it for every item."""

    def __init__(self, first: Callable[[], Awaitable[AsyncPage[T]]]) -> None:
        self._first = first

    def __await__(self) -> Generator[Any, None, AsyncPage[T]]:
        return self._first().__await__()

    async def __aiter__(self) -> AsyncIterator[T]:
        page = await self._first()
        async for item in page:
            yield item
