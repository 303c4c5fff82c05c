"""Write a packed, self-extracting copy of train_gpt.py: the same program in a fraction of the counted bytes.

    python3 records/pack_script.py [--source train_gpt.py] [--out <source dir>/train_gpt_packed.py]

The artifact counts the bytes of the script that runs (`artifact code_bytes:` is len(Path(__file__).read_bytes())).
The packed copy holds the source without comments and docstrings, indented one space per level (every line keeps
its number; the packer checks that the syntax tree, docstrings aside, is unchanged), compressed with brotli or lzma
(the smaller; train_gpt.py imports brotli itself) and written as 7-bit text: the file stays UTF-8, because the
script logs its own source with read_text(encoding="utf-8"). Run the packed copy instead of train_gpt.py:

    torchrun --standalone --nproc_per_node=8 train_gpt_packed.py

It runs the embedded source in its own globals, so __file__ and __name__ are the packed file's: its code bytes, the
source in its log and the script make_record.py copies (as the records folder's train_gpt.py) are all the packed
file, and `import train_gpt_packed` defines the same names as `import train_gpt`. Keep it beside the source: that
is where the script finds records/make_record.py, and where make_record.py finds the readable source, which it
copies into the records folder as train_gpt_readable.py (not counted). Tracebacks name train_gpt_readable.py with
the readable source's line numbers.

stdout gets one line: `pack:written path:<out> bytes:<n> source_bytes:<n> stripped_bytes:<n> codec:<name>`.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import lzma
import re
import sys
import tokenize
from pathlib import Path
from typing import Callable

import brotli

READABLE = "train_gpt_readable.py"  # the readable source's name in a records folder, and in tracebacks
UNSAFE = "\0\n\r\"\\"  # 7-bit values a one-line "..." literal cannot hold as themselves: written as chr(0x100 | v)
LZMA_FILTERS = [{"id": lzma.FILTER_LZMA1, "preset": 9 | lzma.PRESET_EXTREME, "lc": 3, "lp": 0, "pb": 0}]
CODECS = {  # name: (compress, decompress, the packed file's expression that decompresses the bytes %s)
    "brotli": (lambda b: brotli.compress(b, quality=11, lgwin=24), brotli.decompress,
               '__import__("brotli").decompress(%s)'),
    "lzma": (lambda b: lzma.compress(b, lzma.FORMAT_ALONE, filters=LZMA_FILTERS), lzma.decompress,
             '__import__("lzma").decompress(%s)'),
}
READS_TEXT = {"__doc__", "getdoc", "get_docstring", "getcomments", "getsource", "getsourcelines"}  # strip_source
HEADER = re.compile(r"# Packed by records/pack_script\.py from (\S+) \(sha256:([0-9a-f]{64}) (\w+)\)")
STUB = '''\
# Packed by records/pack_script.py from {name} (sha256:{sha256} {codec})
# = that file without comments and docstrings, line for line; a records folder keeps it as {readable}.
_packed = "{blob}"
exec((lambda s, name="{readable}": (__import__("linecache").cache.__setitem__(
    name, (len(s), None, __import__("io").StringIO(s).readlines(), name)), compile(s, name, "exec"))[1])(
    {decompress}.decode()))
'''
BYTES = 'int("".join(f"{ord(c) & 127:07b}" for c in globals().pop("_packed")), 2).to_bytes(%d, "big")'


class PackError(Exception):
    """The stripped source is not the same program (a construct the stripper does not handle)."""


# --- stripping: the same program, line for line ---


def docstrings(tree: ast.Module) -> list[tuple[ast.AST, ast.Expr]]:
    """(owner, docstring statement) for the module, every class and every function."""
    owners = [n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                                           ast.AsyncFunctionDef))]
    return [(n, n.body[0]) for n in owners if n.body and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant) and isinstance(n.body[0].value.value, str)]


def drop_docstrings(source: str) -> str:
    """Each docstring becomes blank lines (`...` where it is the whole body)."""
    lines = source.splitlines(True)
    for owner, doc in docstrings(ast.parse(source)):
        first, last = lines[doc.lineno - 1].encode(), lines[doc.end_lineno - 1].encode()  # offsets are UTF-8 bytes
        keep = "..." if len(owner.body) == 1 else ""
        rest = last[doc.end_col_offset:]
        if rest.lstrip().startswith(b";"):  # `"""Doc."""; x = 1`: the statement after it stays valid
            rest = rest.lstrip()[1:].lstrip()
        lines[doc.lineno - 1] = (first[:doc.col_offset] + keep.encode() + rest).decode()
        for k in range(doc.lineno, doc.end_lineno):
            lines[k] = "\n"
    return "".join(lines)


def drop_comments_and_indent(source: str) -> str:
    """Comments go, each statement is indented one space per level, continuation lines not at all.

    Lines inside a multi-line string are kept as they are (they are the string's value).
    """
    inside_string: set[int] = set()
    line_start: dict[int, str] = {}  # row -> new leading whitespace, for rows where a token starts the line
    comments: dict[int, int] = {}  # row -> column where its comment starts
    depth, logical = 0, True
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.INDENT, tokenize.DEDENT):
            depth += 1 if tok.type == tokenize.INDENT else -1
            continue
        inside_string.update(range(tok.start[0] + 1, tok.end[0] + 1))
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.start[1]
        if tok.type in (tokenize.NL, tokenize.COMMENT, tokenize.ENDMARKER):
            continue
        line_start.setdefault(tok.start[0], " " * depth if logical else "")
        logical = tok.type == tokenize.NEWLINE
    out = []
    for row, line in enumerate(source.splitlines(True), 1):
        if row in comments:
            line = line[:comments[row]].rstrip() + "\n"
        if row not in inside_string:
            line = line_start.get(row, "") + line.lstrip(" \t") if line.strip() else "\n"
        out.append(line)
    return "".join(out)


def strip_source(source: str) -> str:
    """The source without comments and docstrings, re-indented; raises PackError unless it is the same program."""
    expected = ast.parse(source)
    readers = {n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(expected)
               if isinstance(n, (ast.Name, ast.Attribute))} & READS_TEXT
    if readers:
        raise PackError(f"the source reads its own docstrings or comments ({', '.join(sorted(readers))})")
    try:
        stripped = drop_comments_and_indent(drop_docstrings(source))
        got = ast.parse(stripped)
    except (SyntaxError, tokenize.TokenError) as err:
        raise PackError(f"the stripped source does not parse: {err}") from None
    for owner, doc in docstrings(expected):
        if len(owner.body) > 1:
            owner.body.remove(doc)
        else:
            doc.value.value = ...
    if ast.dump(got) != ast.dump(expected):
        raise PackError("stripping changed the program's syntax tree")
    lines = [(type(n).__name__, n.lineno) for n in ast.walk(got) if hasattr(n, "lineno")]
    if lines != [(type(n).__name__, n.lineno) for n in ast.walk(expected) if hasattr(n, "lineno")]:
        raise PackError("stripping moved a statement to another line")
    return stripped


# --- 7-bit text ---


def encode_text(data: bytes) -> str:
    """Seven bits a character, as one line of a "..." literal (UNSAFE values become two-byte characters)."""
    count = -(-len(data) * 8 // 7)
    bits = format(int.from_bytes(data, "big"), "b").zfill(7 * count)
    values = [int(bits[i:i + 7], 2) for i in range(0, 7 * count, 7)]
    return "".join(chr(v | 0x100) if chr(v) in UNSAFE else chr(v) for v in values)


def decode_text(text: str) -> bytes:
    """The inverse of encode_text (the packed file does the same inline)."""
    return int("".join(f"{ord(c) & 127:07b}" for c in text), 2).to_bytes(len(text) * 7 // 8, "big")


# --- packing and unpacking ---


def pack(source: str, name: str = "train_gpt.py") -> str:
    """The packed file's text for `source` (the readable file's text; `name` is its file name)."""
    stripped = strip_source(source).encode("utf-8")
    codec, data = min(((c, compress(stripped)) for c, (compress, _, _) in CODECS.items()), key=lambda cd: len(cd[1]))
    text = STUB.format(name=name, sha256=hashlib.sha256(source.encode("utf-8")).hexdigest(), codec=codec,
                       readable=READABLE, blob=encode_text(data),
                       decompress=CODECS[codec][2] % (BYTES % len(data)))
    if unpack(text) != stripped.decode("utf-8"):
        raise PackError("the packed text does not round-trip")
    return text


def unpack(packed: str) -> str:
    """The source a packed file runs (comments and docstrings stripped)."""
    codec = HEADER.match(packed).group(3)
    blob = re.search(r'^_packed = "(.*)"$', packed, re.M).group(1)
    return CODECS[codec][1](decode_text(blob)).decode("utf-8")


def readable_source(script: Path, note: Callable[[str], None]) -> bytes | None:
    """For a packed script, the readable source to keep beside it; None for a script that is not packed.

    The source it names (or train_gpt_readable.py) beside it when that file has the sha256 the header records and
    strips to the embedded code; else, with a note, the embedded code itself (what ran, without comments).
    """
    packed = script.read_text(encoding="utf-8")
    header = HEADER.match(packed)
    if not header:
        return None
    name, digest = header.group(1), header.group(2)
    for candidate in (script.with_name(name), script.with_name(READABLE)):
        if candidate.is_file() and hashlib.sha256(candidate.read_bytes()).hexdigest() == digest:
            if strip_source(candidate.read_text(encoding="utf-8")) == unpack(packed):
                return candidate.read_bytes()
    note(f"no {name} with sha256:{digest} beside {script}: {READABLE} is the packed code (comments stripped)")
    return unpack(packed).encode("utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default=Path("train_gpt.py"), type=Path, help="the readable script")
    ap.add_argument("--out", type=Path, help="default: train_gpt_packed.py beside --source")
    args = ap.parse_args(argv)
    out = args.out or args.source.with_name("train_gpt_packed.py")
    source = args.source.read_text(encoding="utf-8")
    try:
        text = pack(source, args.source.name)
    except PackError as err:
        print(f"pack:failed reason:{err}")
        return 2
    out.write_bytes(text.encode("utf-8"))
    codec = HEADER.match(text).group(3)
    print(f"pack:written path:{out} bytes:{len(text.encode('utf-8'))} source_bytes:{len(source.encode('utf-8'))} "
          f"stripped_bytes:{len(strip_source(source).encode('utf-8'))} codec:{codec}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
