"""The console's widgets: tables of nodes and jobs, the event feed, the header.

Views read a :class:`tui.source.Model` and never talk to the daemon.  Rows are formatted
lazily: updating a table only stores the new records, and a row builds its text when it
is drawn, so a cluster of hundreds of nodes costs only the rows on screen.  Columns have
priorities: a narrow terminal drops the least important ones instead of wrapping.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import urwid

from tui.palette import FEED_ATTR, LOAD_HIGH, LOAD_MID

Markup = list[tuple[str, str]]


@dataclass(frozen=True)
class Col:
    key: str
    title: str
    width: int
    priority: int = 0  # 0: always shown; higher numbers go first when space is short
    right: bool = False
    flex: bool = False  # takes the width left over (at least ``width``)


def layout(cols: Sequence[Col], width: int) -> list[tuple[Col, int]]:
    """The columns that fit in ``width`` (one space between them), in table order."""
    chosen = [c for c in cols if c.priority == 0]
    for prio in sorted({c.priority for c in cols if c.priority}):
        more = [c for c in cols if c.priority == prio]
        if sum(c.width + 1 for c in chosen + more) - 1 > width:
            break  # less important columns wait until these fit
        chosen += more
    chosen = [c for c in cols if c in chosen]
    spare = max(0, width - (sum(c.width + 1 for c in chosen) - 1))
    return [(c, c.width + spare if c.flex else c.width) for c in chosen]


def fit(text: str, width: int, right: bool = False) -> str:
    if len(text) > width:
        text = text[:max(0, width - 1)] + "~" if width > 1 else text[:width]
    return text.rjust(width) if right else text.ljust(width)


def age_text(seconds: float) -> str:
    """An age in one unit: 42s, 5m, 3h, 2d."""
    s = max(0, int(seconds))
    for unit, div in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= div:
            return f"{s // div}{unit}"
    return f"{s}s"


def size_text(mb: float) -> str:
    if mb >= 10240:
        return f"{mb / 1024:.0f}G"
    if mb >= 1024:
        return f"{mb / 1024:.1f}G"
    return f"{mb:.0f}M"


class Row(urwid.Text):
    """One line of a table; selectable, builds its markup only when drawn."""

    _selectable = True

    def __init__(self, table: Table, data: dict[str, Any] | None):
        super().__init__("", wrap="clip")
        self.table = table
        self.data = data
        self._sig: tuple[Any, ...] | None = None

    def set_data(self, data: dict[str, Any]) -> None:
        if data != self.data:
            self.data = data
            self._sig = None
            self._invalidate()

    def refresh(self) -> None:
        self._sig = None
        self._invalidate()

    def selectable(self) -> bool:
        return self.data is not None

    def keypress(self, size: tuple[int], key: str) -> str:
        return key

    def rows(self, size: tuple[int], focus: bool = False) -> int:
        return 1

    def render(self, size: tuple[int], focus: bool = False) -> urwid.Canvas:
        sig = (size[0], focus)
        if sig != self._sig:
            self._sig = sig
            cells = self.table.cells(self.data, size[0])
            if focus:
                cells = [("focus", "".join(t for _, t in cells).ljust(size[0]))]
            self.set_text(cells or "")
            self._sig = sig  # set_text invalidated it
        return super().render(size, focus)


class Table(urwid.WidgetWrap):
    """A header line and a scrolling list of rows, keyed so selection survives updates."""

    def __init__(self, cols: Sequence[Col], key: Callable[[dict[str, Any]], str],
                 empty: str):
        self.cols = list(cols)
        self.key = key
        self._layouts: dict[int, list[tuple[Col, int]]] = {}
        self.header = Row(self, None)
        self._empty = urwid.Text(("dim", empty))  # shown while there is no record
        self.walker = urwid.SimpleFocusListWalker([self._empty])
        self.listbox = urwid.ListBox(self.walker)
        self._rowmap: dict[str, Row] = {}
        super().__init__(urwid.Pile([("pack", self.header), self.listbox]))

    def layout(self, width: int) -> list[tuple[Col, int]]:
        lay = self._layouts.get(width)
        if lay is None:
            lay = self._layouts[width] = layout(self.cols, width)
        return lay

    def cells(self, data: dict[str, Any] | None, width: int) -> Markup:
        out: Markup = []
        for col, w in self.layout(width):
            if out:
                out.append(("body", " "))
            if data is None:
                out.append(("colhead", fit(self.title(col), w, col.right)))
            else:
                out += self.cell(col, w, data)
        return out

    def title(self, col: Col) -> str:
        return col.title

    def cell(self, col: Col, width: int, data: dict[str, Any]) -> Markup:
        raise NotImplementedError

    def update(self, records: list[dict[str, Any]]) -> None:
        """Show ``records``; rows are reused by key and the selection follows its record."""
        focused = self.selected_key()
        keys = [self.key(r) for r in records]
        same = keys == [self.key(r.data) for r in self.walker if getattr(r, "data", None)]
        rows: dict[str, Row] = {}
        for k, rec in zip(keys, records, strict=True):
            row = self._rowmap.get(k)
            if row is None:
                row = Row(self, rec)
            else:
                row.set_data(rec)
            rows[k] = row
        self._rowmap = rows
        if not same:
            self.walker[:] = [rows[k] for k in keys] if keys else [self._empty]
            if focused in rows:
                self.walker.set_focus(keys.index(focused))

    def refresh_all(self) -> None:
        """Reformat every row (the view or the column titles changed)."""
        self.header.refresh()
        for row in self._rowmap.values():
            row.refresh()

    def selected(self) -> dict[str, Any] | None:
        w = self.listbox.focus
        return w.data if isinstance(w, Row) else None

    def selected_key(self) -> str | None:
        data = self.selected()
        return self.key(data) if data is not None else None


# --------------------------------------------------------------------------- nodes
VIEWS = ("load", "speed", "memory", "utilisation")

NODE_COLS = (
    Col("id", "ID", 5, right=True), Col("name", "NAME", 10), Col("state", "STATE", 8),
    Col("bar", "LOAD", 14, flex=True), Col("cpus", "CPUS", 4, 1, right=True),
    Col("jobs", "JOBS", 4, 1, right=True), Col("flags", "FLAGS", 5, 1),
    Col("mem", "MEMFREE", 7, 2, right=True), Col("migr", "MIGR", 4, 2),
    Col("role", "ROLE", 5, 3), Col("speed", "MHZ", 5, 4, right=True),
    Col("address", "ADDRESS", 21, 5),
)
ROLE_SHORT = {"controller": "ctrl", "drone": "drone", "peer": "peer"}
FLAG_LETTER = {"blocked": "B", "lstay": "L", "quiet": "Q"}


def load_attr(frac: float) -> str:
    return "bar-high" if frac >= LOAD_HIGH else "bar-mid" if frac >= LOAD_MID else "bar-low"


def bar(frac: float, label: str, width: int, attr: str) -> Markup:
    """An htop-like bar, ``[|||||     0.62]``, readable without colour."""
    inner = max(1, width - 2)
    label = label[:inner]
    fill = round(max(0.0, min(1.0, frac)) * inner)
    room = inner - len(label)
    bars = "|" * min(fill, room)
    out: Markup = [("dim", "[")]
    if bars:
        out.append((attr, bars))
    out.append(("body", " " * (room - len(bars))))
    out.append(("title", label))
    out.append(("dim", "]"))
    return out


class NodeTable(Table):
    def __init__(self) -> None:
        super().__init__(NODE_COLS, lambda n: str(n["id"]), "no nodes yet")
        self.view = "load"
        self.max_speed = 1.0
        self.max_mem = 1.0

    def update(self, records: list[dict[str, Any]]) -> None:
        live = [n for n in records if n.get("state") == "alive"] or records
        self.max_speed = max((n["cpus"] * n["speed"] for n in live), default=1) or 1
        self.max_mem = max((n["mem_free_mb"] for n in live), default=1) or 1
        super().update(records)

    def set_view(self, view: str) -> None:
        self.view = view
        self.refresh_all()

    def title(self, col: Col) -> str:
        if col.key == "bar":
            return {"load": "LOAD (per lent CPU)", "speed": "SPEED (CPUs x MHz)",
                    "memory": "MEMORY FREE", "utilisation": "UTILISATION"}[self.view]
        return col.title

    def metric(self, n: dict[str, Any]) -> tuple[float, str, str]:
        if self.view == "load":
            load = float(n["load"])
            return load, f"{load:.2f}", load_attr(load)
        if self.view == "utilisation":
            util = float(n["util"]) / 100
            return util, f"{n['util']:.0f}%", load_attr(util)
        if self.view == "speed":
            total = n["cpus"] * n["speed"]
            return total / self.max_speed, f"{total / 1000:.1f}GHz", "bar-info"
        mem = n["mem_free_mb"]
        return mem / self.max_mem, size_text(mem), "bar-high" if mem < 256 else "bar-info"

    def cell(self, col: Col, width: int, n: dict[str, Any]) -> Markup:
        k = col.key
        alive = n["state"] == "alive"
        base = "self" if n.get("self") else "body" if alive else "dim"
        if k == "bar":
            if not alive:
                return bar(0, "-", width, "dim")
            frac, label, attr = self.metric(n)
            return bar(frac, label, width, attr)
        if k == "id":
            text = ("*" if n.get("self") else "") + str(n["id"])
        elif k == "state":
            return [(f"state-{n['state']}", fit(n["state"][:8], width))]
        elif k == "flags":
            letters = "".join(FLAG_LETTER[f] for f in FLAG_LETTER if f in n.get("flags", ()))
            return [("flag", fit(letters, width))]
        elif k == "migr":
            text = "criu" if "criu" in n.get("flags", ()) else "-"
        elif k == "role":
            text = ROLE_SHORT.get(n["role"], n["role"])
        elif k == "mem":
            text = size_text(n["mem_free_mb"])
        elif k == "speed":
            text = str(int(n["speed"]))
        elif k == "address":
            text = f"{n['address']}:{n['port']}"
        else:
            text = str(n.get(k, ""))
        return [(base, fit(text, width, col.right))]


def totals(nodes: list[dict[str, Any]], jobs: list[dict[str, Any]]) -> Markup:
    """The cluster in one line: nodes by state, CPUs, mean load, jobs, free memory."""
    states: dict[str, int] = {}
    for n in nodes:
        states[n["state"]] = states.get(n["state"], 0) + 1
    alive = [n for n in nodes if n["state"] == "alive"]
    cpus = sum(n["cpus"] for n in alive)
    load = sum(n["load"] * n["cpus"] for n in alive) / cpus if cpus else 0.0
    running = sum(1 for j in jobs if j["state"] == "running")
    moving = sum(1 for j in jobs if j["state"] == "migrating")
    mem = sum(n["mem_free_mb"] for n in alive)
    parts = ", ".join(f"{c} {s}" for s, c in states.items())
    return [("title", f" {len(nodes)} nodes"), ("body", f" ({parts or 'none'})  "),
            ("title", f"{cpus} CPUs"), ("body", "  load "),
            (load_attr(load), f"{load:.2f}"), ("body", "  jobs: "),
            ("title", f"{running} running"), ("body", f", {moving} moving  "),
            ("title", size_text(mem)), ("body", " free")]


# --------------------------------------------------------------------------- jobs
JOB_COLS = (
    Col("id", "JOB", 7), Col("owner", "OWNER", 7, 1), Col("home", "HOME", 7, 1),
    Col("node", "NODE", 7), Col("state", "STATE", 9), Col("cpu", "CPU", 7, 1, right=True),
    Col("rss", "RSS", 5, 2, right=True), Col("mig", "MIG", 3, 2, right=True),
    Col("ckpt", "CKPT", 9, 3, right=True),
    Col("command", "COMMAND", 18, 3), Col("note", "NOTE", 10, flex=True),
)


class JobTable(Table):
    def __init__(self, node_name: Callable[[int], str]) -> None:
        super().__init__(JOB_COLS, lambda j: str(j["id"]), "no jobs: start one with "
                         "'omuscd run -- COMMAND' or ':run -- COMMAND'")
        self.node_name = node_name

    def cell(self, col: Col, width: int, j: dict[str, Any]) -> Markup:
        k = col.key
        done = j["state"] in ("exited", "lost")
        base = "dim" if done else "body"
        if k == "state":  # checkpointed: stopped after its checkpoint ('resume')
            shown = "ckpt-stop" if j["state"] == "checkpointed" else j["state"]
            return [(f"job-{j['state']}", fit(shown, width))]
        if k == "home":
            text = self.node_name(j["home"])
        elif k == "node":
            text = j.get("node_name") or self.node_name(j["node"])
        elif k == "cpu":
            text = f"{j['cpu']:.1f}s"
        elif k == "rss":
            text = size_text(j["rss_mb"])
        elif k == "mig":
            text = str(j["migrations"])
        elif k == "ckpt":  # the last checkpoint: its age and size
            c = j.get("checkpoint") or {}
            text = (f"{age_text(time.time() - float(c.get('time', 0)))}/"
                    f"{size_text(float(c.get('size', 0)) / (1 << 20))}") if c else "-"
        elif k == "note":
            text = j.get("reason") or j.get("status") or (
                f"cannot move: {j['cannot_move']}" if j.get("cannot_move") else "")
            return [("job-lost" if j.get("reason") else base, fit(text, width))]
        else:
            text = str(j.get(k, ""))
        return [(base, fit(text, width, col.right))]


# --------------------------------------------------------------------------- feed
def event_markup(ev: dict[str, Any]) -> Markup:
    stamp = time.strftime("%H:%M:%S", time.localtime(float(ev.get("time", 0))))
    kind = str(ev.get("event", "?"))
    attr = FEED_ATTR.get(kind, "feed")
    return [("dim", stamp + " "), (attr, f"{kind:<16.16} "), (attr, str(ev.get("text", "")))]


class Feed(urwid.ListBox):
    """The live feed; it follows the newest event unless the user scrolled up."""

    def __init__(self, limit: int = 500):
        self.limit = limit
        self.shown = 0  # model.feed_version last shown
        super().__init__(urwid.SimpleFocusListWalker([]))

    def update(self, events: Sequence[dict[str, Any]], version: int) -> None:
        new = min(version - self.shown, len(events))
        self.shown = version
        if new <= 0:
            return
        walker = self.body
        following = not walker or walker.focus is None or walker.focus >= len(walker) - 1
        tail = list(events)[-new:]
        walker.extend(urwid.Text(event_markup(ev), wrap="clip") for ev in tail)
        if len(walker) > self.limit:
            del walker[:len(walker) - self.limit]
        if following and walker:
            walker.set_focus(len(walker) - 1)


def header(model: Any, view: str, where: str) -> Markup:
    me = model.me
    if not model.connected:
        return [("header", f" omuscd console  {where}  not connected: {model.problem}")]
    who = f"node {me.get('name', '?')} (id {me.get('id', '?')}, {me.get('role', '?')})"
    clock = time.strftime("%H:%M:%S")
    where = f"  {where}" if where else ""
    return [("header", f" omuscd  {who}{where}  view: {view}  {clock} ")]
