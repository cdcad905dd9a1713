"""The console's widgets rendered to canvases (urwid needs no terminal for that), its
completion, and its model; the end-to-end test in a real terminal is test_console_tmux."""

from __future__ import annotations

import time

import pytest
import urwid

from omuscd.control import commands
from tests.consoledata import cluster, job, node
from tui.app import Console
from tui.palette import PALETTE
from tui.source import ClusterSource, Model
from tui.views import NODE_COLS, layout


async def _never():  # a source that is never run: the tests fill its model themselves
    raise AssertionError("not connected in unit tests")


def console(nodes=(), jobs=(), **kw) -> Console:
    model = Model(nodes=list(nodes), jobs=list(jobs), connected=True)
    c = Console(ClusterSource(_never, model=model), "test", **kw)
    c.model.version += 1
    c.update()
    return c


def screen(c: Console, cols: int = 80, rows: int = 24) -> list[str]:
    canvas = c.top.render((cols, rows), focus=True)
    return [line.decode() for line in canvas.text]


def test_a_small_cluster_at_80x24():
    nodes = [node(1, 0.2, me=True), node(2, 0.95, flags=("criu", "blocked")),
             node(3, 0.6, state="dead")]
    jobs = [job(1, 1, 2, moves=[{"time": 1, "from": 1, "to": 2, "freeze": 0.3, "bytes": 1}]),
            job(1, 2, 1, cannot_move="stay")]
    lines = screen(console(nodes, jobs))
    assert len(lines) == 24 and all(len(ln) == 80 for ln in lines)
    text = "\n".join(lines)
    assert lines[0].startswith(" omuscd  node node1 (id 1, peer)")
    row = next(ln for ln in lines if "node2" in ln and "alive" in ln)
    assert "0.95]" in row and "|||" in row and " B " in row  # bar, value, blocked flag
    assert next(ln for ln in lines if "node3" in ln).split()[2] == "dead"
    assert "*1" in text  # this node is marked
    assert "3 nodes (2 alive, 1 dead)" in text and "4 CPUs" in text
    job_row = next(ln for ln in lines if ln.startswith("1.1 "))
    assert job_row.split()[:5] == ["1.1", "alice", "node1", "node2", "running"]
    assert "cannot move: stay" in text
    assert "? help" in lines[-1]


def test_columns_reflow_with_the_width():
    assert [c.key for c, _ in layout(NODE_COLS, 50)] == ["id", "name", "state", "bar"]
    wide = layout(NODE_COLS, 160)
    assert [c.key for c, _ in wide][-1] == "address"
    assert sum(w for _, w in wide) + len(wide) - 1 == 160  # the bar takes the rest
    c = console([node(1, me=True), node(2)], [job(1, 1, 2)])
    narrow, broad = screen(c, 50, 20), screen(c, 160, 40)
    assert all(len(ln) == 50 for ln in narrow) and "ADDRESS" not in narrow[1]
    assert "ADDRESS" in broad[1] and "198.18.0.3:4270" in "\n".join(broad)


def test_the_jobs_view_shows_the_last_checkpoint_and_the_checkpointed_state():
    saved = job(1, 1, 2)
    saved["checkpoint"] = {"seq": 3, "time": time.time() - 42, "size": 3 << 20}
    stopped = job(1, 2, 1, state="checkpointed")
    lines = screen(console([node(1, me=True), node(2)], [saved, stopped]), 160, 30)
    assert "CKPT" in lines[next(i for i, ln in enumerate(lines) if "COMMAND" in ln)]
    row = next(ln for ln in lines if ln.startswith("1.1 "))
    assert "42s/3M" in row or "43s/3M" in row, row
    assert "ckpt-stop" in next(ln for ln in lines if ln.startswith("1.2 "))


def test_views_switch_the_bars():
    c = console([node(1, 0.5, me=True), node(2, 0.25)])
    seen = []
    for _ in range(4):
        c.on_key("v")
        seen.append(screen(c, 100)[1])
    assert [s.split()[3] for s in seen] == ["SPEED", "MEMORY", "UTILISATION", "LOAD"]
    assert "view: load" in screen(c, 100)[0]


def test_selection_follows_its_record_across_updates():
    nodes = [node(i, me=i == 1) for i in (1, 2, 3)]
    c = console(nodes)
    c.nodes.listbox.set_focus(2)
    assert c.nodes.selected()["id"] == 3
    c.model.nodes = [node(1, me=True), node(0), node(3, 0.9), node(2)]
    c.model.version += 1
    c.update()
    assert c.nodes.selected()["id"] == 3 and "0.90]" in "\n".join(screen(c))


def test_feed_shows_events_with_migrations_of_the_whole_cluster():
    m = Model(nodes=[node(1, me=True), node(2)], connected=True)
    j = job(1, 1, 2, moves=[{"time": 1.0, "from": 1, "to": 2, "freeze": 0.25,
                             "bytes": 4_500_000}])
    m.note_moves([j], history=True)  # the first look: history, not news
    assert not m.feed
    j["moves"].append({"time": 2.0, "from": 2, "to": 1, "failed": "criu restore failed"})
    j["moves"].append({"time": 3.0, "from": 2, "to": 1, "freeze": 0.5, "bytes": 9_000_000})
    m.note_moves([j], history=False)
    m.note_moves([j], history=False)  # seen once only
    assert [e["event"] for e in m.feed] == ["migration-failed", "migrated"]
    assert m.feed[1]["text"] == "job 1.1 node2 -> node1: frozen 0.500s, 9.0 MB"
    m.add_event({"event": "dead", "time": time.time(), "text": "node 2 (node2) is dead"})
    c = Console(ClusterSource(_never, model=m), "test")
    c.update()
    text = "\n".join(screen(c, 100, 30))
    assert "stays on node2 (not to node1): criu restore failed" in text
    assert "dead             node 2 (node2) is dead" in text


def test_command_line_completes_commands_nodes_and_jobs():
    c = console([node(1, me=True), node(2)], [job(1, 7, 2)])
    c.on_key(":")
    assert c.frame.focus_position == "footer"
    line = c.line
    for ch in "mig":
        line.keypress((80,), ch)
    line.keypress((80,), "tab")
    assert line.edit_text == "migrate "
    for ch in "1.":
        line.keypress((80,), ch)
    line.keypress((80,), "tab")
    assert line.edit_text == "migrate 1.7 "
    line.keypress((80,), "h")
    line.keypress((80,), "tab")
    assert line.edit_text == "migrate 1.7 home "
    line.set_edit_text("topology c")
    line.set_edit_pos(len(line.edit_text))
    line.keypress((80,), "tab")
    assert line.edit_text == "topology controller "  # the table's choices
    line.set_edit_text("s")
    line.set_edit_pos(1)
    line.keypress((80,), "tab")  # several: listed
    listed = c.message.text.split()
    assert listed == sorted(n for n in commands.COMMANDS if n.startswith("s"))
    line.keypress((80,), "esc")
    assert c.frame.focus_position == "body" and line.edit_text == ""


def test_keys_on_nothing_selected_say_so():
    c = console([node(1, me=True)], [])
    c.on_key("m")
    assert "select a job" in c.message.text
    c.on_key("tab")
    c.on_key("b")
    assert "select a node" in c.message.text


def test_help_and_kill_dialogs_open_and_close():
    c = console([node(1, me=True)], [job(1, 1, 1)])
    c.on_key("?")
    assert "migrate the selected job" in "\n".join(screen(c))
    c.top.keypress((80, 24), "esc")
    assert c.top.original_widget is c.frame
    c.on_key("tab")  # to the jobs
    c.on_key("k")
    assert "Send SIGTERM to job 1.1" in "\n".join(screen(c))
    c.top.keypress((80, 24), "n")
    assert c.top.original_widget is c.frame


def test_every_palette_entry_has_a_monochrome_form_and_renders():
    names = {p[0] for p in PALETTE}
    assert len(names) == len(PALETTE)
    for name, fg, bg, mono in PALETTE:
        urwid.AttrSpec(fg, bg, 16)  # a valid colour in a 16-colour console
        assert mono is not None, name
    c = console(*cluster(8, 20), mono=True)
    assert c.mono and len(screen(c)) == 24


@pytest.mark.parametrize("size", [(80, 24), (40, 10), (200, 60)])
def test_renders_at_any_size(size):
    c = console(*cluster(128, 500))
    lines = screen(c, *size)
    assert len(lines) == size[1] and all(len(ln) == size[0] for ln in lines)


def test_live_jobs_come_first_and_ended_ones_are_capped():
    from tui.source import KEEP_ENDED, _recent

    jobs = [job(1, i, 1, state="exited") for i in range(1, 80)] + [job(1, 80, 2)]
    shown = _recent(jobs)
    assert shown[0]["id"] == "1.80" and len(shown) == 1 + KEEP_ENDED
    assert shown[-1]["id"] == "1.79"
