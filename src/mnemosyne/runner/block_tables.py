"""Every live request's KV pages in one device matrix, one row each, grown in place by the plan's
new block ids. Kernels read pages through a request's row; nothing is rebuilt per step. A host copy
of each row gives new tokens their cache slots without a device lookup, and host-side runs of
consecutive pages let a contiguous stretch of KV be read as a strided view."""

from __future__ import annotations

from array import array

import torch


class BlockTables:
    def __init__(self, max_rows: int, max_pages: int, page_size: int, device: torch.device,
                 reserved_rows: int = 0):
        self.page_size = page_size
        self.ids = torch.zeros(max_rows, max_pages, dtype=torch.int32, device=device)
        """[max_rows, max_pages] int32 page ids; row r belongs to one live request."""
        self._free_rows = list(range(max_rows - 1 - reserved_rows, -1, -1))
        """The last reserved_rows rows are never handed out (they stay all zeros)."""
        self.row: dict[str, int] = {}
        self.pages: dict[str, array] = {}
        """Per request, its row of `ids` on the host: array('i') of page ids in position order."""
        self.runs: dict[str, list[list[int]]] = {}
        """Per request, [first_page, num_pages] runs of consecutive page ids, in position order."""

    def add(self, request_id: str) -> None:
        if not self._free_rows:
            raise RuntimeError("more live requests than block-table rows (max_num_seqs)")
        self.row[request_id] = self._free_rows.pop()
        self.pages[request_id] = array("i")
        self.runs[request_id] = []

    def remove(self, request_id: str) -> None:
        row = self.row.pop(request_id, None)
        if row is not None:
            self._free_rows.append(row)
            del self.pages[request_id], self.runs[request_id]

    def append(self, request_id: str, page_ids: tuple[int, ...]) -> None:
        """Add pages at the end of the request's table: one small host-to-device copy, in stream order
        (the host does not wait for the kernels queued before it, which read only earlier pages)."""
        if not page_ids:
            return
        pages = self.pages[request_id]
        start, end = len(pages), len(pages) + len(page_ids)
        if end > self.ids.shape[1]:
            raise RuntimeError(f"request {request_id} needs {end} pages, more than max_model_len allows")
        new = torch.tensor(page_ids, dtype=torch.int32)
        if self.ids.is_cuda:
            # Pinned, so the copy is truly asynchronous (a pageable one may wait for the stream). The
            # caching host allocator does not hand this memory out again before the copy has run.
            new = new.pin_memory()
        self.ids[self.row[request_id], start:end].copy_(new, non_blocking=True)
        pages.extend(page_ids)
        runs = self.runs[request_id]
        for page in page_ids:
            if runs and runs[-1][0] + runs[-1][1] == page:
                runs[-1][1] += 1
            else:
                runs.append([page, 1])

    def slots(self, request_id: str, start: int, end: int) -> array:
        """array('q') of the cache slots of the request's token positions [start, end) (counted from the
        start of its KV on this table): host work proportional to end - start."""
        pages, size = self.pages[request_id], self.page_size
        out = array("q")
        for index in range(start // size, -(-end // size)):
            first = pages[index] * size
            out.extend(range(first + max(start - index * size, 0), first + min(end - index * size, size)))
        return out

    def slot_runs(self, request_id: str, num_tokens: int) -> tuple[tuple[int, int], ...]:
        """Cache slot ranges [start, end) holding the request's first num_tokens tokens."""
        out, left = [], num_tokens
        for first, count in self.runs[request_id]:
            if left <= 0:
                break
            n = min(left, count * self.page_size)
            out.append((first * self.page_size, first * self.page_size + n))
            left -= n
        return tuple(out)
