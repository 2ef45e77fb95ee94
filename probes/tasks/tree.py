"""Tree path-finding (Brinkmann et al. 2024): given a tree's edges and a goal, the path from the root to the goal.

A tree of `nodes` nodes (16) is built from a seed and an index: a root-to-goal path of 1 to nodes-1 edges, a second
branch from the root of 1 to the nodes left, then every other node attached to a random parent with room (binary:
at most two children; the goal is never a parent, so it is a leaf). Serialized as the authors' tokens:

    3 >7 , 7 >2 , ... , 9 >4 | 2 : 3 >7 >2 , , ,
    edges ("A >B", comma-separated; topological order, reversed or shuffled), "|", the goal, ":", the root,
    then the path as ">k" tokens, padded with "," (which also ends the path) to nodes * 4 + 2 tokens

The topological order is breadth-first from the root, each node's edges together: `topological: bfs` takes a node's
children in the order they were attached (path child first); `topological: networkx` in ascending node number, the
order the authors' `topological_sort_edges` gets from networkx.topological_sort on their adjacency-matrix graph.

With 16 nodes the 15 edges take positions 0-43, "|" is at 44, the goal at 45, ":" at 46, the root at 47 and the
path starts at 48. `order: mixed` (the authors') reverses the topological order for even indices and shuffles it
for odd ones. Training (training/data.py) scores the path tokens and the two "," after them (`loss: path`), or every
token after the root through the padding (`loss: authors`, their mask); the probing task
(`kind: tree`) gives one item per path step: the tokens so far, to be continued by the next ">k".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from ..errors import ProbeError
from .base import Item, Task, answer_token, paired
from .kinds import register_kind

ORDERS = ("mixed", "forward", "backward", "random")
TOPOLOGICAL = ("bfs", "networkx")  # a node's children: in the order attached, or in ascending node number
PAD = ","


@dataclass(frozen=True)
class Tree:
    edges: tuple  # (parent, child) in serialized order
    root: int
    goal: int
    path: tuple  # root, ..., goal

    def tokens(self, nodes: int) -> list[str]:
        """The whole sequence, padded with "," to nodes * 4 + 2 tokens."""
        out = []
        for i, (a, b) in enumerate(self.edges):
            out += ([PAD] if i else []) + [str(a), f">{b}"]
        out += ["|", str(self.goal), ":", str(self.root), *(f">{v}" for v in self.path[1:])]
        return out + [PAD] * (nodes * 4 + 2 - len(out))

    def start(self) -> int:
        """Position of the root token (the last one before the path)."""
        return 3 * len(self.edges) + 2


def named_positions(tokens: list[str], start: int, path: list[int]) -> dict[str, int]:
    """Positions by meaning, as the first character of their token in the space-joined sequence: the `bar` ("|"),
    the `goal`, the `colon`, the `root`, and `edge_up<k>`: the edge token ">v" into the node v k steps up the path
    from the goal (edge_up0: the edge into the goal), the registers backward chaining reads, up to the root's child."""
    chars = np.cumsum([0] + [len(t) + 1 for t in tokens]).tolist()
    out = {name: chars[start + d] for name, d in (("bar", -3), ("goal", -2), ("colon", -1), ("root", 0))}
    edges = {t: i for i, t in enumerate(tokens[:start - 3]) if t.startswith(">")}
    for k, node in enumerate(reversed(path[1:])):
        out[f"edge_up{k}"] = chars[edges[f">{node}"]]
    return out


def vocabulary(nodes: int) -> list[str]:
    """The authors' 35 tokens for 16 nodes: ",", ":", "|", then ">k" and "k" for every node."""
    return [PAD, ":", "|", *(f">{k}" for k in range(nodes)), *(str(k) for k in range(nodes))]


def make_tree(seed: int, index: int, nodes: int = 16, order: str = "mixed", topological: str = "bfs") -> Tree:
    """Tree `index` of `seed` (see the module docstring), from its own random stream."""
    if order not in ORDERS:
        raise ProbeError(f"unknown tree order {order!r}; accepted: {', '.join(ORDERS)}")
    if topological not in TOPOLOGICAL:
        raise ProbeError(f"unknown topological order {topological!r}; accepted: {', '.join(TOPOLOGICAL)}")
    if nodes < 3:
        raise ProbeError(f"trees of {nodes} nodes; accepted: 3 nodes or more")
    rng = np.random.default_rng([seed, index])
    free = list(range(nodes))

    def take() -> int:
        return free.pop(int(rng.integers(len(free))))

    length = int(rng.integers(1, nodes))
    path = [take() for _ in range(length + 1)]
    children: dict[int, list[int]] = {v: [] for v in range(nodes)}
    for a, b in zip(path, path[1:]):
        children[a].append(b)
    placed = path[:-1]  # the goal never gets a child
    if free:  # a second branch from the root
        prev = path[0]
        for _ in range(int(rng.integers(1, len(free) + 1))):
            v = take()
            children[prev].append(v)
            placed.append(v)
            prev = v
    for v in sorted(free):
        room = [u for u in placed if len(children[u]) < 2]
        parent = room[int(rng.integers(len(room)))]
        children[parent].append(v)
        placed.append(v)
    edges, queue = [], [path[0]]  # breadth-first from the root: a topological order
    while queue:
        u = queue.pop(0)
        kids = sorted(children[u]) if topological == "networkx" else children[u]
        edges += [(u, c) for c in kids]
        queue += kids
    if order == "backward" or (order == "mixed" and index % 2 == 0):
        edges = edges[::-1]
    elif order == "random" or order == "mixed":
        edges = [edges[i] for i in rng.permutation(len(edges))]
    return Tree(tuple(edges), path[0], path[-1], tuple(path))


@register_kind("tree")
@dataclass
class TreeTask(Task):
    """Held-out trees of the training generator, one item per path step: the tokens up to the last path node so
    far (the root for step 0), answered by the next ">k". Grouped by path length. Items carry `up0`..: the node k
    steps up the path from the goal ("-" above the root), the labels of the backward-chaining probes
    (`--probe linear-probe --label up2 --task-option steps=first`)."""

    SCHEMA: ClassVar[dict] = {
        "nodes": ("tree: nodes per tree", "16"),
        "trees": ("tree: trees, one item per step of each one's path", "200"),
        "first_tree": ("tree: index of the first tree (a trained model's held-out ones)", "135000"),
        "order": ("tree: edge order: mixed (reversed for even trees, shuffled for odd, as the authors), forward, "
                  "backward or random", "mixed"),
        "topological": ("tree: the topological order that forward and backward follow: bfs (a node's children as "
                        "attached) or networkx (ascending node number, as the authors' networkx.topological_sort)",
                        "networkx"),
        "steps": ("tree: all (every step of each path) or first (step 0: the prompt ends at the root)", "first"),
        "corrupt": ("tree: activation-patching's corrupted prompt: another tree (tree) or the same tree with "
                    "another goal leaf whose path turns elsewhere at the step (goal)", "goal"),
    }
    NONNEGATIVE: ClassVar[tuple] = ("nodes", "trees", "first_tree")

    nodes: int = 16
    trees: int = 200
    first_tree: int = 0  # trees first_tree, first_tree + 1, ... (a trained model's held-out ones)
    order: str = "mixed"
    topological: str = "bfs"  # as the training config's task.topological
    steps: str = "all"  # all: every step of each path; first: step 0 only (the prompt ends at the root)
    corrupt: str = "tree"  # activation-patching's corrupted prompt: another tree (tree) or this tree, another goal
    _trees: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.order not in ORDERS:
            raise ProbeError(f"task {self.name!r}: order {self.order!r}; accepted: {', '.join(ORDERS)}")
        if self.topological not in TOPOLOGICAL:
            raise ProbeError(f"task {self.name!r}: topological {self.topological!r}; accepted: "
                             f"{', '.join(TOPOLOGICAL)}")
        if self.corrupt not in ("tree", "goal"):
            raise ProbeError(f"task {self.name!r}: corrupt {self.corrupt!r}; accepted: tree, goal")
        if self.steps not in ("all", "first"):
            raise ProbeError(f"task {self.name!r}: steps {self.steps!r}; accepted: all, first")
        if self.nodes < 3 or self.trees < 1:
            raise ProbeError(f"task {self.name!r}: nodes {self.nodes}, trees {self.trees}; accepted: at least 3 "
                             "nodes and 1 tree")

    def other_goal(self, item: Item) -> tuple[str, str] | None:
        """The item's prompt with its goal swapped for another leaf of the same tree whose path shares the steps so
        far and then turns elsewhere (so the answer changes and nothing else does), and that answer; None if no
        leaf does. The leaf is the first such in node order."""
        tree = self.tree(item.extra["tree"])
        step = item.extra["step"]
        parent = {b: a for a, b in tree.edges}
        sources = {a for a, _ in tree.edges}
        for leaf in sorted(set(parent) - sources - {tree.goal}):
            path = [leaf]
            while path[-1] != tree.root:
                path.append(parent[path[-1]])
            path = path[::-1]
            if len(path) > step + 1 and path[:step + 1] == list(tree.path[:step + 1]) and \
                    path[step + 1] != tree.path[step + 1]:
                tokens = item.prompt.split(" ")
                tokens[3 * len(tree.edges)] = str(leaf)  # the goal, after "|"
                return " ".join(tokens), f" >{path[step + 1]}"
        return None

    def tree(self, index: int) -> Tree:
        if index not in self._trees:
            self._trees[index] = make_tree(self.seed, index, self.nodes, self.order, self.topological)
        return self._trees[index]

    def items(self, limit: int | None = None, inputs: list[str] | None = None,
              shot_exclude: set[int] = frozenset()) -> list[Item]:
        out = []
        for t in range(self.first_tree, self.first_tree + self.trees):
            tree = self.tree(t)
            tokens, start = tree.tokens(self.nodes), tree.start()
            steps = len(tree.path) - 1
            # the node k steps up from the goal (up0 = the goal), "-" above the root: the linear probes' labels
            up = {f"up{k}": str(tree.path[-1 - k]) if k < len(tree.path) else "-" for k in range(self.nodes)}
            named = named_positions(tokens, start, tree.path)
            for step in range(1 if self.steps == "first" else steps):
                prompt = " ".join(tokens[:start + 1 + step])
                out.append(Item(len(out), prompt, tokens[start + 1 + step], prompt, " " + tokens[start + 1 + step],
                                f" {tree.goal}", group=str(steps),
                                extra={"tree": t, "step": step, "path_length": steps, "goal": tree.goal,
                                       "root": tree.root, "path": " ".join(map(str, tree.path)), **up},
                                positions=named))
                if limit and len(out) >= limit:
                    return out
        if inputs is not None:
            out = [it for it in out if it.input in inputs]
        return out

    def corrupted_pairs(self, items: list[Item], tokenizer) -> list[Item]:
        """Each step paired with the same step of another held-out tree (a resampled tree: same token count, since
        every tree has as many edges) whose next path node differs, drawn with the task's seed; with `corrupt:
        goal`, with the same tree asking for another leaf whose path turns elsewhere at this step (`other_goal`)."""
        if self.corrupt == "goal":
            goals = ((it, self.other_goal(it)) for it in items)
            return [paired(it, other[0], it.extra["tree"], other[1]) for it, other in goals if other is not None]
        pool: dict[int, list[Item]] = {}
        for other in self.items():
            pool.setdefault(other.extra["step"], []).append(other)
        out = []
        for it in items:
            rng = np.random.default_rng([self.seed, 7, it.index])  # per item: pairs do not depend on the others
            same = pool[it.extra["step"]]
            for j in rng.permutation(len(same)):
                other = same[int(j)]
                if other.extra["tree"] != it.extra["tree"] and answer_token(tokenizer, other) != answer_token(tokenizer, it):
                    out.append(paired(it, other.prompt, other.extra["tree"], other.answer))
                    break
        return out

    def no_pairs(self, model: str) -> str:
        if self.corrupt == "goal":
            return f"no item of task {self.name!r} has another leaf whose path turns elsewhere at its step"
        return (f"no item of task {self.name!r} has another tree at the same step with another answer; "
                "accepted: more trees (--task-option trees=N)")
