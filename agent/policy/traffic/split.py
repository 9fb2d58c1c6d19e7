"""Weighted splits: divide a Service's connections across subsets chosen by pod labels.

A subset is the Service's endpoints whose pod carries all of its labels (for example
``version: v2``). A new connection first picks a subset by weight, then the balancer picks an
endpoint inside it, so a 90/10 split holds however many replicas each version has. Endpoints in
no subset get no traffic while a split is configured.

Only subsets with an available endpoint take part: when every endpoint of a subset is ejected
or gone, its share goes to the others in proportion to their weights (serving the connection
beats failing it). With ``sticky`` the draw comes from a hash of the client's IP instead of the
RNG, so a client keeps its version as long as the set of non-empty subsets does not change; the
hash is SHA-256, the same on every node and across restarts (Python's ``hash`` is salted).
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Mapping, Sequence

from agent.policy.traffic.config import Subset


def _sticky_point(source_ip: str) -> float:
    digest = hashlib.sha256(source_ip.encode()).digest()
    return int.from_bytes(digest[:8], "big") / float(1 << 64)


class Splitter:
    def __init__(self, subsets: Sequence[Subset], *, sticky: bool, rng: random.Random) -> None:
        self.subsets = tuple(subsets)
        self.sticky = sticky
        self.rng = rng
        self.decisions: Counter[str] = Counter()

    def subset_of(self, labels: Mapping[str, str]) -> str | None:
        """The first subset (in the policy's order) whose labels ``labels`` all carry."""
        for s in self.subsets:
            if all(labels.get(k) == v for k, v in s.labels.items()):
                return s.name
        return None

    def choose(self, nonempty: set[str], source_ip: str) -> str | None:
        """A subset among ``nonempty`` (names with an available endpoint), by weight."""
        weighted = [(s.name, s.weight) for s in self.subsets if s.name in nonempty and s.weight]
        total = sum(w for _, w in weighted)
        if total == 0:
            return None
        point = (_sticky_point(source_ip) if self.sticky else self.rng.random()) * total
        for name, weight in weighted:
            if point < weight:
                self.decisions[name] += 1
                return name
            point -= weight
        name = weighted[-1][0]  # float rounding at the very top of the range
        self.decisions[name] += 1
        return name
