"""Loaders for these local tasks: JSONL files beside this file, so the tasks run offline from any folder.

lm-eval calls ``custom_dataset`` with the task's ``dataset_kwargs``; ``data_files`` maps a split to a
file name relative to this folder.
"""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def local_jsonl(data_files, **_):
    """The splits of ``data_files`` ({split: file name here}) as a DatasetDict."""
    return datasets.DatasetDict({split: datasets.Dataset.from_list(_rows(HERE / name)) for split, name in data_files.items()})


def _rows(path: Path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
