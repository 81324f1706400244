"""What a backend does before its first prefill, said and timed: one line per phase on stderr as it begins
(loading weights 3.1 GB…, compiling…, capturing graphs…) and each phase's seconds for the manifest.
Also whether `--compile auto` compiles: only where the run's tokens repay the compile."""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

# Output tokens from which compiling the fast path's forward pays back (`--compile auto`). Measured on one
# H200 (2026-12-04, 1.5B Qwen2.5 shape): compiling cost about 20 s a process and made decoding
# 44,835 / 34,832 = 1.29x faster, so it repays 20 s only past ~24,000 records of 128 new tokens.
COMPILE_PAYS_FROM_TOKENS = 3_000_000
COMPILE_CHOICES = ("auto", "on", "off")


def process_age() -> float:
    """Seconds since this process started (Linux: /proc), so start-up counts the interpreter and imports too;
    elsewhere 0.0."""
    try:
        with open("/proc/self/stat", "rb") as fh:
            start_ticks = int(fh.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/uptime", "rb") as fh:
            uptime = float(fh.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


@dataclass
class Startup:
    """The phases of one backend's start-up, in order, with their seconds. `say=False`: timed, not printed."""
    say: bool = True
    phases: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)
    began_at_process_s: float = field(default_factory=process_age)

    @contextmanager
    def phase(self, name: str, detail: str = ""):
        if self.say:
            print(f"{name}{' ' + detail if detail else ''}…", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = round(self.phases.get(name, 0.0) + time.perf_counter() - start, 3)

    def note(self, key: str, value) -> None:
        self.notes[key] = value

    def as_dict(self) -> dict:
        return {"began_at_process_s": round(self.began_at_process_s, 3), "phases_s": dict(self.phases),
                **self.notes}


@dataclass(frozen=True)
class CompileChoice:
    compile: bool
    why: str

    def as_dict(self) -> dict:
        return {"compile": self.compile, "why": self.why}


def choose_compile(setting: str, cuda: bool, tokens: int | None) -> CompileChoice:
    """`--compile on|off|auto`. auto: off on CPU (it does not pay there); on CUDA only when the run's output
    tokens (records still to do x max new tokens; None: unknown, e.g. a stream) reach the pay-back point."""
    if setting not in COMPILE_CHOICES:
        raise ValueError(f"--compile {setting!r}: use one of {', '.join(COMPILE_CHOICES)}")
    if setting != "auto":
        return CompileChoice(setting == "on", f"--compile {setting}")
    if not cuda:
        return CompileChoice(False, "auto: not on CPU, where compiling does not pay")
    if tokens is None:
        return CompileChoice(False, "auto: the run's size is unknown (streamed corpus); eager avoids a compile "
                                    "that may not pay")
    pays = tokens >= COMPILE_PAYS_FROM_TOKENS
    return CompileChoice(pays, f"auto: {tokens:,} output tokens at most {'>=' if pays else '<'} "
                               f"{COMPILE_PAYS_FROM_TOKENS:,}, where compiling pays back its cost")


def size_text(nbytes: int) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"
