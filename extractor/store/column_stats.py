"""What a read saw of each column: how many records have it and the shape of its values, from which
`suggest_columns` picks a likely text and id column."""
from __future__ import annotations

from dataclasses import dataclass, field

ID_NAMES = ("id", "uuid", "key", "guid", "doc_id", "record_id")


@dataclass
class ReadStats:
    records: int = 0
    rejected: int = 0
    fields: dict = field(default_factory=dict)  # field name -> count of records having it
    # field name -> [records where it is a string, their total characters, records where it is an integer]:
    # what `suggest_columns` picks a text and an id column from
    shapes: dict = field(default_factory=dict)

    def count_row(self, row: dict) -> None:
        fields, shapes = self.fields, self.shapes
        for key, value in row.items():
            fields[key] = fields.get(key, 0) + 1
            if isinstance(value, (str, int)) and not isinstance(value, bool):
                shape = shapes.setdefault(key, [0, 0, 0])
                if isinstance(value, str):
                    shape[0] += 1
                    shape[1] += len(value)
                else:
                    shape[2] += 1


def suggest_columns(stats: ReadStats, exclude=()) -> tuple[str | None, str | None]:
    """The likely text column (the string column with the longest values on average, present in most rows)
    and id column (a name like `id` or `*_id`, holding strings or integers in every row it is in)."""
    seen = max(stats.fields.values(), default=0)
    text, best = None, 0.0
    for name, (strings, chars, _) in stats.shapes.items():
        if name in exclude or strings < seen / 2:
            continue
        mean = chars / strings
        if mean > best:
            text, best = name, mean
    ids = [name for name, (strings, _, ints) in stats.shapes.items()
           if name != text and strings + ints == stats.fields[name]
           and (str(name).lower() in ID_NAMES or str(name).lower().endswith(("_id", "id")))]
    ids.sort(key=lambda name: (str(name).lower() not in ID_NAMES, -stats.fields[name]))
    return text, ids[0] if ids else None
