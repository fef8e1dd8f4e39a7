"""pytest plugin: PEFT's own test suite with fastlora's layer in place of PEFT's LoRA Linear.

Loaded into a run of PEFT's tests (``make peft-suite PEFT_DIR=...``, see docs/architecture.md),
it registers ``fastlora.peft.LoraLinear`` for ``nn.Linear`` on every ``LoraConfig`` as it is
built (PEFT's custom-module mechanism, as ``fastlora.peft.register`` does), so every LoRA layer
PEFT's tests create on a linear layer is fastlora's, and it reports how many such layers were
built, how many of their forwards took the fast path and why the others fell back. A run in
which no fastlora layer was built fails: the plugin did not take effect.

Not collected by this project's own suite: its name has no ``test_`` prefix.
"""
import collections

import peft

import fastlora.peft

_built = collections.Counter()
_fallbacks = collections.Counter()

_post_init = peft.LoraConfig.__post_init__
_init = fastlora.peft.LoraLinear.__init__
_forward = fastlora.peft.LoraLinear.forward
_warn = fastlora.peft.LoraLinear._fastlora_warn


def _registering_post_init(self, *args, **kwargs):
    _post_init(self, *args, **kwargs)
    fastlora.peft.register(self)


def _counting_init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    _built["layers"] += 1


def _counting_forward(self, *args, **kwargs):
    before = getattr(self, "fastlora_calls", 0)
    out = _forward(self, *args, **kwargs)
    _built["forwards"] += 1
    _built["fast-path forwards"] += getattr(self, "fastlora_calls", 0) > before
    return out


def _counting_warn(self, reason):
    # called on every fallback forward (the layer itself warns once per reason); the reason
    # without the adapter's name, so that one cause counts once
    _fallbacks[reason.split("' ", 1)[-1]] += 1
    return _warn(self, reason)


peft.LoraConfig.__post_init__ = _registering_post_init
fastlora.peft.LoraLinear.__init__ = _counting_init
fastlora.peft.LoraLinear.forward = _counting_forward
fastlora.peft.LoraLinear._fastlora_warn = _counting_warn


def pytest_sessionfinish(session, exitstatus):
    if session.testscollected and _built["layers"] == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_sep("-", "fastlora in PEFT's tests")
    terminalreporter.write_line(", ".join(f"{k}: {_built[k]}" for k in ("layers", "forwards", "fast-path forwards")))
    for reason, n in _fallbacks.most_common():
        terminalreporter.write_line(f"  {n} forwards fell back: {reason}")
    if _built["layers"] == 0:
        terminalreporter.write_line("no fastlora layer was built: the plugin did not take effect", red=True)
