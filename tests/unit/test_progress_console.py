"""The driver's console prints whatever text workers and libraries send, verbatim."""

from __future__ import annotations

import io

from rich.console import Console

from forge.progress import ConsoleProgress

# gloo's message when a peer dies: rich would read the bracketed path as a closing tag.
GLOO = (
    "Connection closed by peer [127.0.0.1]:4242 "
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537]"
)


def _progress() -> tuple[ConsoleProgress, io.StringIO]:
    out = io.StringIO()
    return ConsoleProgress(Console(file=out, width=400)), out


def test_a_warning_quoting_a_library_error_prints_verbatim() -> None:
    progress, out = _progress()
    progress({"event": "warning", "message": f"worker restarted after: {GLOO}"})
    assert GLOO in out.getvalue()


def test_info_and_uris_with_brackets_print_verbatim() -> None:
    progress, out = _progress()
    progress({"event": "info", "message": GLOO})
    progress({"event": "checkpoint", "step": 10, "uri": "s3://b/[/run]/step_10"})
    progress({"event": "resumed", "step": 10, "uri": "/tmp/[/x]/step_10"})
    text = out.getvalue()
    assert GLOO in text
    assert "s3://b/[/run]/step_10" in text
    assert "/tmp/[/x]/step_10" in text
