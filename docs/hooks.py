"""MkDocs hooks that assemble icefast's site from the repository itself (`hooks:` in mkdocs.yml).

Nothing is copied or generated on disk: the pages are added to MkDocs' file list at build time, each under
the path it has in the repository, so that a relative link works the same on GitHub and in the site:

- `index.md`, the landing page, is `README.md`;
- `nbs/NN_name.ipynb` is the notebook as a Markdown page (see `notebook_markdown`); a link to the
  `.ipynb` file leads to it;
- `docs/*.jpg|png` are the pictures the README shows;
- `api/<module>.md` holds `::: icefast.<module>` for mkdocstrings, one page per module, with a link to the
  notebook the module is exported from.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / 'nbs'
# the README is the landing page; nbs/index.ipynb is its old notebook source and is not published
SKIP_NOTEBOOKS = {'index.ipynb'}
# modules with no page of their own: the notebook namespace, the package re-exports, nbdev's symbol index
SKIP_MODULES = {'icefast', 'icefast.all', 'icefast.models', 'icefast._modidx'}
PICTURES = ('*.jpg', '*.jpeg', '*.png', '*.svg', '*.gif')


class NotebookFile(File):
    "A `.ipynb` file that MkDocs treats as a page (its content is the Markdown made by `notebook_markdown`)"
    def is_documentation_page(self) -> bool: return True


def _source(cell) -> str:
    src = cell.get('source', '')
    return ''.join(src) if isinstance(src, list) else src


def _directives(src: str):
    "nbdev's `#| name args` lines at the top of a cell, and the code without them"
    lines, found = src.splitlines(), {}
    while lines and re.match(r'\s*#\|', lines[0]):
        name, _, args = lines.pop(0).strip()[2:].strip().partition(' ')
        found[name.rstrip(':')] = args.strip()
    return found, '\n'.join(lines).strip('\n')


def _fence(code: str, lang: str = 'python', indent: str = '') -> str:
    "`code` in a fenced block whose fence is longer than any run of backticks in it"
    ticks = '`' * max(3, max((len(m) for m in re.findall(r'`+', code)), default=0) + 1)
    body = '\n'.join(indent + line if line else line for line in code.splitlines())
    return f'{indent}{ticks}{lang}\n{body}\n{indent}{ticks}'


def _outputs(cell) -> list[str]:
    "Stored outputs as Markdown: text as plain blocks, images inline (data URIs, so the site stays offline)"
    parts = []
    for out in cell.get('outputs', []):
        kind = out.get('output_type')
        if kind == 'stream':
            text = _source({'source': out.get('text', '')}).rstrip()
            if text: parts.append(_fence(text, 'text'))
        elif kind in ('execute_result', 'display_data'):
            data = out.get('data', {})
            for mime in ('image/png', 'image/jpeg'):
                if mime in data:
                    b64 = _source({'source': data[mime]}).replace('\n', '')
                    parts.append(f'![output](data:{mime};base64,{b64}){{ .nb-output }}')
                    break
            else:
                text = _source({'source': data.get('text/plain', '')}).rstrip()
                if text: parts.append(_fence(text, 'text'))
        elif kind == 'error':
            tb = '\n'.join(re.sub(r'\x1b\[[0-9;]*m', '', line) for line in out.get('traceback', []))
            parts.append(_fence(tb or f"{out.get('ename')}: {out.get('evalue')}", 'text'))
    return parts


def _defined(code: str) -> list[str]:
    "Names of the functions and classes a cell defines (a `@patch`ed `def f(self:Cls)` as `Cls.f`)"
    import ast
    try: tree = ast.parse(code)
    except SyntaxError: return []
    names = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            patched = any(ast.unparse(d).startswith('patch') for d in node.decorator_list)
            args = getattr(node, 'args', None)
            cls = args.args[0].annotation if patched and args and args.args and args.args[0].annotation else None
            names.append(f'{ast.unparse(cls)}.{node.name}' if cls is not None else node.name)
    public = [n for n in names if not n.rpartition('.')[2].startswith('_')]
    return public or names  # helpers named only where the cell has nothing public


def notebook_markdown(nb: dict, api_uri: str | None = None) -> str:
    """One notebook as Markdown, following nbdev's conventions: Markdown cells as written; `#| hide` and
    `#| default_exp` cells left out; exported code (`#| export`, `#| exporti`) folded under "Source"; other
    code shown with its stored outputs (directives removed). `api_uri`: the module's API page, linked
    after the notebook's first Markdown cell (its title)."""
    parts, linked = [], api_uri is None
    for cell in nb.get('cells', []):
        src = _source(cell)
        if cell.get('cell_type') == 'markdown':
            parts.append(src.strip('\n'))
            if not linked:
                mod = 'icefast.' + Path(api_uri).stem
                parts.append(f'!!! info "API reference"\n    Signatures, parameters and docstrings of this module: '
                             f'[`{mod}`](../{api_uri}).')
                linked = True
            continue
        if cell.get('cell_type') != 'code': continue
        flags, code = _directives(src)
        if 'hide' in flags or (not code and 'default_exp' in flags): continue
        if re.fullmatch(r'(\s*show_doc\(.*\)\s*)+', code, flags=re.S): continue  # the API pages document these
        if not code: continue
        if any(k in flags for k in ('export', 'exporti', 'exports')):
            names = _defined(code)
            title = 'Source: ' + ', '.join(names) if names else 'Source'
            parts.append(f'??? note "{title}"\n\n' + _fence(code, indent='    '))
        else:
            parts.append(_fence(code))
        parts.extend(_outputs(cell))
    return '\n\n'.join(parts) + '\n'


def _default_exp(nb: dict) -> str | None:
    for cell in nb.get('cells', []):
        if cell.get('cell_type') == 'code':
            flags, _ = _directives(_source(cell))
            if flags.get('default_exp'): return 'icefast.' + flags['default_exp']
    return None


def notebooks() -> dict[str, dict]:
    "`nbs/NAME.ipynb` -> the notebook, in file order"
    return {f'nbs/{p.name}': json.loads(p.read_text(encoding='utf-8'))
            for p in sorted(NBS.glob('*.ipynb')) if p.name not in SKIP_NOTEBOOKS}


def modules() -> list[str]:
    "The documented modules of the package, in import (flow) order of their notebooks where there is one"
    mods = []
    for p in sorted((ROOT / 'icefast').rglob('*.py')):
        parts = p.relative_to(ROOT).with_suffix('').parts
        name = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
        if name not in SKIP_MODULES and not parts[-1].startswith('_'): mods.append(name)
    nb_order = [m for m in (_default_exp(nb) for nb in notebooks().values()) if m in mods]
    return nb_order + [m for m in mods if m not in nb_order]


def _title(nb: dict, fallback: str) -> str:
    for cell in nb.get('cells', []):
        if cell.get('cell_type') == 'markdown':
            m = re.search(r'^#\s+(.+)$', _source(cell), re.M)
            if m: return m.group(1).strip()
    return fallback


def api_page(module: str, source_nb: str | None) -> str:
    lines = [f'# `{module}`', '']
    if source_nb:
        lines += [f'Exported from the notebook [`{source_nb}`](../{source_nb}), which shows it at work.', '']
    lines += [f'::: {module}', '']
    return '\n'.join(lines)


def _api_uri(module: str) -> str: return f"api/{module.removeprefix('icefast.')}.md"


def on_config(config, **kwargs):
    "The navigation: home, the tutorials (nbs/2x), the API reference, the library's notebooks"
    nbs = notebooks()
    tutorials = [{_title(nb, uri): uri} for uri, nb in nbs.items() if Path(uri).name[:1] == '2']
    library = [{_title(nb, uri): uri} for uri, nb in nbs.items() if Path(uri).name[:1] != '2']
    api = [{m.removeprefix('icefast.'): _api_uri(m)} for m in modules()]
    config['nav'] = [{'Home': 'index.md'}, {'Tutorials': tutorials}, {'API reference': api},
                     {'Library notebooks': library}]
    return config


def on_files(files: Files, config, **kwargs):
    readme = ROOT / 'README.md'
    files.append(File.generated(config, 'index.md', abs_src_path=str(readme)))
    nbs = notebooks()
    source_nb = {}
    documented = modules()
    for uri, nb in nbs.items():
        mod = _default_exp(nb)
        api = _api_uri(mod) if mod in documented else None
        files.append(NotebookFile.generated(config, uri, content=notebook_markdown(nb, api)))
        if mod: source_nb.setdefault(mod, uri)
    for m in documented:
        files.append(File.generated(config, _api_uri(m), content=api_page(m, source_nb.get(m))))
    for pattern in PICTURES:
        for p in sorted((ROOT / 'docs').glob(pattern)):
            files.append(File.generated(config, f'docs/{p.name}', abs_src_path=str(p)))
    return files
