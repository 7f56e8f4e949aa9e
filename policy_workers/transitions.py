"""Online agent-to-agent transition model of one workload (pure numpy, no I/O).

Counts with decay: observing a -> b multiplies row a by ``decay`` and adds 1 to
cell (a, b), so each row remembers about ``1 / (1 - decay)`` of its latest
transitions and tracks drift. A prior spreads ``prior_strength`` pseudo-counts
over agents in proportion to how often each is called, so an unseen
transition is unlikely but never impossible.

Storage is dense float32 up to ``dense_limit`` agents (64 agents: 16 KiB of
counts) and sparse beyond, each sparse row keeping its ``sparse_row_cap``
heaviest successors, so 10,000 agents fit in a few MiB.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np


class TransitionModel:
    def __init__(self, decay: float = 0.97, prior_strength: float = 0.5, dense_limit: int = 64,
                 sparse_row_cap: int = 24) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError("decay must be in (0, 1]")
        self.decay = decay
        self.prior_strength = prior_strength
        self.dense_limit = dense_limit
        self.sparse_row_cap = sparse_row_cap
        self.names: list[str] = []
        self.index: dict[str, int] = {}
        self.visits = np.zeros(8, dtype=np.float32)  # decayed call counts per agent (the prior's shape)
        # Decayed counts stay below 1 / (1 - decay): with decay <= 0.99 half precision holds them to
        # within 0.1% and keeps 64 agents in 8 KiB; slower decay (larger counts) needs float32.
        self._dtype = np.float16 if decay <= 0.99 else np.float32
        self._dense: np.ndarray | None = np.zeros((8, 8), dtype=self._dtype)
        self._sparse: list[dict[int, float]] | None = None
        self.observed = 0
        self.version = 0  # changes whenever anything a reading depends on does (callers cache by it)

    # --- agents -------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.names)

    def agent_id(self, agent: str) -> int:
        """The index of ``agent``, registering it on first sight."""
        found = self.index.get(agent)
        if found is not None:
            return found
        i = len(self.names)
        self.names.append(agent)
        self.index[agent] = i
        if i >= len(self.visits):
            self.visits = np.concatenate([self.visits, np.zeros(len(self.visits), dtype=np.float32)])
        if self._dense is not None:
            if i >= self.dense_limit:
                self._to_sparse()
            elif i >= self._dense.shape[0]:
                size = min(self._dense.shape[0] * 2, self.dense_limit)
                grown = np.zeros((size, size), dtype=self._dtype)
                grown[: self._dense.shape[0], : self._dense.shape[1]] = self._dense
                self._dense = grown
        if self._sparse is not None:
            self._sparse.append({})
        return i

    def _to_sparse(self) -> None:
        dense = self._dense
        self._sparse = []
        for row in dense[: len(self.names) - 1]:
            nz = np.nonzero(row)[0]
            self._sparse.append({int(j): float(row[j]) for j in nz})
        self._dense = None

    # --- learning -----------------------------------------------------------

    def observe_call(self, agent: str) -> int:
        """An agent was called (updates the prior's call frequencies)."""
        i = self.agent_id(agent)
        self.visits[: len(self.names)] *= self.decay
        self.visits[i] += 1.0
        self.version += 1
        return i

    def observe(self, src: str, dst: str) -> None:
        """One transition: ``dst`` ran right after ``src`` in the same session."""
        a, b = self.agent_id(src), self.agent_id(dst)
        self.observed += 1
        self.version += 1
        if self._dense is not None:
            row = self._dense[a]
            row *= self.decay
            row[b] += 1.0
            return
        row = self._sparse[a]
        for j in row:
            row[j] *= self.decay
        row[b] = row.get(b, 0.0) + 1.0
        if len(row) > self.sparse_row_cap:
            del row[min(row, key=row.__getitem__)]

    # --- reading ------------------------------------------------------------

    def _prior(self) -> np.ndarray:
        n = len(self.names)
        visits = self.visits[:n].astype(np.float64) + 1e-3  # every known agent keeps some mass
        return visits / visits.sum()

    def row(self, agent: str) -> np.ndarray:
        """P(next = each known agent | current = ``agent``), summing to 1."""
        n = len(self.names)
        prior = self._prior()
        i = self.index.get(agent)
        if i is None:
            return prior
        if self._dense is not None:
            counts = self._dense[i, :n].astype(np.float64)
        else:
            counts = np.zeros(n)
            for j, c in self._sparse[i].items():
                counts[j] = c
        return self._with_prior(counts, prior)

    def _with_prior(self, counts: np.ndarray, prior: np.ndarray) -> np.ndarray:
        """Transition probabilities from decayed counts (one row, or rows): the prior's pseudo-counts added."""
        totals = counts.sum(axis=-1, keepdims=True)
        return (counts + self.prior_strength * prior) / (totals + self.prior_strength)

    def matrix(self, agents: Iterable[int] | None = None) -> np.ndarray:
        """The row-stochastic matrix over all agents (or the given subset, renormalised)."""
        n = len(self.names)
        subset = np.arange(n) if agents is None else np.asarray(sorted(set(agents)), dtype=np.int64)
        full = self._full_matrix()
        if full is not None:
            rows = full[np.ix_(subset, subset)]
        else:
            rows = np.stack([self.row(self.names[i])[subset] for i in subset]) if len(subset) else np.zeros((0, 0))
        sums = rows.sum(axis=1, keepdims=True)
        return rows / np.where(sums > 0, sums, 1.0)

    FULL_MATRIX_LIMIT = 1024  # agents up to which the whole matrix is built once per model version

    def _full_matrix(self) -> np.ndarray | None:
        n = len(self.names)
        if n > self.FULL_MATRIX_LIMIT:
            return None
        cached = getattr(self, "_full", None)
        if cached is None or cached[0] != self.version or cached[1].shape[0] != n:
            # Every row as ``row`` computes it, in one pass: rebuilt after each observed call, so the
            # scorer of a workload with many agents (crewAI's 72) pays for it on most acts.
            if self._dense is not None:
                counts = self._dense[:n, :n].astype(np.float64)
            else:
                counts = np.zeros((n, n))
                for i, successors in enumerate(self._sparse[:n]):
                    for j, c in successors.items():
                        counts[i, j] = c
            rows = self._with_prior(counts, self._prior()[None, :])
            cached = self._full = (self.version, rows)
        return cached[1]

    def reachable(self, agent: str, steps: int, min_probability: float = 1e-3) -> list[int]:
        """Agents reachable from ``agent`` within ``steps`` through transitions of at least ``min_probability``."""
        start = self.index.get(agent)
        if start is None:
            return []
        full = self._full_matrix()
        if full is not None:
            edges = full >= min_probability
            seen = np.zeros(len(self.names), dtype=bool)
            seen[start] = True
            frontier = seen.copy()
            for _ in range(steps):
                frontier = edges[frontier].any(axis=0) & ~seen
                if not frontier.any():
                    break
                seen |= frontier
            return [int(i) for i in np.nonzero(seen)[0]]
        seen, frontier = {start}, [start]
        for _ in range(steps):
            nxt = []
            for i in frontier:
                for j in np.nonzero(self.row(self.names[i]) >= min_probability)[0]:
                    if int(j) not in seen:
                        seen.add(int(j))
                        nxt.append(int(j))
            frontier = nxt
        return sorted(seen)

    def hitting(self, agent: str, steps: int) -> dict[str, float]:
        """P(each agent is called at least once within the next ``steps`` calls | current = ``agent``).

        Computed exactly on the chain restricted to the agents reachable within
        ``steps`` (all of them for small workloads).
        """
        names, curves = self._hitting_curves(agent, steps)
        if not names:
            return {}
        return dict(zip(names, np.clip(curves[-1], 0.0, 1.0).tolist()))

    def first_call_pmf(self, agent: str, steps: int) -> tuple[list[str], np.ndarray]:
        """The agents x reachable, and P(x's next call is the t-th call from now | current = ``agent``),
        t = 1..steps (rows)."""
        names, curves = self._hitting_curves(agent, steps)
        if not names:
            return [], np.zeros((0, 0))
        return names, np.clip(np.diff(curves, axis=0, prepend=0.0), 0.0, 1.0)

    def first_call_column(self, agent: str, target: str, steps: int) -> np.ndarray:
        """P(``target``'s next call is the t-th call from now | current = ``agent``), t = 1..steps: one column
        of ``first_call_pmf``, computed alone.

        A taboo walk from ``agent`` that records the mass reaching ``target``
        and removes it (steps x agents^2), where the whole table costs steps x
        agents^3: a scorer needs the few agents that hold cached blocks, not
        every agent of a workload with hundreds (AG2's ad-hoc experts).
        """
        out = np.zeros(max(steps, 0))
        chain = self._chain_from(agent, steps)
        if chain is None:
            return out
        start, _, position, P = chain
        x = position.get(self.index.get(target, -1))
        if x is None:
            return out
        walk = np.zeros(len(P))
        walk[start] = 1.0
        for t in range(steps):
            walk = walk @ P
            out[t] = walk[x]
            walk[x] = 0.0
        return np.clip(out, 0.0, 1.0)

    def _chain_from(self, agent: str, steps: int) -> tuple[int, list[int], dict[int, int], np.ndarray] | None:
        """The chain walked from ``agent``: every agent for small workloads, else those reachable within
        ``steps``; (its row, the agents' indices, agent index -> row, matrix), kept for one model version (a
        scorer asks for several targets from one agent)."""
        if agent not in self.index or steps <= 0:
            return None
        cache = getattr(self, "_chains", None)
        if cache is None or cache[0] != self.version:
            cache = self._chains = (self.version, {})
        whole = len(self.names) <= self.dense_limit  # every agent, one matrix for all starting agents
        key = None if whole else (agent, steps)
        found = cache[1].get(key)
        if found is None:
            subset = list(range(len(self.names))) if whole else self.reachable(agent, steps)
            found = cache[1][key] = (subset, {j: k for k, j in enumerate(subset)}, self.matrix(subset))
        subset, position, matrix = found
        return position[self.index[agent]], subset, position, matrix

    def _hitting_curves(self, agent: str, steps: int) -> tuple[list[str], np.ndarray]:
        """The agents x reachable, and P(x called within t calls | current = ``agent``) for t = 1..steps (rows)."""
        chain = self._chain_from(agent, steps)
        if chain is None:
            return [], np.zeros((0, 0))
        start, subset, _, P = chain
        # H[a, x] = P(hit x within t steps from a): H <- P + P @ H - P * diag(H)
        H = np.zeros_like(P)
        rows = np.zeros((steps, len(subset)))
        for t in range(steps):
            H = P + P @ H - P * np.diag(H)[None, :]
            rows[t] = H[start]
        return [self.names[j] for j in subset], rows

    def nbytes(self) -> int:
        """Bytes of learned state (counts, call frequencies, agent names)."""
        names = sum(len(n.encode()) + 8 for n in self.names)
        if self._dense is not None:
            counts = self._dense[: len(self.names), : len(self.names)].nbytes
        else:
            counts = sum(len(r) * 12 for r in self._sparse)  # int32 index + float64 count
        return counts + len(self.names) * 4 + names

    # --- persistence ----------------------------------------------------------

    def to_state(self) -> dict:
        n = len(self.names)
        rows = ([{j: float(c) for j, c in enumerate(r[:n]) if c > 0} for r in self._dense[:n]]
                if self._dense is not None else self._sparse)
        return {"decay": self.decay, "prior_strength": self.prior_strength, "dense_limit": self.dense_limit,
                "sparse_row_cap": self.sparse_row_cap, "names": list(self.names), "observed": self.observed,
                "visits": [float(v) for v in self.visits[:n]],
                "rows": [{str(j): c for j, c in r.items()} for r in rows]}

    @classmethod
    def from_state(cls, state: dict) -> "TransitionModel":
        model = cls(state["decay"], state["prior_strength"], state["dense_limit"], state["sparse_row_cap"])
        for name in state["names"]:
            model.agent_id(name)
        model.visits[: len(model.names)] = state["visits"]
        model.observed = state["observed"]
        for i, row in enumerate(state["rows"]):
            for j, c in row.items():
                if model._dense is not None:
                    model._dense[i, int(j)] = c
                else:
                    model._sparse[i][int(j)] = c
        return model
