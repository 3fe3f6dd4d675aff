"""`SuffixIndex`: token sequences searched as a suffix tree would be, in numpy.

Suffix decoding (SuffixDecoding, arXiv 2411.04975) looks up a request's latest tokens (the
pattern) in a suffix tree of earlier text, walks from the deepest node that matches along the
most frequent children, and drafts that path while its estimated probability (a child's count
over its parent's) holds. The tree's nodes are only ever visited as sets of occurrences: the
node for pattern P is the set of positions where P ends, a child's count is how many of them
continue with its token. So this index keeps the text and, per token, the positions it is at,
and computes those sets when asked:

    match(P)   the positions where P's last token is, narrowed one token back at a time while
               some still match: the deepest node, [C] positions, and its depth m
    walk(C)    per step the most frequent next token of the occurrences left (ties: the most
               recent), its probability the product of count / parent count; the occurrences
               that continue with it go on

A few numpy passes over the occurrences of one token, not over the text: microseconds for
contexts of tens of thousands of tokens. Documents are separated by SEP (never a token), so no
match or walk crosses from one into the next; an erased document's tokens become SEP in place.
Memory: 8 bytes per token (the text, int32, and its entry in a position list, int32).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable

import numpy as np

SEP = -1  # between documents, and over erased ones


class SuffixIndex:
    def __init__(self) -> None:
        self._text = np.full(256, SEP, np.int32)
        self.size = 0
        self._where: dict[int, array] = {}  # token -> its positions, ascending

    @property
    def text(self) -> np.ndarray:  # [size] int32
        return self._text[: self.size]

    def new_document(self) -> int:
        """Starts a document (after a separator); its first position."""
        self._grow(1)
        self._text[self.size] = SEP
        self.size += 1
        return self.size

    def extend(self, tokens: np.ndarray) -> None:
        """Appends `tokens` ([n] int32, all >= 0) to the last document."""
        n = len(tokens)
        if n == 0:
            return
        self._grow(n)
        start = self.size
        self._text[start : start + n] = tokens
        self.size += n
        if n < 16:  # a step's few tokens
            for i, t in enumerate(tokens.tolist()):
                self._positions(t).append(start + i)
            return
        order = np.argsort(tokens, kind="stable")  # positions grouped by token, ascending
        ranked = tokens[order]
        cuts = np.flatnonzero(ranked[1:] != ranked[:-1]) + 1
        positions = (order + start).astype(np.int32)
        for t, group in zip(
            ranked[np.r_[0, cuts]].tolist(), np.split(positions, cuts), strict=True
        ):
            self._positions(t).frombytes(group.tobytes())

    def erase(self, start: int, end: int) -> None:
        """Forgets positions [start, end): they match and continue nothing from now on (their
        entries in the position lists are skipped when read)."""
        self._text[start:end] = SEP

    def match(self, pattern: np.ndarray, max_len: int) -> tuple[int, np.ndarray]:
        """The longest suffix of `pattern` ([P] int32, newest last), of at most max_len tokens,
        that occurs followed by something: its length m and the positions where its
        occurrences end ([C] int32, ascending); (0, []) if not even the last token does."""
        listed = self._where.get(int(pattern[-1]))
        if not listed:
            return 0, np.empty(0, np.int32)
        ends = np.frombuffer(listed, np.int32).copy()  # (a copy: the list may grow later)
        ends = ends[ends + 1 < self.size]
        ends = ends[self._text[ends] == pattern[-1]]  # (erased: SEP now)
        if not len(ends):
            return 0, ends
        m = 1
        while m < min(max_len, len(pattern)):
            back = ends - m
            ok = self._text[np.maximum(back, 0)] == pattern[-1 - m]
            ok &= back >= 0
            if not ok.any():
                break
            ends = ends[ok]
            m += 1
        return m, ends

    def draft(
        self, pattern: np.ndarray, max_len: int, limit: Callable[[int], int], min_prob: float
    ) -> tuple[list[int], float, np.ndarray]:
        """`match` then `walk`: up to limit(m) tokens after the deepest match (m tokens) of
        `pattern`, their score and the occurrences they came from; ([], 0.0, []) if none."""
        m, ends = self.match(pattern, max_len)
        if not m:
            return [], 0.0, ends
        return self.walk(ends, limit(m), min_prob)

    def walk(
        self, ends: np.ndarray, k: int, min_prob: float
    ) -> tuple[list[int], float, np.ndarray]:
        """Up to k tokens along the most frequent continuation of the occurrences ending at
        `ends`, while the path's estimated probability stays >= min_prob: the tokens, their
        score (the sum of the path's probabilities: the tokens a verification should expect
        to keep) and the occurrences that continue with all of them."""
        drafts: list[int] = []
        prob, score = 1.0, 0.0
        for i in range(1, k + 1):
            if len(ends) == 1:  # one occurrence: its continuation, up to its document's end
                rest = self._text[ends[0] + i : ends[0] + k + 1].tolist()
                rest = rest[: rest.index(SEP)] if SEP in rest else rest
                drafts += rest  # (each with probability 1 given the path so far)
                score += prob * len(rest)
                break
            at = ends + i
            nxt = np.where(at < self.size, self._text[np.minimum(at, self.size - 1)], SEP)
            live = nxt != SEP
            if not live.any():
                break
            tokens, which, counts = np.unique(nxt[live], return_inverse=True, return_counts=True)
            latest = np.zeros(len(tokens), np.int64)
            np.maximum.at(latest, which, ends[live])
            best = int(np.argmax(counts.astype(np.int64) * (self.size + 1) + latest))
            p = prob * counts[best] / len(ends)  # (ends that stop here count: a node's total)
            if p < min_prob:
                break
            prob = p
            score += prob
            drafts.append(int(tokens[best]))
            ends = ends[live][which == best]
        return drafts, score, ends

    def _positions(self, token: int) -> array:
        listed = self._where.get(token)
        if listed is None:
            listed = self._where[token] = array("i")
        return listed

    def _grow(self, n: int) -> None:
        if self.size + n > len(self._text):
            bigger = np.full(max(2 * len(self._text), self.size + n), SEP, np.int32)
            bigger[: self.size] = self._text[: self.size]
            self._text = bigger
