"""Running lm-evaluation-harness tasks: built-in ones by name, local ones from YAML + JSONL files.

Built-in tasks (``hellaswag``, ``arc_easy``, ``mmlu``, ...) fetch their data from the Hugging Face
Hub the first time (then ``~/.cache/huggingface`` serves them); local tasks are YAML files that
point at local data, found through ``include`` folders (or named by their YAML path), and run
offline. Indexing the ~200 folders of built-in tasks takes seconds, so when every requested task is
found in the ``include`` folders, the built-in index is skipped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import UserError
from ..fsutil import atomic_write


def task_manager(tasks: Sequence[str], include: Sequence[str] = ()):
    """An lm-eval ``TaskManager`` that knows ``tasks``: the ``include`` folders, plus the built-in tasks if needed."""
    from lm_eval.tasks import TaskManager

    folders = []
    for path in map(Path, include):
        if not path.exists():
            raise UserError(f"--include: {path} does not exist")
        folders.append(str(path if path.is_dir() else path.parent))
    folders += [str(Path(t).parent) for t in tasks if _is_yaml(t)]  # a task named by its file: index its folder
    folders = list(dict.fromkeys(folders))
    if folders:
        local = TaskManager(include_path=folders, include_defaults=False)
        if not _unknown(local, tasks):
            return local
    manager = TaskManager(include_path=folders or None)
    missing = _unknown(manager, tasks)
    if missing:
        raise UserError(f"unknown task(s): {', '.join(missing)} (a built-in task name, a YAML file, or a task in "
                        f"an --include folder; 'lm-eval ls tasks' lists the built-in ones)")
    return manager


def _unknown(manager, tasks: Sequence[str]) -> list[str]:
    """The requested names that are neither tasks/groups/tags of ``manager`` (globs allowed) nor YAML files."""
    return [t for t in tasks if not manager.match_tasks([t]) and not _is_yaml(t)]


def _is_yaml(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) and Path(name).is_file()


def run_tasks(lm, tasks: Sequence[str], *, include: Sequence[str] = (), limit: Optional[float] = None,
              num_fewshot: Optional[int] = None, gen_kwargs: Optional[str] = None, seed: int = 0) -> dict:
    """lm-eval's ``simple_evaluate`` of ``lm`` on ``tasks``: its results dictionary (samples left out)."""
    from lm_eval import simple_evaluate

    manager = task_manager(tasks, include)
    started = time.time()
    results = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                              gen_kwargs=gen_kwargs, log_samples=False, random_seed=seed, numpy_random_seed=seed,
                              torch_random_seed=seed, fewshot_random_seed=seed)
    results["wall_time_s"] = round(time.time() - started, 3)
    return results


def results_table(results: dict) -> str:
    """The harness's Markdown table(s) of a results dictionary (tasks, then groups when there are any)."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table


def save_results(results: dict, path: str | Path, extra: Optional[dict[str, Any]] = None) -> Path:
    """Write the results (plus ``extra`` facts, e.g. the checkpoint) as JSON, atomically."""
    from lm_eval.utils import handle_non_serializable

    keep = {k: v for k, v in results.items() if k != "samples"}
    keep.update(extra or {})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(keep, indent=2, default=handle_non_serializable) + "\n")
    return path
