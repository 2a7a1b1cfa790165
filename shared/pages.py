"""Small plain-HTML pages for the browser flows (connect, disconnect), and the request/response
shapes the HTTP adapters translate to and from (``shared/`` never imports the Functions runtime).

Every value is HTML-escaped. Pages load nothing from anywhere (no scripts, inline style only) and
go out with headers that keep them out of caches and frames, and keep the callback URL, which
holds an authorization code, out of ``Referer`` headers.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

# Larger bodies are not a sign-in response or one of our forms.
MAX_FORM_BYTES = 16 * 1024
MAX_FORM_FIELDS = 32

PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; "
                               "base-uri 'none'",
}

_STYLE = ("body{font-family:system-ui,sans-serif;max-width:36rem;margin:3rem auto;padding:0 1rem;"
          "line-height:1.5;color:#222}h1{font-size:1.4rem}.muted{color:#666;font-size:.9rem}"
          "button{font-size:1rem;padding:.4rem 1rem}")


class FormRefused(ValueError):
    """A URL-encoded POST body that cannot be one of our forms (or a sign-in response)."""


@dataclass
class WebRequest:
    """What a browser sent: method, query parameters, raw body and headers (lower-case names)."""

    method: str
    params: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str:
        return str(self.headers.get(name.lower()) or "")

    @property
    def form(self) -> dict[str, str]:
        """URL-encoded form fields of a POST (empty for anything else). Raises :class:`FormRefused`
        for a body no form of ours sends: too large, not UTF-8, or more fields than any has."""
        if self.method.upper() != "POST" or not self.body:
            return {}
        if "application/x-www-form-urlencoded" not in self.header("content-type").lower():
            return {}
        if len(self.body) > MAX_FORM_BYTES:
            raise FormRefused(f"body over {MAX_FORM_BYTES} bytes")
        try:
            text = self.body.decode("utf-8")
        except UnicodeDecodeError:
            raise FormRefused("body is not UTF-8") from None
        try:
            return dict(parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS))
        except ValueError:
            raise FormRefused(f"more than {MAX_FORM_FIELDS} fields") from None

    def cookies(self, name: str) -> list[str]:
        """Every value sent for cookie ``name`` (RFC 6265 §4.2 ``name=value; name=value``; a name may
        come more than once, for different paths). Parsed by hand: ``http.cookies`` gives up on the
        whole header when a neighbouring cookie is malformed."""
        values = []
        for pair in self.header("cookie").split(";"):
            key, sep, value = pair.strip().partition("=")
            if sep and key == name:
                values.append(value.strip().strip('"'))
        return values


@dataclass
class WebResponse:
    status: int
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "text/html"


@dataclass(frozen=True)
class Form:
    """A one-button form posting hidden fields to this app."""

    action: str
    button: str
    fields: Mapping[str, str] = field(default_factory=dict)


def page(status: int, title: str, paragraphs: Iterable[str], *, links: Iterable[tuple[str, str]] = (),
         form: Form | None = None, note: str = "", headers: Mapping[str, str] | None = None) -> WebResponse:
    """A complete page: a title, a few paragraphs, optional links (text, href) and a form."""
    esc = html.escape
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8"><meta name="referrer" content="no-referrer">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    parts.extend(f"<p>{esc(text)}</p>" for text in paragraphs)
    for text, href in links:
        parts.append(f'<p><a href="{esc(href, quote=True)}">{esc(text)}</a></p>')
    if form is not None:
        hidden = "".join(f'<input type="hidden" name="{esc(k, quote=True)}" value="{esc(v, quote=True)}">'
                         for k, v in form.fields.items())
        parts.append(f'<form method="post" action="{esc(form.action, quote=True)}">{hidden}'
                     f'<button type="submit">{esc(form.button)}</button></form>')
    if note:
        parts.append(f'<p class="muted">{esc(note)}</p>')
    parts.append("</body></html>")
    return WebResponse(status, "".join(parts), {**PAGE_HEADERS, **(headers or {})})


def redirect(location: str, *, headers: Mapping[str, str] | None = None) -> WebResponse:
    """A 302 to ``location`` (with a link in the body for clients that do not follow)."""
    body = (f'<!doctype html><html><head><meta name="referrer" content="no-referrer"></head><body>'
            f'<p><a href="{html.escape(location, quote=True)}">Continue</a></p></body></html>')
    return WebResponse(302, body, {**PAGE_HEADERS, "Location": location, **(headers or {})})
