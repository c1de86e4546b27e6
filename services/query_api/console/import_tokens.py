"""An import's identity after it is published: a signed token naming the file (its digest, from
which the command ids come) and its valid lines as ranges. The progress page needs nothing else,
so it works on any API worker and after a restart, with no job table. A token expires with the
outcomes it reports on."""

from __future__ import annotations

from dataclasses import dataclass

from itsdangerous import BadSignature, URLSafeTimedSerializer

from services.query_api.signing import IMPORT_TOKENS
from shared.assignments import command_id


@dataclass(frozen=True, slots=True)
class ImportJob:
    digest: str
    lines: list[int]  # the valid rows' line numbers: the rows published
    invalid: int  # rows refused before publishing

    @property
    def command_ids(self) -> list[str]:
        return [command_id(self.digest, line) for line in self.lines]


def _ranges(lines: list[int]) -> list[list[int]]:
    ranges: list[list[int]] = []
    for line in lines:
        if ranges and ranges[-1][1] == line - 1:
            ranges[-1][1] = line
        else:
            ranges.append([line, line])
    return ranges


class ImportTokens:
    def __init__(self, key: bytes, max_age_seconds: int) -> None:
        self._serializer = URLSafeTimedSerializer(key, salt=IMPORT_TOKENS)  # compresses what repeats
        self.max_age_seconds = max_age_seconds

    def dumps(self, job: ImportJob) -> str:
        return self._serializer.dumps({"d": job.digest, "r": _ranges(job.lines), "i": job.invalid})

    def loads(self, token: str) -> ImportJob | None:
        try:
            data = self._serializer.loads(token, max_age=self.max_age_seconds)
            lines = [line for first, last in data["r"] for line in range(int(first), int(last) + 1)]
            return ImportJob(str(data["d"]), lines, int(data["i"]))
        except (BadSignature, KeyError, TypeError, ValueError):
            return None
