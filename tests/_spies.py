"""Counting calls of a module function while still running it (was a kernel launched?)."""


def count_calls(monkeypatch, module, name="_launch"):
    """Wrap module.name so each call is recorded; returns the list the calls are appended to."""
    calls = []
    real = getattr(module, name)

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(module, name, spy)
    return calls
