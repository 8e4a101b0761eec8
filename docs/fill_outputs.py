"""Run a docs page's blocks in a fresh folder and rewrite its console / pycon outputs
with what really prints (after a change to rcc's messages; then read the diff):

    python docs/fill_outputs.py docs/language.md
"""
import contextlib
import doctest
import io
import os
import sys
import tempfile
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import test_docs as T  # noqa: E402


def fill_console(body):
    out = []
    for command, _ in T.console_steps(body):
        out.append("$ " + command)
        out.extend(T._lines(T.run_command(command)))
    return "\n".join(out) + "\n"


def fill_pycon(body, ns):
    examples = doctest.DocTestParser().get_examples(body)
    out = []
    for ex in examples:
        src = ex.source.rstrip("\n").split("\n")
        out.append(">>> " + src[0])
        out.extend("... " + s for s in src[1:])
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                exec(compile(ex.source, "<doc>", "single"), ns)
            text = buf.getvalue()
        except Exception as e:
            text = buf.getvalue() + "Traceback (most recent call last):\n  ...\n" + \
                traceback.format_exception_only(type(e), e)[-1]
        out.extend(T._lines(text))
    return "\n".join(out) + "\n"


def main(path):
    text = open(path).read()
    folder = tempfile.mkdtemp()
    cwd = os.getcwd()
    os.chdir(folder)
    sys.path.insert(0, folder)
    page = T.Page(path)
    pieces, pos = [], 0
    try:
        for m in T._FENCE.finditer(text):
            lang, body = m.group(1), m.group(2)
            where = f"{path}:{text.count(chr(10), 0, m.start()) + 1}"
            new = body
            if lang == "console":
                new = fill_console(body)
            elif lang == "pycon":
                new = fill_pycon(body, page.namespace)
            else:
                h = getattr(page, "block_" + lang.replace("-", "_"), None)
                if h:
                    h(body, where)
            pieces.append(text[pos:m.start(2)] + new)
            pos = m.end(2)
        pieces.append(text[pos:])
    finally:
        os.chdir(cwd)
    for f in page.failures:
        print("FAILURE", f, file=sys.stderr)
    open(path, "w").write("".join(pieces))


if __name__ == "__main__":
    main(sys.argv[1])
