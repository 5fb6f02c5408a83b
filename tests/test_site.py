"""The documentation site (#22): built with `mkdocs build --strict` and looked at in headless Chromium.

The site is built once into a temporary folder and served from 127.0.0.1; Chromium is driven over the DevTools
protocol on a pipe (`--remote-debugging-pipe`: no extra package, no websocket). For the landing page, a tutorial
and an API page the test checks the headings, code blocks and pictures the page renders, that every picture loaded
and every link inside the site leads to a built file (and anchor), that the page asked for nothing outside
127.0.0.1, and that the site's search box finds `fine_tune`. Screenshots of the pages go to `$ICEFAST_SITE_SHOTS`
(default: a pytest temporary folder; the path is printed).

Skipped, with the reason, where the `docs` extra (`pip install -e ".[docs]"`) or Chromium is missing; CI
(`.ci/run`) installs both.
"""
import base64
import functools
import http.server
import json
import os
import re
import select
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = {'landing': 'index.html', 'tutorial': 'nbs/20_getting_started.html', 'api': 'api/parsers.html'}


def find_chromium():
    for name in (os.environ.get('CHROMIUM'), 'chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable'):
        if name and shutil.which(name): return shutil.which(name)
    return None


def _missing_docs_packages():
    import importlib.util
    return [m for m in ('mkdocs', 'material', 'mkdocstrings', 'mkdocstrings_handlers.python')
            if importlib.util.find_spec(m.split('.')[0]) is None
            or (m == 'mkdocstrings_handlers.python' and importlib.util.find_spec(m) is None)]


# ---------------------------------------------------------------- README links (no mkdocs needed)
def test_readme_links_resolve_in_the_repository():
    "Relative links and pictures in README.md lead to files of the repository, so they work on GitHub too"
    text = (ROOT / 'README.md').read_text(encoding='utf-8')
    text = re.sub(r'```.*?```', '', text, flags=re.S)  # not inside code blocks
    targets = re.findall(r'\]\(([^)\s]+)(?:\s+"[^"]*")?\)', text)
    rel = [t for t in targets if not re.match(r'[a-z][a-z0-9+.-]*:', t) and not t.startswith('#')]
    assert rel, 'README.md links to no file of the repository'
    broken = [t for t in rel if not (ROOT / unquote(t.split('#')[0])).exists()]
    assert not broken, f'README.md links to missing files: {broken}'


# ---------------------------------------------------------------- the pieces (docs/hooks.py, docs/griffe_docments.py)
def _docs_module(name):
    missing = _missing_docs_packages()
    if missing: pytest.skip(f'the docs extra is not installed (no {", ".join(missing)}): pip install -e ".[docs]"')
    import importlib.util
    spec = importlib.util.spec_from_file_location(f'_icefast_docs_{name}', ROOT / 'docs' / f'{name}.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_docments_read_from_the_source():
    header_docments = _docs_module('griffe_docments').header_docments
    src = '''@delegates(other)
def f(a, # first
      b:int=(1, 2), # second, with (parens)
      # above c
      c=dict(x=1), *args, **kwargs # keywords
     )->int: # the result
    "doc"
    x = 1 # not a parameter
'''
    assert header_docments(src[src.index('def'):]) == {'a': 'first', 'b': 'second, with (parens)', 'c': 'above c',
                                                       'kwargs': 'keywords', 'return': 'the result'}
    assert header_docments('def g(self, x): pass') == {}


def test_notebook_as_markdown():
    hooks = _docs_module('hooks')
    png = base64.b64encode(b'not really a png').decode()
    nb = {'cells': [
        {'cell_type': 'markdown', 'source': ['# Title\n', '\n', '> summary']},
        {'cell_type': 'code', 'source': '#| default_exp thing', 'outputs': []},
        {'cell_type': 'code', 'source': '#| hide\ntest_eq(1, 1)', 'outputs': []},
        {'cell_type': 'code', 'source': '#| export\n@patch\ndef go(self:Learner): pass\ndef _helper(): pass',
         'outputs': []},
        {'cell_type': 'code', 'source': 'print("hi ```")', 'outputs': [
            {'output_type': 'stream', 'name': 'stdout', 'text': ['hi ```\n']},
            {'output_type': 'display_data', 'data': {'image/png': png, 'text/plain': ['<Figure>']}}]},
        {'cell_type': 'code', 'source': 'show_doc(go)', 'outputs': []},
    ]}
    md = hooks.notebook_markdown(nb, 'api/thing.md')
    assert md.startswith('# Title\n\n> summary\n\n!!! info "API reference"')
    assert '(../api/thing.md)' in md and 'test_eq' not in md and 'default_exp' not in md and 'show_doc' not in md
    assert '??? note "Source: Learner.go"\n\n    ```python\n    @patch' in md
    assert '````python\nprint("hi ```")\n````' in md and '````text\nhi ```\n````' in md
    assert f'![output](data:image/png;base64,{png})' in md and '<Figure>' not in md


# ---------------------------------------------------------------- the build
@pytest.fixture(scope='module')
def site(tmp_path_factory):
    missing = _missing_docs_packages()
    if missing: pytest.skip(f'the docs extra is not installed (no {", ".join(missing)}): pip install -e ".[docs]"')
    import fcntl
    # built once a test session: xdist workers share the session's base folder and wait for the first build
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base
    out, log = shared / 'icefast_site', shared / 'icefast_site.log'
    with open(f'{out}.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not log.is_file():
            env = {**os.environ, 'NO_MKDOCS_2_WARNING': '1', 'KMP_BLOCKTIME': '0'}
            t = time.monotonic()
            res = subprocess.run([sys.executable, '-m', 'mkdocs', 'build', '--strict', '--site-dir', str(out)],
                                 cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env, timeout=300)
            log.write_text(json.dumps({'rc': res.returncode, 'out': res.stdout + res.stderr,
                                       'seconds': round(time.monotonic() - t, 1)}))
        built = json.loads(log.read_text())
    assert built['rc'] == 0, f'mkdocs build --strict failed ({built["rc"]}):\n{built["out"]}'
    print(f'site built in {built["seconds"]}s: {out}')
    return out


def test_site_has_the_pages(site):
    for page in PAGES.values(): assert (site / page).is_file(), page
    for f in ('docs/demo_results.jpg', 'search/search_index.json', 'nbs/25_offline_kaggle.html', 'api/learner.html'):
        assert (site / f).is_file(), f


def test_patched_methods_are_documented_in_their_class(site):
    "A `@patch`ed `def f(self:Cls)` (one definition per notebook cell) is `Cls.f` on the API page, not a module function"
    ids = set(re.findall(r'\bid="([^"]+)"', (site / 'api' / 'learner.html').read_text(encoding='utf-8')))
    for name in ('DetectionLearner.predict', 'DetectionLearner.thresholds', 'DetectionAdapter.evaluator', 'RunCheckpoint.restore',
                 'DetectionLearner.per_class', 'DetectionInterpretation.per_class'):  # the last two: one name, two classes
        assert f'icefast.learner.{name}' in ids, name
    assert not {'icefast.learner.predict', 'icefast.learner.per_class', 'icefast.learner.restore'} & ids


def test_site_loads_nothing_from_the_internet(site):
    "No web fonts, no CDN scripts or styles: the built pages reference only the site's own files"
    bad = {}
    for f in site.rglob('*'):
        if f.suffix not in ('.html', '.css'): continue
        text = f.read_text(encoding='utf-8', errors='replace')
        hits = re.findall(r'fonts\.googleapis|fonts\.gstatic', text)
        hits += re.findall(r'<(?:script|img|iframe|source)\b[^>]*\bsrc="(?:https?:)?//[^"]+"', text)
        hits += [m for m in re.findall(r'<link\b[^>]*>', text)
                 if re.search(r'href="(?:https?:)?//', m) and not re.search(r'rel="(?:canonical|alternate)"', m)]
        hits += re.findall(r'@import\s+url\(["\']?(?:https?:)?//[^)]+\)', text)
        if hits: bad[str(f.relative_to(site))] = hits[:3]
    assert not bad, f'external resources in the built site: {bad}'


def test_every_internal_link_and_picture_resolves(site):
    "In every built page, each relative href/src leads to a built file, and each #anchor to an element id there"
    ids, broken = {}, []
    id_of = lambda f: ids.setdefault(f, set(re.findall(r'\bid="([^"]+)"', f.read_text(encoding='utf-8'))))
    pages = sorted(site.rglob('*.html'))
    for page in pages:
        text = page.read_text(encoding='utf-8')
        for attr, url in re.findall(r'<(?:a|img|link|script|source)\b[^>]*?\b(href|src)="([^"]*)"', text):
            if re.match(r'[a-z][a-z0-9+.-]*:|//', url) or url.startswith('#') and not url[1:]: continue
            path, _, frag = url.partition('#')
            base = site if path.startswith('/') else page.parent  # 404.html links from the site's root
            target = (base / unquote(path.split('?')[0]).lstrip('/')).resolve() if path else page
            if target.is_dir(): target = target / 'index.html'
            if not target.is_file(): broken.append(f'{page.relative_to(site)}: {url}')
            elif frag and target.suffix == '.html' and unquote(frag) not in id_of(target):
                broken.append(f'{page.relative_to(site)}: {url} (no such anchor)')
    assert len(pages) > 30, len(pages)
    assert not broken, f'{len(broken)} broken links in the site: {broken[:20]}'


def test_search_index_has_fine_tune(site):
    index = json.loads((site / 'search' / 'search_index.json').read_text(encoding='utf-8'))
    hits = {d['location'].split('#')[0] for d in index['docs'] if 'fine_tune' in d['text'] or 'fine_tune' in d['title']}
    assert 'index.html' in hits and 'nbs/20_getting_started.html' in hits, sorted(hits)


# ---------------------------------------------------------------- the browser
class Chromium:
    "Just enough of the DevTools protocol over `--remote-debugging-pipe` (fd 3 in, fd 4 out, messages end with NUL)"

    def __init__(self, exe, width=1280, height=900):
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()

        def child_fds():  # Chromium reads fd 3 and writes fd 4 (copies first: the pipes may already sit on 3 or 4)
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(a, 3); os.dup2(b, 4)

        args = [exe, '--headless=new', '--remote-debugging-pipe', '--no-sandbox', '--disable-gpu',
                '--disable-dev-shm-usage', '--no-first-run', '--no-default-browser-check', '--disable-extensions',
                '--disable-background-networking', '--disable-sync', '--mute-audio', '--hide-scrollbars',
                # any host but the local server is unreachable: a page that needs the internet shows it
                '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1',
                f'--window-size={width},{height}', f'--user-data-dir={self._profile()}', 'about:blank']
        # close_fds=False: subprocess would close fds 3 and 4 after `child_fds`; the rest are not inheritable anyway
        self.proc = subprocess.Popen(args, close_fds=False, preexec_fn=child_fds,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r); os.close(from_chrome_w)
        self._buf, self._id, self.events = b'', 0, []
        target = self.call('Target.createTarget', url='about:blank')['targetId']
        self.session = self.call('Target.attachToTarget', targetId=target, flatten=True)['sessionId']
        for domain in ('Page', 'Network', 'Runtime'): self.call(f'{domain}.enable', session=True)
        self.call('Emulation.setDeviceMetricsOverride', session=True, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def _profile(self):
        import tempfile
        self._tmp = tempfile.mkdtemp(prefix='icefast-chromium-')
        return self._tmp

    def _read(self, timeout):
        "The next message from Chromium, or None after `timeout` seconds"
        deadline = time.monotonic() + timeout
        while b'\0' not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]: return None
            chunk = os.read(self._r, 1 << 20)
            if not chunk: raise RuntimeError(f'Chromium closed the DevTools pipe (exit {self.proc.poll()})')
            self._buf += chunk
        msg, self._buf = self._buf.split(b'\0', 1)
        return json.loads(msg)

    def call(self, method, session=False, timeout=30, **params):
        self._id += 1
        msg = {'id': self._id, 'method': method, 'params': params}
        if session: msg['sessionId'] = self.session
        os.write(self._w, json.dumps(msg).encode() + b'\0')
        deadline = time.monotonic() + timeout
        while True:
            res = self._read(max(0.0, deadline - time.monotonic()))
            if res is None: raise TimeoutError(f'{method}: no answer from Chromium in {timeout}s')
            if res.get('id') == self._id:
                if 'error' in res: raise RuntimeError(f'{method}: {res["error"]}')
                return res.get('result', {})
            if 'method' in res: self.events.append(res)

    def pump(self, seconds):
        "Collect events for `seconds`"
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            res = self._read(left)
            if res is not None and 'method' in res: self.events.append(res)

    def js(self, expression):
        res = self.call('Runtime.evaluate', session=True, expression=expression, returnByValue=True, awaitPromise=True)
        if 'exceptionDetails' in res: raise RuntimeError(f'{expression[:80]}...: {res["exceptionDetails"]}')
        return res['result'].get('value')

    def goto(self, url, timeout=30):
        self.events.clear()
        self.call('Page.navigate', session=True, url=url)
        deadline = time.monotonic() + timeout
        while not any(e['method'] == 'Page.loadEventFired' for e in self.events):
            if time.monotonic() > deadline: raise TimeoutError(f'{url} did not load in {timeout}s')
            self.pump(0.2)
        self.wait_for('document.fonts.ready.then(() => true)')

    def wait_for(self, expression, timeout=15):
        "Poll a JavaScript expression until it is truthy; its last value"
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(expression)
            if value or time.monotonic() > deadline: return value
            self.pump(0.2)

    def screenshot(self, path):
        data = self.call('Page.captureScreenshot', session=True, format='png')['data']
        Path(path).write_bytes(base64.b64decode(data))
        return path

    def requests(self):
        "(url, failure or HTTP status >= 400 or None) of every request since the last `goto`"
        urls = {e['params']['requestId']: e['params']['request']['url']
                for e in self.events if e['method'] == 'Network.requestWillBeSent'}
        bad = {e['params']['requestId']: e['params']['errorText']
               for e in self.events if e['method'] == 'Network.loadingFailed'}
        bad.update({e['params']['requestId']: e['params']['response']['status'] for e in self.events
                    if e['method'] == 'Network.responseReceived' and e['params']['response']['status'] >= 400})
        return [(u, bad.get(r)) for r, u in urls.items()]

    def close(self):
        try: self.call('Browser.close', timeout=5)
        except Exception: pass
        try: self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait()
        for fd in (self._r, self._w):
            try: os.close(fd)
            except OSError: pass
        shutil.rmtree(self._tmp, ignore_errors=True)


@pytest.fixture(scope='module')
def server(site):
    handler = functools.partial(Quiet, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}/'
    httpd.shutdown(); httpd.server_close()


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args): pass


@pytest.fixture(scope='module')
def browser(site):
    exe = find_chromium()
    if exe is None: pytest.skip('no Chromium found (chromium, chromium-browser, google-chrome or $CHROMIUM); '
                                'Debian: apt-get install chromium')
    b = Chromium(exe)
    yield b
    b.close()


@pytest.fixture(scope='module')
def shots(tmp_path_factory):
    d = Path(os.environ['ICEFAST_SITE_SHOTS']) if os.environ.get('ICEFAST_SITE_SHOTS') else tmp_path_factory.mktemp('shots')
    d.mkdir(parents=True, exist_ok=True)
    return d


# what each page is expected to render
EXPECT = {
    'landing': dict(h1='icefast', h2=['Install', 'Quick tour'], min_code=5, imgs=['docs/demo_results.jpg'],
                    text=['fine_tune']),
    'tutorial': dict(h1='Getting started: object detection', h2=['Parsing the annotations', 'DataLoaders'], min_code=10,
                     imgs=[], text=['COCOParser(ann_file, img_dir)']),
    # the docments of COCOParser's parameters, rendered as its parameters table
    'api': dict(h1='icefast.parsers', h2=['COCOParser', 'VOCParser'], min_code=5, imgs=[],
                text=['annotations_file', 'COCO JSON file', 'Folder of the images named by']),
}

PAGE_FACTS = r'''(() => {
  const text = e => e.textContent.replace(/\u00b6/g, '').trim();
  const article = document.querySelector('article') || document.body;
  return {
    h1: [...article.querySelectorAll('h1')].map(text),
    h2: [...article.querySelectorAll('h2')].map(text),
    code: article.querySelectorAll('pre code, div.highlight pre').length,
    imgs: [...document.images].map(i => ({src: i.currentSrc || i.src, ok: i.complete && i.naturalWidth > 0,
                                          w: i.getBoundingClientRect().width})),
    links: [...document.querySelectorAll('a[href]')].map(a => a.href),
    ids: [...document.querySelectorAll('[id]')].map(e => e.id),
    article: article.innerText,
  };
})()'''


def _site_file(site, base, url):
    "The built file an internal URL leads to, or None for a URL outside the site"
    parts = urlsplit(url)
    if not url.startswith(base): return None
    rel = unquote(parts.path)[len(urlsplit(base).path):]
    f = site / rel
    return f / 'index.html' if (not rel or rel.endswith('/') or f.is_dir()) else f


@pytest.mark.parametrize('name', list(PAGES))
def test_page_renders_in_chromium(name, site, server, browser, shots):
    url = urljoin(server, PAGES[name])
    browser.goto(url)
    facts = browser.js(PAGE_FACTS)
    exp = EXPECT[name]
    assert any(exp['h1'] in h for h in facts['h1']), f'{name}: h1 {facts["h1"]}'
    for h in exp['h2']: assert any(h in x for x in facts['h2']), f'{name}: no heading {h!r} in {facts["h2"]}'
    assert facts['code'] >= exp['min_code'], f'{name}: {facts["code"]} code blocks'
    for t in exp['text']: assert t in facts['article'], f'{name}: {t!r} not on the page'

    # pictures: every one decoded, the expected ones there and visible
    broken = [i['src'] for i in facts['imgs'] if not i['ok']]
    assert not broken, f'{name}: broken images {broken}'
    for src in exp['imgs']:
        assert any(i['src'] == urljoin(server, src) and i['w'] > 100 for i in facts['imgs']), f'{name}: no {src}'

    # links inside the site: each leads to a built file, and an anchor to an element of it
    missing = []
    for link in facts['links']:
        f = _site_file(site, server, link)
        if f is None: continue
        if not f.is_file(): missing.append(link); continue
        frag = unquote(urlsplit(link).fragment)
        if frag and f.suffix == '.html':
            ids = facts['ids'] if f == _site_file(site, server, url) else \
                re.findall(r'\bid="([^"]+)"', f.read_text(encoding='utf-8'))
            if frag not in ids: missing.append(link)
    assert not missing, f'{name}: links to missing pages or anchors: {missing}'

    # nothing asked of the internet, nothing failed
    outside = [u for u, _ in browser.requests() if not u.startswith((server, 'data:', 'blob:', 'about:'))]
    assert not outside, f'{name}: requests outside the site: {outside}'
    failed = [(u, why) for u, why in browser.requests() if why is not None]
    assert not failed, f'{name}: failed requests: {failed}'

    shot = browser.screenshot(shots / f'{name}.png')
    print(f'screenshot: {shot}')
    if exp['imgs']:  # and the first expected picture, scrolled into view
        browser.js(f"document.querySelector('img[src$=\"{exp['imgs'][0]}\"]').scrollIntoView({{block: 'center'}})")
        browser.pump(0.3)
        print(f'screenshot: {browser.screenshot(shots / f"{name}_picture.png")}')


def test_search_finds_fine_tune(site, server, browser, shots):
    "The search box, deep-linked with ?q=, lists results for fine_tune (material's search runs in a web worker)"
    browser.goto(urljoin(server, 'index.html?q=fine_tune'))
    n = browser.wait_for("document.querySelectorAll('.md-search-result__item').length", timeout=20)
    assert n, 'the search box shows no result for fine_tune'
    facts = browser.js(r'''({meta: document.querySelector('.md-search-result__meta').textContent,
        hrefs: [...document.querySelectorAll('.md-search-result__item a')].map(a => a.href)})''')
    # its definition among the results (material lists the best-ranked first; tutorials that use it may rank lower)
    assert any('api/learner.html' in h and 'DetectionLearner.fine_tune' in h for h in facts['hrefs']), facts
    outside = [u for u, _ in browser.requests() if not u.startswith((server, 'data:', 'blob:', 'about:'))]
    assert not outside, f'search: requests outside the site: {outside}'
    print(f'search: {facts["meta"]}; screenshot: {browser.screenshot(shots / "search.png")}')
