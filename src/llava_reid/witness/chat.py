"""``llava-reid chat``: the witness loop in a terminal (a node without a browser).

Each round prints the ranked gallery ids, scores and file paths (``*`` marks the candidates
the questioner was shown), the question, and reads the answer from standard input:
an answer; an empty line or ``?`` for "I don't know"; ``pick N`` ("that's them": rank N of the
list, or ``pick #ID`` for a gallery image id); ``stop`` (or end of input) to end without a pick.
"""

from __future__ import annotations

import sys
from typing import TextIO

from llava_reid.witness.session import IDK, WitnessSession

HELP = ("answer the question; Enter or ? = I don't know; 'pick N' = that's them (rank N, "
        "or 'pick #ID'); 'stop' = end")


def show_round(session: WitnessSession, out: TextIO) -> None:
    cur = session.current
    m = session.models
    extra = "" if cur.round < m.rounds else " (configured rounds done: go on, or pick)"
    out.write(f"\n== round {cur.round} of {m.rounds}{extra}\n")
    out.write(f"query: {cur.query}\n")
    if cur.target_rank is not None:
        out.write(f"target rank: {cur.target_rank}\n")
    for r in cur.ranking:
        mark = "*" if r.candidate else " "
        path = m.files.image_root / r.file_path
        out.write(f"{mark}{r.rank:>3}. image {r.image_idx:<7} id {r.pid:<6} score {r.score:.3f}"
                  f"  {path}\n")
    if session.replay:
        sim = {s["round"]: s for s in m.simulated_rounds(session.dialogue.query_id)}
        if cur.round in sim:
            s = sim[cur.round]
            out.write(f"simulated answerer, round {cur.round}: rank {s['target_rank']}"
                      + (f"; asked {s['question']!r}, answered {s['answer']!r}"
                         if s["question"] else "") + "\n")
    if cur.question:
        out.write(f"question: {cur.question}\n")
    out.flush()


def pick_from(command: str, session: WitnessSession) -> int:
    """The gallery image id a ``pick`` command names."""
    arg = command.split(maxsplit=1)[1].strip() if " " in command else ""
    if arg.startswith("#") and arg[1:].isdigit():
        return int(arg[1:])
    if arg.isdigit() and 1 <= int(arg) <= len(session.current.ranking):
        return session.current.ranking[int(arg) - 1].image_idx
    raise ValueError(f"pick what? give a rank 1..{len(session.current.ranking)} or #image-id")


def run_loop(session_factory, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout,
             replay: bool = False) -> WitnessSession | None:
    """Read the first description (unless replaying), then answer round after round."""
    if replay:
        session = session_factory(None)
    else:
        out.write("Describe the person you are looking for:\n> ")
        out.flush()
        first = stdin.readline()
        if not first.strip():
            out.write("no description: nothing to search\n")
            return None
        session = session_factory(first.strip())
    if replay:
        d = session.dialogue
        out.write(f"replay of test query {d.query_id} (identity {d.pid}); first description: "
                  f"{d.initial}\n")
    out.write(f"({HELP})\n")
    while True:
        show_round(session, out)
        out.write("> ")
        out.flush()
        line = stdin.readline()
        if not line:  # end of input
            session.finish()
            break
        text = line.strip()
        low = text.lower()
        if low == "stop":
            session.finish()
            break
        if low.startswith("pick"):
            try:
                image = pick_from(text, session)
                session.finish(image)
            except (KeyError, ValueError) as exc:
                out.write(f"{exc.args[0] if exc.args else exc}\n")
                continue
            break
        session.answer(IDK if text in ("", "?") else text)
    summary = f"\nsession {session.session_id}: {session.round} answers"
    if session.picked >= 0:
        summary += f"; picked image {session.picked}"
        if session.picked_correct is not None:
            summary += " (the target)" if session.picked_correct else " (not the target)"
    if session.current.target_rank is not None:
        summary += f"; final target rank {session.current.target_rank}"
    out.write(summary + "\n")
    if session.out is not None:
        out.write(f"saved: {session.out}\n")
    out.flush()
    return session
