"""A griffe extension that reads fastai-style *docments*, the comments next to parameters, into docstrings.

icefast documents parameters the nbdev way:

    def dataloaders(records, # `Record`s to split and load
                    size:int=384, # Letterbox size, pixels
                   )->DataLoaders: # train and valid

griffe (mkdocstrings' Python reader) knows nothing of these comments. This extension reads them from the
source, statically (nothing is imported), and appends them to the docstring as a Google-style `Args:` /
`Returns:` section, which mkdocstrings renders as the parameters table. A docstring that already has such a
section is left alone. Trailing comments of class and module attributes (`label: str # Class name`, as in
dataclasses) become the attribute's docstring.
"""
from __future__ import annotations

import io
import re
import textwrap
import tokenize

import griffe

_SECTION = re.compile(r'^\s*(Args|Arguments|Parameters|Params|Returns)\s*:\s*$', re.M)


def _clean(comment: str) -> str | None:
    text = comment.lstrip('#').strip()
    if not text or text.startswith('|') or text.lower().startswith(('noqa', 'type:', 'pragma')): return None
    return text


def header_docments(src: str) -> dict[str, str]:
    """Comments on the parameters (and on the return, key `'return'`) of the first `def` in `src`.

    A comment on the same line as a parameter belongs to it; a comment alone on its line belongs to the next
    parameter; a comment after the closing parenthesis (or the return annotation) belongs to the return."""
    docs, line_of, pending = {}, {}, []
    depth, started, closed, expect_name, current = 0, False, False, False, None
    try:
        for tok in tokenize.generate_tokens(io.StringIO(textwrap.dedent(src)).readline):
            typ, s = tok.type, tok.string
            if closed:
                if typ == tokenize.COMMENT and _clean(s): docs['return'] = _clean(s)
                if typ in (tokenize.NEWLINE, tokenize.NL) and ended_header: break
                if typ == tokenize.OP and s == ':' and depth == 0: ended_header = True
                if typ == tokenize.OP and s in '([{': depth += 1
                if typ == tokenize.OP and s in ')]}': depth -= 1
                continue
            if typ == tokenize.OP and s in '([{':
                depth += 1
                if not started and s == '(': started, expect_name = True, True
                continue
            if typ == tokenize.OP and s in ')]}':
                depth -= 1
                if started and depth == 0: closed, ended_header = True, False
                continue
            if not started: continue
            if depth == 1 and typ == tokenize.OP and s == ',': expect_name = True; continue
            if depth == 1 and typ == tokenize.OP and s in ('*', '**', '/'): continue
            if depth == 1 and expect_name and typ == tokenize.NAME:
                current, expect_name = s, False
                line_of[s] = tok.start[0]
                if pending: docs[s], pending = ' '.join(pending), []
                continue
            if typ == tokenize.COMMENT and _clean(s):
                text = _clean(s)
                if current is not None and tok.start[0] == line_of[current]: docs[current] = text
                elif tok.line.strip().startswith('#'): pending.append(text)
                elif current is not None: docs[current] = text
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return docs


def _append(obj, text: str, agent=None):
    if obj.docstring is None:
        # the loader's parser, as for docstrings it found itself; the value set after `cleandoc`, which would
        # strip the section's indentation from a docstring that starts with the section
        obj.docstring = griffe.Docstring('', lineno=obj.lineno, endlineno=obj.lineno, parent=obj,
                                         parser=getattr(agent, 'docstring_parser', None),
                                         parser_options=getattr(agent, 'docstring_options', None))
        obj.docstring.value = text.strip('\n')
    else:
        obj.docstring.value = obj.docstring.value.rstrip('\n') + '\n\n' + text.strip('\n')


class Docments(griffe.Extension):
    "Parameter comments (fastcore's docments) as the docstring's Args and Returns sections"

    def on_function_instance(self, *, func: griffe.Function, agent=None, **kwargs):
        try: src = func.source
        except Exception: return
        m = re.search(r'^[ \t]*(async[ \t]+)?def[ \t]', src or '', re.M)  # past any decorators
        if not m: return
        docs = header_docments(src[m.start():])
        self._label_patch(func)
        names = {p.name: p for p in func.parameters}
        args = [(n, d) for n, d in docs.items() if n in names and n not in ('self', 'cls')]
        if func.docstring is not None and _SECTION.search(func.docstring.value): return
        sections = []
        if args:
            sections.append('Args:\n' + '\n'.join(
                f"    {'*' if names[n].kind is griffe.ParameterKind.var_positional else ''}"
                f"{'**' if names[n].kind is griffe.ParameterKind.var_keyword else ''}{n}: {d}" for n, d in args))
        if docs.get('return'): sections.append('Returns:\n    ' + docs['return'])
        if sections: _append(func, '\n\n'.join(sections), agent)

    @staticmethod
    def _label_patch(func):
        """fastcore's `@patch` makes a module-level `def f(self:Cls, ...)` a method of `Cls`: document it there, as
        `Cls.f` (a property with `as_prop=True`); a class from elsewhere gets a label on the function instead"""
        if not isinstance(func.parent, griffe.Module) or not func.parameters: return
        deco = next((str(d.value) for d in func.decorators if re.match(r'(fastcore\.basics\.)?patch\b', str(d.value))), None)
        if deco is None: return
        anno = func.parameters[0].annotation
        if anno is None: return
        module, cls = func.parent, func.parent.members.get(str(anno))
        if not isinstance(cls, griffe.Class) or module.members.get(func.name) is not func:
            func.labels.add(f'method of {anno}'); return
        module.del_member(func.name)
        cls.set_member(func.name, func)
        func.parent = cls
        if 'as_prop' in deco: func.labels.add('property')

    def on_attribute_instance(self, *, attr: griffe.Attribute, agent=None, **kwargs):
        if attr.docstring is not None or not attr.lineno: return
        if not isinstance(attr.parent, (griffe.Class, griffe.Module)): return
        try: line = attr.lines[0]
        except Exception: return
        try: toks = list(tokenize.generate_tokens(io.StringIO(line.strip() + '\n').readline))
        except (tokenize.TokenError, IndentationError, SyntaxError): return
        comments = [_clean(t.string) for t in toks if t.type == tokenize.COMMENT]
        if comments and comments[-1]: _append(attr, comments[-1], agent)
