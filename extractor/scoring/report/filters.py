"""Filtering the report page by class and status: the selects, the one inline script (`FILTER_JS`, no network,
the page stays one file) and the Content-Security-Policy that allows that script by its hash and nothing else."""
from __future__ import annotations

import base64
import hashlib
import html


# Filtering: elements of class `fc` carry data-class, those of class `fs` data-status (each a `_key`, the options'
# values); a record (`rec`) shows when its status passes and any of its errors' classes does, its marks of other
# classes unmarked. The address's #class=NAME&status=NAME picks options by their text. Plain DOM calls, run
# once the page is parsed.
FILTER_JS = """(function () {
  var cls = document.getElementById('f-class'), st = document.getElementById('f-status');
  var count = document.getElementById('f-shown');
  function pick(select, name) {
    for (var i = 1; i < select.options.length; i++) {
      if (select.options[i].text === name) { select.selectedIndex = i; return; }
    }
  }
  function chosen(select) {
    return select.selectedIndex > 0 ? select.options[select.selectedIndex].text : '';
  }
  function apply() {
    var c = cls.value, s = st.value, shown = 0;
    document.querySelectorAll('.fc').forEach(function (el) {
      el.hidden = c !== '' && el.getAttribute('data-class') !== c;
    });
    document.querySelectorAll('.fs').forEach(function (el) {
      el.hidden = s !== '' && el.getAttribute('data-status') !== s;
    });
    document.querySelectorAll('mark[data-classes]').forEach(function (m) {
      m.classList.toggle('off', c !== '' && m.getAttribute('data-classes').split(' ').indexOf(c) < 0);
    });
    document.querySelectorAll('.rec').forEach(function (el) {
      var items = el.querySelectorAll('li.fc'), any = c === '' && items.length === 0;
      items.forEach(function (li) { any = any || !li.hidden; });
      el.hidden = !any || (s !== '' && el.getAttribute('data-status') !== s);
      shown += el.hidden ? 0 : 1;
    });
    if (count) count.textContent = String(shown);
    var hash = new URLSearchParams();
    if (c !== '') hash.set('class', chosen(cls));
    if (s !== '') hash.set('status', chosen(st));
    history.replaceState(null, '', hash.toString() ? '#' + hash.toString() : location.pathname);
  }
  var wanted = new URLSearchParams(location.hash.slice(1));
  if (wanted.has('class')) pick(cls, wanted.get('class'));
  if (wanted.has('status')) pick(st, wanted.get('status'));
  cls.addEventListener('change', apply);
  st.addEventListener('change', apply);
  apply();
})();"""


def csp_meta() -> str:
    """No network, no plugin, no script but FILTER_JS (by its hash); inline styles for the charts."""
    digest = base64.b64encode(hashlib.sha256(FILTER_JS.encode("utf-8")).digest()).decode("ascii")
    return ("<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
            f"style-src 'unsafe-inline'; img-src data:; script-src 'sha256-{digest}'\">")


def filter_script() -> str:
    return f"<script>{FILTER_JS}</script>"


def filter_form(classes: list[str], statuses: list[str], records: bool = True) -> str:
    """The class and status selects (a class is a field where there is no gold); records: whether to count the
    error records shown."""
    e = html.escape
    opts = lambda names: "".join(f"<option value='{filter_key(n)}'>{e(n)}</option>" for n in names)  # noqa: E731
    shown = "<span>records shown: <b id='f-shown'>–</b></span>" if records else ""
    return (f"<form id='filters'><label>class <select id='f-class'><option value=''>all"
            f"</option>{opts(classes)}</select></label><label>status <select id='f-status'><option value=''>"
            f"all</option>{opts(statuses)}</select></label>{shown}</form>")


def filter_key(name) -> str:
    """A class or status as the filters know it: a digest, so no value of the data sits in an attribute."""
    return "k" + hashlib.sha256(str(name).encode("utf-8", "surrogatepass")).hexdigest()[:16]


def statuses_of(result: dict) -> list[str]:
    return list(result.get("status_counts") or {})
