"""Which prompt prefixes each node has served, to route a prompt where its KV cache already is.

A per-node prefix tree over the prompt's text in blocks of ``BLOCK_CHARS`` characters, stored as the
hash chain of its paths (block i's key hashes block i with the key of block i-1, as a paged KV cache
keys its blocks): a prompt matches a node for as many leading blocks as the node's tree has. Each
node keeps its most recently used ``max_blocks`` paths, so memory is bounded.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Iterable

BLOCK_CHARS = 16


def block_keys(text: str) -> list[tuple[bytes, int]]:
    """The chained key of each leading block of ``text`` and the number of characters it covers."""
    keys = []
    parent = b""
    for end in range(BLOCK_CHARS, len(text) + BLOCK_CHARS, BLOCK_CHARS):
        chunk = text[end - BLOCK_CHARS : end]
        parent = hashlib.blake2b(parent + chunk.encode(), digest_size=12).digest()
        keys.append((parent, min(end, len(text))))
    return keys


class PrefixIndex:
    def __init__(self, max_blocks: int = 65536) -> None:
        self.max_blocks = max_blocks
        self._trees: dict[str, collections.OrderedDict[bytes, None]] = {}

    def insert(self, url: str, text: str) -> None:
        tree = self._trees.setdefault(url, collections.OrderedDict())
        for key, _ in block_keys(text):
            tree[key] = None
            tree.move_to_end(key)
        while len(tree) > self.max_blocks:
            tree.popitem(last=False)

    def match(self, text: str, urls: Iterable[str]) -> dict[str, int]:
        """For each of ``urls``, how many leading characters of ``text`` its tree holds."""
        keys = block_keys(text)
        matched = {}
        for url in urls:
            tree = self._trees.get(url)
            length = 0
            if tree is not None:
                for key, end in keys:
                    if key not in tree:
                        break
                    length = end
            matched[url] = length
        return matched

    def forget(self, url: str) -> None:
        self._trees.pop(url, None)

    def size(self, url: str) -> int:
        return len(self._trees.get(url, ()))
