#!/usr/bin/python3
"""Renders one of docs/man/*.md to a roff man page (man(7) macros).

The markdown subset the manuals use: `# page(N)` title on the first line,
`## SECTION` headings, `### TERM` items (a .TP list: the paragraphs after
them are the item's body), paragraphs, ``` code blocks, `- ` bullet lists,
and inline `code`, **bold** and *italic*.

    md2man.py SOURCE.md VERSION > page.1
"""
import re
import sys

SPECIAL = {"\u2013": r"\(en", "\u2014": r"\(em", "\u2019": r"\(aq", "\u2018": r"\(oq",
           "\u201c": r"\(lq", "\u201d": r"\(rq", "\u2212": r"\-", "\u00a0": r"\~"}


def escape(text):
    out = []
    for ch in text.replace("\\", r"\e"):
        if ch in SPECIAL:
            out.append(SPECIAL[ch])
        elif ord(ch) > 127:
            out.append(r"\[u%04X]" % ord(ch))
        else:
            out.append(ch)
    return "".join(out).replace("-", r"\-")


def inline(text):
    parts = re.split(r"(`[^`]+`|\*\*[^*]+\*\*|\*[^*\s][^*]*\*)", text)
    out = []
    for p in parts:
        if p.startswith("`") and p.endswith("`") and len(p) > 1:
            out.append(r"\fB" + escape(p[1:-1]) + r"\fR")
        elif p.startswith("**") and p.endswith("**") and len(p) > 3:
            out.append(r"\fB" + escape(p[2:-2]) + r"\fR")
        elif p.startswith("*") and p.endswith("*") and len(p) > 2:
            out.append(r"\fI" + escape(p[1:-1]) + r"\fR")
        else:
            out.append(escape(p))
    return "".join(out)


def line_out(s):
    """A text line: a leading . or ' would be read as a request."""
    return "\\&" + s if s.startswith((".", "'")) else s


def blocks(lines):
    """(kind, payload) for each heading, item, paragraph, bullet and code block."""
    i = 0
    while i < len(lines):
        ln = lines[i]
        if ln.startswith("```"):
            code = []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                code.append(lines[i])
                i += 1
            yield "code", code
        elif ln.startswith("## "):
            yield "h2", ln[3:].strip()
        elif ln.startswith("### "):
            yield "h3", ln[4:].strip()
        elif ln.startswith("- "):
            text = ln[2:].strip()
            while i + 1 < len(lines) and lines[i + 1].startswith("  ") and lines[i + 1].strip():
                i += 1
                text += " " + lines[i].strip()
            yield "bullet", text
        elif ln.strip():
            text = ln.strip()
            while (i + 1 < len(lines) and lines[i + 1].strip()
                   and not lines[i + 1].startswith(("```", "#", "- "))):
                i += 1
                text += "\n" + lines[i].strip()
            yield "para", text
        i += 1


def render(src, version):
    lines = src.split("\n")
    m = re.match(r"^# (\S+)\((\d)\)\s*$", lines[0])
    if not m:
        raise SystemExit("first line must be '# name(N)': %r" % lines[0])
    name, section = m.group(1), m.group(2)
    out = ['.TH %s %s "" "nbdkit %s" "nbdkit"' % (escape(name.upper()), section, version)]
    in_item = after_tag = False
    for kind, body in blocks(lines[1:]):
        if kind == "h2":
            out.append(".SH " + escape(body))
            in_item = False
        elif kind == "h3":
            out += [".TP", line_out(r"\fB" + escape(body.strip("`")) + r"\fR")]
            in_item = True
        elif kind == "para":
            if not after_tag:
                out.append(".IP" if in_item else ".PP")
            out += [line_out(inline(t)) for t in body.split("\n")]
        elif kind == "bullet":
            out += [".IP \\(bu 2", line_out(inline(body))]
        elif kind == "code":
            out += [".IP" if in_item else ".PP", ".RS 4" if not in_item else ".RS 0", ".nf"]
            out += [line_out(escape(t)) if t else ".sp" for t in body]
            out += [".fi", ".RE"]
        after_tag = kind == "h3"
    return "\n".join(out) + "\n"


def main():
    if len(sys.argv) != 3:
        raise SystemExit("usage: md2man.py SOURCE.md VERSION")
    with open(sys.argv[1], encoding="utf-8") as f:
        sys.stdout.write(render(f.read(), sys.argv[2]))


if __name__ == "__main__":
    main()
