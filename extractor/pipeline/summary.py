"""What a run did: records per status, tokens, time, which decoding path each record took (the manifest's
`summary`). Its own module: the run fills it, the sink and progress bar read it."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from extractor.errors import ExtractorError
from extractor.results.judge import SCORED_STATUSES


class NoResultError(ExtractorError):
    """A complete run in which no record came out ok or repaired: the job ran, but produced nothing usable.
    Exit code 1, not 2: the input was fine, the results are not."""

    exit_code = 1


@dataclass
class Summary:
    statuses: Counter = field(default_factory=Counter)
    new: int = 0
    already_done: int = 0
    rejected: int = 0
    output_tokens: int = 0
    elapsed: float = 0.0
    interrupted: bool = False
    decoders: Counter = field(default_factory=Counter)  # records of this run per decoding path
    decoder_reasons: Counter = field(default_factory=Counter)
    input_truncated: int = 0  # rows whose input --on-long truncate cut (already done ones included)
    chunked: int = 0  # rows of records split into chunks (--on-long chunk; already done ones included)
    chunk_requests: int = 0  # requests those records took, one per chunk
    chunks_failed: int = 0  # chunks whose output was not ok or repaired (their rows say which)

    def as_dict(self) -> dict:
        return {"records": sum(self.statuses.values()), "new_this_run": self.new,
                "already_done": self.already_done, "rejected_input": self.rejected,
                "statuses": dict(sorted(self.statuses.items())), "output_tokens_this_run": self.output_tokens,
                "elapsed_s": round(self.elapsed, 3),
                "records_per_s": round(self.new / self.elapsed, 3) if self.elapsed else None,
                "output_tokens_per_s": round(self.output_tokens / self.elapsed, 3) if self.elapsed else None,
                "interrupted": self.interrupted, "complete": not self.interrupted,
                "input_truncated": self.input_truncated,
                **({"chunked": {"records": self.chunked, "requests": self.chunk_requests,
                                "failed_chunks": self.chunks_failed}} if self.chunked else {}),
                **({"decoder": dict(sorted(self.decoders.items()))} if self.decoders else {}),
                **({"decoder_reason": "; ".join(self.decoder_reasons)} if self.decoder_reasons else {})}

    def count(self, rows: list[dict]) -> None:
        """Rows written by this run."""
        for row in rows:
            self.statuses[row["status"]] += 1
            self.output_tokens += row["output_tokens"] or 0
            self.count_chunks(row)
        self.new += len(rows)

    def count_chunks(self, row: dict) -> None:
        """A written row's marks of the long-input policy (rows of this run, or already done ones)."""
        self.input_truncated += row.get("input_truncated") is True
        chunks = row.get("chunks")
        if isinstance(chunks, int) and not isinstance(chunks, bool) and chunks > 0:
            self.chunked += 1
            self.chunk_requests += chunks
            statuses = row.get("chunk_statuses")
            self.chunks_failed += sum(s not in SCORED_STATUSES for s in statuses) if isinstance(statuses, list) else 0

    def count_decoders(self, triples) -> None:
        for _, gen, _ in triples:
            if isinstance(gen, list):  # a chunked record: counted once, by its first chunk's path
                gen = gen[0]
            if gen is not None and gen.decoder:
                self.decoders[gen.decoder] += 1
                if gen.decoder_reason:
                    self.decoder_reasons[gen.decoder_reason] += 1

    def no_result(self) -> str | None:
        """Why this output holds no usable result (records, none ok or repaired), else None."""
        total = sum(self.statuses.values())
        if total == 0 or any(self.statuses.get(status) for status in SCORED_STATUSES):
            return None
        counts = ", ".join(f"{status} {n}" for status, n in sorted(self.statuses.items()))
        return f"no record came out ok or repaired ({counts} of {total})"
